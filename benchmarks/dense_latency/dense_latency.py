"""Dense latency of an experiment's workload: median and min–max over repeats (the noise band any
plan comparison has to beat) and the share of time spent in self-attention.

    python benchmarks/dense_latency/dense_latency.py --experiment ditplan/experiments/quickstart.yaml [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import add_experiment_arguments, load_experiment, print_provenance  # noqa: E402

from ditplan.evaluators.cost import attention_time_share, measure_latency  # noqa: E402
from ditplan.models.adapters import adapter_from_spec  # noqa: E402
from ditplan.models.sampling import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    add_experiment_arguments(parser, default="ditplan/experiments/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print_provenance()
    spec = load_experiment(args)
    adapter = adapter_from_spec(spec.model)
    settings = spec.sampler.settings()
    conditions, seeds = spec.workload.conditions(), spec.workload.seeds()

    def run() -> torch.Tensor:
        return sample(adapter, conditions, seeds, settings)

    device = next(adapter.transformer.parameters()).device
    latency = measure_latency(run, device, repeats=args.repeats)
    shares = [attention_time_share(adapter, run) for _ in range(3)]
    band = (latency.maximum - latency.minimum) / latency.median
    print(f"{spec.name}: {len(seeds)} samples, {settings.num_steps} {settings.scheduler} steps, guidance "
          f"{settings.guidance_scale}, {device}, torch threads {latency.threads}")
    print(f"dense latency: median {latency.median:.2f} s, min {latency.minimum:.2f} s, max {latency.maximum:.2f} s "
          f"over {args.repeats} runs → noise band ±{band / 2:.1%} of the median (max−min = {band:.1%})")
    print(f"self-attention time share: {sorted(shares)[1]:.1%} (median of 3 hooked runs)")


if __name__ == "__main__":
    main()
