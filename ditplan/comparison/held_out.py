"""The held-out stage: every side measured on the held-out seed set in the same interleaved rounds,
against the same dense run (:func:`~ditplan.evaluators.measure.measure`, timed), written as one record
(``held_out.yaml``, :class:`~ditplan.rundir.HeldOutRecord`). Everything a report, an export rule or the
README states for a plan reads it.

A resumed run whose sides are the ones the record holds (same names, same plans) keeps the record; any
other set of sides is measured again, whole, so that every figure in it comes from the same rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ditplan.comparison.sides import DENSE, Side
from ditplan.errors import UserError
from ditplan.evaluators.measure import measure
from ditplan.models.family import ModelAdapter
from ditplan.plansearch.records import plan_key
from ditplan.rundir import HeldOutRecord, RunDir, SideResult
from ditplan.spec import ExperimentSpec
from ditplan.strategies.summary import DENSE as DENSE_TEXT
from ditplan.strategies.summary import describe


def _key(side: Side) -> str:
    return plan_key(side.plan) if side.plan is not None else DENSE


def _same_sides(record: HeldOutRecord, sides: Sequence[Side]) -> bool:
    return [(s.name, s.key) for s in record.sides] == [(s.name, _key(s)) for s in sides]


def _check_finite(spec: ExperimentSpec, name: str, values: dict[str, float], samples: int) -> None:
    """Every metric ``search.refine.metrics`` names is a number for side ``name``."""
    bad = [m for m in spec.search.refine.metrics if not math.isfinite(values.get(m, math.nan))]  # type: ignore[union-attr]
    if bad:
        raise UserError(f"held-out {bad[0]} of {name} is not a number on {samples} samples; raise "
                        "search.refine.samples (FID needs more samples than the extractor's feature dimensions)")


def held_out_stage(run: RunDir, spec: ExperimentSpec, adapter: ModelAdapter, sides: Sequence[Side],
                   show_progress: bool = False) -> HeldOutRecord:
    """Measure ``sides`` (dense first) on the held-out seeds, or keep the record of a run that measured
    exactly these; the record is saved in the run directory."""
    refine = spec.search.refine
    if refine is None:
        raise ValueError("the experiment has no search.refine section: no held-out stage is configured")
    found = run.load_held_out()
    if found is not None and _same_sides(found, sides):
        return found
    seed_set = spec.seed_set("held_out")
    plans = {s.name: s.plan for s in sides if s.kind != "dense"}
    result = measure(adapter, spec, plans, seed_set, timed=True, rounds_count=refine.latency_repeats,
                     show_progress=show_progress)
    for side in sides:
        _check_finite(spec, side.name, result.metrics[side.name], len(seed_set.seeds))
    record = HeldOutRecord(
        first_seed=seed_set.seeds[0], samples=len(seed_set.seeds), rounds=refine.latency_repeats,
        seconds=result.seconds, sample_forwards=result.sample_forwards,
        sides=tuple(SideResult(s.name, s.kind, result.metrics[s.name],
                               run.relative(s.plan_file) if s.plan_file is not None else None, s.trial, _key(s),
                               describe(s.plan) if s.plan is not None else DENSE_TEXT)
                    for s in sides))
    run.save_held_out(record)
    return record
