"""SparseDiT's Poolingformer on the bottom layers of the embedded model, without fine-tuning.

For 1 and 2 bottom layers (every step): FLOPs ratio, latency ratio (median of 5 interleaved runs on
20 samples), and quality vs dense on 200 samples: relative L1, PSNR, class agreement, domain FID
against the held-out digits (dense's own FID printed beside it).

    python benchmarks/poolingformer.py
"""

from __future__ import annotations

import statistics

import torch

from ditplan.evaluators.cost import interleaved_times, plan_flops
from ditplan.evaluators.distribution import class_agreement, distribution_metrics
from ditplan.evaluators.fidelity import psnr, relative_l1
from ditplan.models.adapters import load_adapter
from ditplan.models.digits import load_digits
from ditplan.models.sampling import SamplerSettings, plan_target, sample_with_plan
from ditplan.plan import Plan


def main() -> None:
    torch.set_num_threads(2)
    adapter = load_adapter("dit", "embedded")
    settings = SamplerSettings("dpmsolver++", num_steps=20, guidance_scale=4.0, batch_size=50)
    target = plan_target(adapter, settings)
    configs: dict[str, Plan | None] = {"dense": None}
    for bottom in (1, 2):
        row = tuple("pool" if layer < bottom else "full" for layer in range(adapter.num_layers))
        configs[f"pool ×{bottom}"] = Plan(target, tuple(row for _ in range(settings.num_steps)))

    labels, seeds = [i % 10 for i in range(200)], list(range(2000, 2200))
    held_out = load_digits("held_out")[0]
    samples = {name: sample_with_plan(adapter, plan, labels, seeds, settings)[0] for name, plan in configs.items()}
    runs = {name: (lambda plan=plan: sample_with_plan(adapter, plan, labels[:20], seeds[:20], settings))
            for name, plan in configs.items()}
    times = interleaved_times(runs, torch.device("cpu"), repeats=5)
    dense_flops = plan_flops(adapter, None, settings, batch=20)
    dense_time = statistics.median(times["dense"])
    print(f"embedded DiT, 20 DPM-Solver++ steps, CFG 4; quality on 200 samples, latency median of 5 on 20 samples "
          f"(dense {dense_time:.2f} s), torch threads {torch.get_num_threads()}")
    print("\n| config | whole FLOPs | attn FLOPs | latency ratio | rel. L1 | PSNR (dB) | class agreement | domain FID |")
    print("|---|---|---|---|---|---|---|---|")
    for name, plan in configs.items():
        flops = plan_flops(adapter, plan, settings, batch=20)
        fid = next(m.value for m in distribution_metrics(samples[name], held_out, metrics=("fid",)) if m.name == "fid")
        agreement = class_agreement(samples[name], torch.tensor(labels))
        print(f"| {name} | {flops.total / dense_flops.total:.0%} | {flops.attention / dense_flops.attention:.0%} | "
              f"{statistics.median(times[name]) / dense_time:.2f} | {relative_l1(samples[name], samples['dense']):.4f} | "
              f"{psnr(samples[name], samples['dense']):.1f} | {agreement:.1%} | {fid:.2f} |")


if __name__ == "__main__":
    main()
