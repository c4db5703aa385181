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

    python benchmarks/gpu_table.py --experiment ditplan/experiments/digits-1024.yaml \
        --plans runs/digits-1024/greedy/*.yaml runs/digits-1024/exported/*.yaml
    python benchmarks/gpu_table.py --experiment ditplan/experiments/digits-1024.yaml --device cpu --dtype float32 \
        --families "block caching" --cache-periods 2 3 4 6
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ditplan.evaluators.measure import DENSE, measure
from ditplan.models.adapters import ModelAdapter, adapter_from_spec, model_folder, sparse_networks
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, load_plan
from ditplan.plansearch.space import interval_skips
from ditplan.spec import ExperimentSpec, load_spec
from ditplan.strategies.finetune_sparse import layout_plan
from ditplan.strategies.sdtm import SparseLayout

DENSE_STEPS = 2  # every family plan computes the first steps densely
FAMILIES = ("DiTFastAttn", "SparseDiT", "block caching")


def _every_layer(adapter: ModelAdapter, spec: ExperimentSpec, cell_of_step, **kwargs) -> Plan:
    steps = spec.sampler.num_steps
    grid = tuple((cell_of_step(step),) * adapter.num_layers for step in range(steps))
    return Plan(plan_target(adapter, spec.sampler.settings()), grid, **kwargs)


def family_plans(adapter: ModelAdapter, spec: ExperimentSpec, cache_periods: tuple[int, ...] = (2,)) -> dict[str, tuple[str, Plan]]:
    """name → (family, plan); block caching computes every k-th step for each k of ``cache_periods``."""
    def alternate(cell: str, period: int = 2):
        steps = spec.sampler.num_steps
        return lambda step: cell if interval_skips(step, period, steps, warmup=DENSE_STEPS) else "full"

    out: dict[str, tuple[str, Plan]] = {
        "wars ±N/8, dense every 5th step": ("DiTFastAttn", _every_layer(adapter, spec, alternate("wars", 5))),
        "asc every step": ("DiTFastAttn", _every_layer(adapter, spec, lambda s: "full" if s < DENSE_STEPS else "asc")),
        "wars+asc, dense every 5th step": ("DiTFastAttn", _every_layer(adapter, spec, alternate("wars+asc", 5))),
        "ast every other step": ("DiTFastAttn", _every_layer(adapter, spec, alternate("ast"))),
    }
    for period in cache_periods:
        every = {2: "every other step", 3: "every 3rd step"}.get(period, f"every {period}th step")
        out[f"reuse {every}"] = ("block caching", _every_layer(adapter, spec, alternate("reuse", period)))
        out[f"forecast (order 1) {every}"] = ("block caching", _every_layer(adapter, spec, alternate("forecast", period)))
    settings = spec.sampler.settings()
    for weights, info in sparse_networks(model_folder(spec.model.source)).items():  # type: ignore[arg-type]
        for curve in ({"name": "paper", **dict(zip(("r_min", "r_max"), info["rate_range"]))},
                      {"name": "constant", "r": 0.5}, {"name": "constant", "r": 0.75}):
            layout = SparseLayout.from_dict({**info["layout"], "curve": curve, "weights": weights})
            label = ", ".join(f"{k}={v}" for k, v in curve.items() if k != "name")
            out[f"{layout.name} {curve['name']} ({label})"] = ("SparseDiT", layout_plan(adapter, layout, settings))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--plans", nargs="*", default=[], help="plan files to measure beside the families")
    parser.add_argument("--families", nargs="*", choices=FAMILIES, default=list(FAMILIES),
                        help="the strategy families to measure (default: all)")
    parser.add_argument("--cache-periods", nargs="+", type=int, default=[2],
                        help="block caching computes every k-th step, for each k given (default: 2)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="run the model here instead of model.device")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="and in this dtype instead of model.dtype")
    args = parser.parse_args()
    if min(args.cache_periods) < 2:
        parser.error(f"--cache-periods {min(args.cache_periods)} computes every step; give periods of 2 or more")
    spec = load_spec(args.experiment)
    moved = {key: value for key, value in (("device", args.device), ("dtype", args.dtype)) if value}
    spec = spec.model_copy(update={"model": type(spec.model).model_validate({**spec.model.model_dump(), **moved})})
    adapter = adapter_from_spec(spec.model)
    torch.backends.cuda.matmul.allow_tf32 = True
    plans = {name: fp for name, fp in family_plans(adapter, spec, tuple(args.cache_periods)).items()
             if fp[0] in args.families}
    for path in args.plans:
        plans[Path(path).stem] = ("plan file", load_plan(path))
    result = measure(adapter, spec, {name: plan for name, (_, plan) in plans.items()}, spec.seed_set("held_out"),
                     timed=True, rounds_count=spec.search.refine.latency_repeats)
    m = result.metrics
    device = next(adapter.transformer.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    options = "".join(f" --{key} {value}" for key, value in moved.items())
    options += f" --families {' '.join(repr(f) for f in args.families)} --cache-periods {' '.join(map(str, args.cache_periods))}"
    print(f"# python benchmarks/gpu_table.py --experiment {args.experiment}{options} --plans {' '.join(args.plans)}")
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
