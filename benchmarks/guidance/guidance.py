"""Guidance on an interval on the embedded model: the unconditional branch of classifier-free guidance skipped at
chosen steps, alone and on top of a learned plan, on an experiment's held-out seeds.

Rows (every one on the same model, sampler and held-out seeds; the first step computes it everywhere, the first two
wherever the row names no step):
- guidance off from a step on (guidance-interval methods: the last steps without guidance), from step 1 on too;
- the unconditional prediction reused, or forecast linearly, between the steps that compute it (every 2nd or 3rd);
- block reuse every other step (training-free) alone, with the unconditional branch reused every 2nd step and with
  guidance off from the middle step on; block reuse at 2 of every 3 steps with guidance off from step 1 on (the
  training-free plans at ≥ 4× FLOPs that the quickstart's search does not keep: rel. L1 to dense above its floor);
- the quickstart's shipped knee plan (a SparseDiT network whose blocks reuse every other step, guidance off at
  chosen steps) as learned, without its guidance part, and with guidance off from the middle or the last-quarter
  step on instead.

Dense and every plan take turns in each of ``refine.latency_repeats`` rounds in one process (what ``ditplan run``
reports from): latency ratio = median over rounds of the plan's time / dense's in the same round (band: min–max).

    python benchmarks/guidance/guidance.py --experiment ditplan/experiments/quickstart.yaml
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
from common import (  # noqa: E402
    add_experiment_arguments,
    family_plans,
    load_experiment,
    measure_held_out,
    print_provenance,
    print_row,
)

from ditplan.evaluators.measure import DENSE  # noqa: E402
from ditplan.models.adapters import adapter_from_spec  # noqa: E402
from ditplan.models.sampling import plan_target  # noqa: E402
from ditplan.plan import Plan, shipped_plan  # noqa: E402
from ditplan.plansearch.space import GuidanceChoices  # noqa: E402

COMPUTED_FIRST = 2  # steps that compute the unconditional branch where a row names no step


def schedule(steps: int, fill: str, every: int = 0, start: int = COMPUTED_FIRST) -> tuple[str, ...]:
    """``fill`` from ``start`` on, the unconditional branch computed every ``every``-th step there (0: never)."""
    return ("full",) * start + tuple(GuidanceChoices.segment(fill, every, start, steps))


def plans(adapter, spec) -> dict[str, Plan]:  # noqa: ANN001
    steps = spec.sampler.num_steps
    dense = Plan.uniform(plan_target(adapter, spec.sampler.settings()))
    out = {f"guidance off from step {start}": replace(dense, guidance=schedule(steps, "off", start=start))
           for start in (1, steps // 2, 3 * steps // 4)}
    for fill in ("reuse", "forecast"):
        for every in (2, 3):
            out[f"unconditional {fill}, computed every {every}"] = replace(dense, guidance=schedule(steps, fill, every))
    fixed = family_plans(adapter, spec, cache_periods=(2, 3))
    reuse = fixed["reuse every other step"][1]
    out["block reuse every other step"] = reuse
    out["block reuse every other step + unconditional reuse, computed every 2"] = replace(
        reuse, guidance=schedule(steps, "reuse", 2))
    out[f"block reuse every other step + guidance off from step {steps // 2}"] = replace(
        reuse, guidance=schedule(steps, "off", start=steps // 2))
    out["block reuse 2 of every 3 steps + guidance off from step 1"] = replace(
        fixed["reuse every 3rd step"][1], guidance=schedule(steps, "off", start=1))
    knee = shipped_plan("quickstart-knee")  # made for the quickstart's model and sampler
    out["quickstart-knee, its guidance part dropped"] = replace(knee, guidance=None)
    out["quickstart-knee (as learned)"] = knee
    for start in (steps // 2, 3 * steps // 4):
        out[f"quickstart-knee, guidance off from step {start} instead"] = replace(
            knee, guidance=schedule(steps, "off", start=start))
    return out


def side(name: str) -> str:
    if name.startswith("quickstart-knee"):
        return "learned"
    return "block caching" if name == "block reuse every other step" else "guidance"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_arguments(parser, default="ditplan/experiments/quickstart.yaml")
    args = parser.parse_args()
    print_provenance()
    spec = load_experiment(args)
    torch.manual_seed(0)
    adapter = adapter_from_spec(spec.model)
    rows = plans(adapter, spec)
    result = measure_held_out(adapter, spec, rows)
    print(f"{spec.name} on cpu ({torch.get_num_threads()} threads): {len(result.seed_set.seeds)} held-out samples "
          f"(seeds {result.seed_set.seeds[0]}…), {spec.search.refine.latency_repeats} rounds interleaved with dense, "
          f"{spec.sampler.num_steps} {spec.sampler.scheduler} steps, CFG {spec.sampler.guidance_scale}; {result.seconds:.0f} s")
    print("| row | side | latency ratio (band) | FID | KID | kid_low | rel. L1 to dense | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print_row(DENSE, "", result.metrics[DENSE])
    for name in rows:
        print_row(name, side(name), result.metrics[name])


if __name__ == "__main__":
    main()
