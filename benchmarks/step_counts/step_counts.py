"""A plan made at one step count, run at others: re-targeted by normalised time, against dense and against a plan
searched at that step count, on an experiment's held-out seeds.

For the plan's own step count and each of ``--steps``: the experiment's sampler at that many steps, and on its
held-out seeds (``--samples``), dense and every row taking turns in each of ``refine.latency_repeats`` rounds in one
process (what ``ditplan run`` reports from; latency ratio = median over rounds of the row's time / dense's in the same
round, band: min–max). Rows at M steps:
- the plan re-targeted to M steps (``retarget_to_steps``: what ``ditplan retarget PLAN --steps M`` writes and what
  ``apply_plan`` runs in a pipeline called with ``num_inference_steps=M``);
- the ``--searched`` fastest plans of the feasible front of the experiment's own learned search run at M steps
  (search seeds; in ``--out``/search-M, resumed when there; fastest by the search's FLOPs objective). The search is
  the experiment's, greedy's warm start aside (its plans are not made at M steps).

    python benchmarks/step_counts/step_counts.py --experiment ditplan/experiments/quickstart.yaml \
        --plan quickstart-knee --steps 30 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
from common import (  # noqa: E402
    add_experiment_arguments,
    load_experiment,
    measure_held_out,
    print_provenance,
    print_row,
)

from ditplan.evaluators.measure import DENSE  # noqa: E402
from ditplan.models.adapters import adapter_from_spec  # noqa: E402
from ditplan.plan import Plan, load_plan, shipped_plan, shipped_plans  # noqa: E402
from ditplan.strategies.retarget import retarget_to_steps  # noqa: E402
from ditplan.workflow import search_experiment  # noqa: E402


def at_steps(spec, steps: int, samples: int):  # noqa: ANN001, ANN201
    """The experiment with its sampler at ``steps`` steps, ``samples`` held-out samples and its own output folder."""
    sampler = spec.sampler.model_copy(update={"num_steps": steps})
    refine = spec.search.refine.model_copy(update={"samples": samples})
    search = spec.search.model_copy(update={"refine": refine, "warm_start": "none"})
    return spec.model_copy(update={"sampler": sampler, "search": search, "name": f"{spec.name}-{steps}-steps"})


def searched_plans(spec, out: Path, count: int) -> dict[str, Plan]:  # noqa: ANN001
    """The ``count`` fastest plans of the feasible front of ``spec``'s learned search (run in ``out``, or resumed)."""
    folder = out / f"search-{spec.sampler.num_steps}"
    result = search_experiment(spec, out=folder, resume=(folder / "trials").is_dir())
    speed = result.objectives.index("flops_ratio")
    fastest = sorted(result.front, key=lambda trial: trial.values[speed])[:count]
    return {f"searched at {spec.sampler.num_steps}: trial-{t.number}": result.search_dir.load_trial(t.number)
            for t in fastest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_arguments(parser, default="ditplan/experiments/quickstart.yaml")
    parser.add_argument("--plan", default="quickstart-knee", help="a plan file, or a shipped plan's name")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 50], help="the step counts to run it at")
    parser.add_argument("--samples", type=int, default=200, help="held-out samples per row")
    parser.add_argument("--searched", type=int, default=2, help="fastest front plans of each search to measure")
    parser.add_argument("--out", default="runs/step-counts", help="folder of the searches")
    args = parser.parse_args()
    print_provenance()
    spec = load_experiment(args)
    plan = shipped_plan(args.plan) if args.plan in shipped_plans() else load_plan(args.plan)
    torch.manual_seed(0)
    adapter = adapter_from_spec(spec.model)
    print(f"{spec.name} on cpu ({torch.get_num_threads()} threads), {spec.sampler.scheduler}, CFG "
          f"{spec.sampler.guidance_scale}; the plan: {args.plan} ({plan.num_steps} steps)")
    searched = {steps: searched_plans(at_steps(spec, steps, args.samples), Path(args.out), args.searched)
                for steps in args.steps}  # every search first: the timed stages then run back to back
    for steps in [plan.num_steps, *args.steps]:
        at = at_steps(spec, steps, args.samples)
        own = steps == plan.num_steps
        label = f"{Path(args.plan).stem}" + ("" if own else f" re-targeted {plan.num_steps} → {steps}")
        rows = {label: retarget_to_steps(plan, adapter, steps), **searched.get(steps, {})}
        result = measure_held_out(adapter, at, rows)
        print(f"\n{steps} steps: {len(result.seed_set.seeds)} held-out samples (seeds {result.seed_set.seeds[0]}…), "
              f"{at.search.refine.latency_repeats} rounds interleaved with dense; {result.seconds:.0f} s")
        print("| row | side | latency ratio (band) | FID | KID | kid_low | rel. L1 to dense | FLOPs ratio |")
        print("|---|---|---|---|---|---|---|---|")
        print_row(DENSE, "", result.metrics[DENSE])
        for name in rows:
            side = "searched" if name in searched.get(steps, {}) else "its own steps" if own else "re-targeted"
            print_row(name, side, result.metrics[name])


if __name__ == "__main__":
    main()
