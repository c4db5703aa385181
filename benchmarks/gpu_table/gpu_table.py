"""One table of plans on an experiment's held-out seeds: dense, each strategy family alone, and plan files.

Meant for a GPU (``ditplan/experiments/digits-1024.yaml``: the 1,024-token embedded model in bfloat16), it runs
on any device the experiment names. Every plan and dense sample the held-out set in
``search.refine.latency_repeats`` rounds, taking turns in one process (``measure``, timed: the
evaluation ``ditplan run`` reports from): latency per sample and its ratio to the dense run beside it
(median, min–max band over rounds), held-out domain FID/KID, rel. L1 to dense, FLOPs ratio.

Families (fixed plans, no calibration; every layer alike, the first two steps dense):
- DiTFastAttn: ``wars`` (block window ±N/8, dense every 5th step), ``asc`` (CFG sharing), ``wars+asc``,
  ``ast`` (every other step shares the previous step's attention);
- SparseDiT: each fine-tuned network next to the model, at the paper's curve and at constant rates;
- block caching: ``reuse`` and ``forecast`` (order 1) on every other step, every block; ``--cache-periods``
  adds longer intervals (computing steps 0, 1, 2 and every k-th step after, as the search's network caching).
``--plans`` adds plan files (a run's greedy D1–D6 and exported learned plans); ``--families`` keeps only
the named families; ``--device`` / ``--dtype`` run the experiment's model elsewhere (a CPU preview).

    python benchmarks/gpu_table/gpu_table.py --experiment ditplan/experiments/digits-1024.yaml \
        --plans runs/digits-1024/greedy/*.yaml runs/digits-1024/exported/*.yaml
    python benchmarks/gpu_table/gpu_table.py --experiment ditplan/experiments/digits-1024.yaml --device cpu --dtype float32 \
        --families "block caching" --cache-periods 2 3 4 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import (  # noqa: E402
    FAMILIES,
    add_experiment_arguments,
    family_plans,
    load_experiment,
    measure_held_out,
    print_provenance,
)

from ditplan.evaluators.measure import DENSE  # noqa: E402
from ditplan.models.adapters import adapter_from_spec  # noqa: E402
from ditplan.plan import load_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, device=True)
    parser.add_argument("--plans", nargs="*", default=[], help="plan files to measure beside the families")
    parser.add_argument("--families", nargs="*", choices=FAMILIES, default=list(FAMILIES),
                        help="the strategy families to measure (default: all)")
    parser.add_argument("--cache-periods", nargs="+", type=int, default=[2],
                        help="block caching computes every k-th step, for each k given (default: 2)")
    args = parser.parse_args()
    if min(args.cache_periods) < 2:
        parser.error(f"--cache-periods {min(args.cache_periods)} computes every step; give periods of 2 or more")
    print_provenance()
    spec = load_experiment(args)
    adapter = adapter_from_spec(spec.model)
    torch.backends.cuda.matmul.allow_tf32 = True
    plans = {name: fp for name, fp in family_plans(adapter, spec, tuple(args.cache_periods)).items()
             if fp[0] in args.families}
    for path in args.plans:
        plans[Path(path).stem] = ("plan file", load_plan(path))
    result = measure_held_out(adapter, spec, {name: plan for name, (_, plan) in plans.items()})
    m = result.metrics
    device = next(adapter.transformer.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{spec.name} on {name}, {spec.model.dtype}: {len(result.seed_set.seeds)} held-out samples (seeds "
          f"{result.seed_set.seeds[0]}…), {spec.search.refine.latency_repeats} rounds interleaved with dense, "
          f"batch {spec.sampler.batch_size}, {spec.sampler.num_steps} {spec.sampler.scheduler} steps, CFG "
          f"{spec.sampler.guidance_scale}; {result.seconds:.0f} s")
    print("| plan | family | latency ms/sample | latency ratio (band) | FLOPs ratio | FID | KID | kid_low | rel. L1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [(DENSE, "")] + [(n, family) for n, (family, _) in plans.items()]
    for plan_name, family in rows:
        v = m[plan_name]
        print(f"| {plan_name} | {family} | {v['latency_ms']:.2f} | {v['latency_ratio']:.3f} "
              f"({v['latency_ratio_min']:.2f}–{v['latency_ratio_max']:.2f}) | {v['flops_ratio']:.3f} | "
              f"{v.get('fid', float('nan')):.3f} | {v.get('kid', float('nan')):.4f} | "
              f"{v.get('kid_low', float('nan')):.4f} | {v['rel_l1']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
