"""DiTFastAttn's D1–D6 table on the embedded model (20 DPM-Solver++ steps, guidance 4).

Greedy plans are calibrated on 8 samples (seeds 0–7, labels 0–7); every config then samples the same
20-sample batch on disjoint evaluation seeds (1000–1019, labels 0–9 twice). WA-RS uses the default
window (``WindowConfig``: shape and ±N/8). Latency: one process, runs interleaved across configs,
median of ``--repeats`` after a warm-up, as ratios to dense in the same round. Quality: relative L1
and PSNR of the final samples vs dense.

    python benchmarks/ditfastattn_table/ditfastattn_table.py [--repeats 5] [--plans-out runs/bench-greedy-<shape>]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
from common import print_provenance, ratio_stats  # noqa: E402

from ditplan.evaluators.cost import interleaved_times, plan_flops  # noqa: E402
from ditplan.evaluators.fidelity import psnr, relative_l1  # noqa: E402
from ditplan.models.adapters import load_adapter  # noqa: E402
from ditplan.models.sampling import plan_target  # noqa: E402
from ditplan.plan import load_plan  # noqa: E402
from ditplan.plansearch.greedy import DEFAULT_THRESHOLDS, greedy_search, threshold_name  # noqa: E402
from ditplan.spec import SamplerSettings  # noqa: E402
from ditplan.strategies.apply import run_plan  # noqa: E402
from ditplan.strategies.wars import WindowConfig  # noqa: E402

CALIBRATION_SEEDS = list(range(8))  # labels 0–7
EVALUATION_SEEDS = list(range(1000, 1020))  # disjoint from calibration


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plans-out", default=f"runs/bench-greedy-{WindowConfig().window_shape}",
                        help="greedy plans are saved here and reused when their target matches")
    args = parser.parse_args()
    print_provenance()
    torch.set_num_threads(args.threads)
    adapter = load_adapter("dit", "embedded")
    settings = SamplerSettings("dpmsolver++", num_steps=20, guidance_scale=4.0, batch_size=20)
    target = plan_target(adapter, settings)
    labels, seeds = [i % 10 for i in range(len(EVALUATION_SEEDS))], EVALUATION_SEEDS
    print(f"calibration seeds {CALIBRATION_SEEDS[0]}–{CALIBRATION_SEEDS[-1]}, evaluation seeds {seeds[0]}–{seeds[-1]}; "
          f"WA-RS window {WindowConfig()}", flush=True)

    configs = {"dense": None}
    for index, delta in enumerate(DEFAULT_THRESHOLDS):
        name = threshold_name(index)
        path = Path(args.plans_out) / f"greedy-{name}.yaml"
        if path.exists() and load_plan(path).target == target:  # reuse an earlier calibration
            configs[name] = load_plan(path)
        else:
            result = greedy_search(adapter, settings, list(range(8)), CALIBRATION_SEEDS, delta)
            configs[name] = result.plan.with_provenance(name=name)
            configs[name].save(path)
        provenance = configs[name].provenance
        print(f"{name} (δ={delta}): {provenance['transformer_forwards']} forwards, "
              f"{provenance['search_seconds']:.0f} s of calibration", flush=True)

    def run(plan):
        return run_plan(adapter, plan, labels, seeds, settings).samples

    samples = {name: run(plan) for name, plan in configs.items()}  # also the warm-up
    runs = {name: (lambda plan=plan: run(plan)) for name, plan in configs.items()}
    times = interleaved_times(runs, torch.device("cpu"), args.repeats)

    dense_flops = plan_flops(adapter, None, settings, batch=len(labels))
    dense_time = statistics.median(times["dense"])
    print(f"\ndense: {dense_time:.2f} s median for {len(labels)} samples "
          f"(min {min(times['dense']):.2f}, max {max(times['dense']):.2f}), torch threads {torch.get_num_threads()}")
    print("\n| config | attn FLOPs | whole FLOPs | latency ratio (median, min–max) | rel. L1 vs dense | PSNR vs dense (dB) |")
    print("|---|---|---|---|---|---|")
    for name, plan in configs.items():
        flops = plan_flops(adapter, plan, settings, batch=len(labels))
        median, low, high = ratio_stats(times, name)  # against dense in the same round
        print(
            f"| {name} | {flops.attention / dense_flops.attention:.0%} | {flops.total / dense_flops.total:.0%} | "
            f"{median:.2f} ({low:.2f}–{high:.2f}) | "
            f"{relative_l1(samples[name], samples['dense']):.4f} | {psnr(samples[name], samples['dense']):.1f} |"
        )


if __name__ == "__main__":
    main()
