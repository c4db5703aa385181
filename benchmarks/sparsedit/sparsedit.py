"""SparseDiT on the embedded model: Poolingformer, SDTM layouts with and without fine-tuning, curves.

Rows: Poolingformer on 1 and 2 bottom layers (no fine-tuning); each SDTM layout at r = 0.75 on the
pretrained weights (identity merge), and at r = 0.75 and 0.875 on its fine-tuned network (``ditplan
finetune-sparse``, found under the embedded model's ``sparse/`` folder); the first fine-tuned layout under two time-wise
curves. Columns: FLOPs ratio, latency ratio (median of interleaved runs on 20 samples, one process),
quality vs dense on 200 samples (relative L1, PSNR, class agreement) and domain FID against the
held-out digits (dense's own FID in its row).

    python benchmarks/sparsedit/sparsedit.py [--repeats 5] [--samples 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
from common import print_provenance  # noqa: E402

from ditplan.evaluators.cost import interleaved_times, plan_flops  # noqa: E402
from ditplan.evaluators.distribution import class_agreement, distribution_metrics  # noqa: E402
from ditplan.evaluators.fidelity import psnr, relative_l1  # noqa: E402
from ditplan.models.adapters import load_adapter  # noqa: E402
from ditplan.models.digits import load_digits  # noqa: E402
from ditplan.models.embedded import EMBEDDED_PATH  # noqa: E402
from ditplan.models.sampling import plan_target  # noqa: E402
from ditplan.plan import Plan  # noqa: E402
from ditplan.spec import SamplerSettings  # noqa: E402
from ditplan.strategies.apply import run_plan  # noqa: E402
from ditplan.strategies.finetune_sparse import layout_plan  # noqa: E402
from ditplan.strategies.sdtm import SparseLayout  # noqa: E402
from ditplan.strategies.sparse_network import sparse_networks  # noqa: E402

CURVES = [{"name": "paper", "r_min": 0.5, "r_max": 0.875}, {"name": "step", "r_high": 0.875, "r_low": 0.5, "switch": 0.5}]


def configs(adapter, settings) -> dict[str, Plan | None]:
    target = plan_target(adapter, settings)
    out: dict[str, Plan | None] = {"dense": None}
    for bottom in (1, 2):
        row = tuple("pool" if layer < bottom else "full" for layer in range(adapter.num_layers))
        out[f"pool ×{bottom}"] = Plan(target, tuple(row for _ in range(settings.num_steps)))
    networks = sparse_networks(EMBEDDED_PATH)

    def layout(info: dict, curve: dict, weights: str | None) -> SparseLayout:
        return SparseLayout.from_dict({**info["layout"], "curve": curve, "weights": weights})

    for weights, info in networks.items():
        untuned = layout(info, {"name": "constant", "r": 0.75}, None)
        out[f"{untuned.name} r=0.75, not fine-tuned"] = layout_plan(adapter, untuned, settings)
        for rate in (0.75, 0.875):
            tuned = layout(info, {"name": "constant", "r": rate}, weights)
            out[f"{tuned.name} r={rate}, fine-tuned"] = layout_plan(adapter, tuned, settings)
    for weights, info in list(networks.items())[:1]:
        for curve in CURVES:
            tuned = layout(info, curve, weights)
            label = ", ".join(f"{k}={v}" for k, v in curve.items() if k != "name")
            out[f"{tuned.name} {curve['name']} ({label}), fine-tuned"] = layout_plan(adapter, tuned, settings)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    print_provenance()
    torch.set_num_threads(2)
    adapter = load_adapter("dit", "embedded")
    settings = SamplerSettings("dpmsolver++", num_steps=20, guidance_scale=4.0, batch_size=50)
    plans = configs(adapter, settings)
    labels, seeds = [i % 10 for i in range(args.samples)], list(range(2000, 2000 + args.samples))
    held_out = load_digits("held_out")[0]
    samples = {name: run_plan(adapter, plan, labels, seeds, settings).samples for name, plan in plans.items()}
    runs = {name: (lambda plan=plan: run_plan(adapter, plan, labels[:20], seeds[:20], settings))
            for name, plan in plans.items()}
    times = interleaved_times(runs, torch.device("cpu"), repeats=args.repeats)
    dense_flops = plan_flops(adapter, None, settings, batch=20)
    dense_time = statistics.median(times["dense"])
    print(f"embedded DiT, 20 DPM-Solver++ steps, CFG 4; quality on {args.samples} samples, latency median of "
          f"{args.repeats} interleaved runs on 20 samples (dense {dense_time:.2f} s), torch threads {torch.get_num_threads()}")
    print("\n| config | whole FLOPs | latency ratio | rel. L1 | PSNR (dB) | class agreement | domain FID |")
    print("|---|---|---|---|---|---|---|")
    for name, plan in plans.items():
        flops = plan_flops(adapter, plan, settings, batch=20)
        fid = next(m.value for m in distribution_metrics(samples[name], held_out, metrics=("fid",)) if m.name == "fid")
        agreement = class_agreement(samples[name], torch.tensor(labels))
        print(f"| {name} | {flops.total / dense_flops.total:.0%} | {statistics.median(times[name]) / dense_time:.2f} | "
              f"{relative_l1(samples[name], samples['dense']):.4f} | {psnr(samples[name], samples['dense']):.1f} | "
              f"{agreement:.1%} | {fid:.2f} |")


if __name__ == "__main__":
    main()
