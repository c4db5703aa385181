"""The sides a run compares, as data: dense, greedy (every plan ``greedy/`` holds, whether or not it
warm-started the search), learned (the distinct plans of the search's feasible learned front) and each
baseline the experiment lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna

from ditplan.comparison.baselines import baseline_plan
from ditplan.errors import UserError
from ditplan.evaluators.measure import DENSE
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan
from ditplan.plansearch.records import distinct_plans, learned_front
from ditplan.rundir import RunDir, SideKind
from ditplan.spec import ExperimentSpec


@dataclass(frozen=True)
class Side:
    """One side: its name in tables, its kind, its plan (None: dense), where its plan file is (greedy and
    learned plans) and, for a learned plan, its trial."""

    name: str
    kind: SideKind
    plan: Plan | None
    plan_file: Path | None = None
    trial: int | None = None


def learned_sides(run: RunDir, spec: ExperimentSpec, study: optuna.Study | None) -> list[Side]:
    """The distinct plans of the study's feasible learned front (none without a study)."""
    if study is None:
        return []
    directions = [o.resolved_direction() for o in spec.search.objectives]
    front = learned_front(study, spec.search, directions)
    return [Side(name, "learned", plan, run.search.trial_path(trial.number), trial.number)
            for name, (trial, plan) in distinct_plans(front, run.search).items()]


def run_sides(run: RunDir, spec: ExperimentSpec, adapter: ModelAdapter, study: optuna.Study | None) -> list[Side]:
    """Every side of the run, dense first; two sides of one name are refused in one line."""
    sides = [Side(DENSE, "dense", None)]
    sides += [Side(name, "greedy", plan, run.greedy.path(name)) for name, plan in run.greedy.plans().items()]
    sides += learned_sides(run, spec, study)
    sides += [Side(b.name, "baseline", baseline_plan(adapter, spec, b)) for b in spec.baselines]
    names = [s.name for s in sides]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two sides of this run are named {twice[0]!r}; rename the baseline (baselines[].name)")
    return sides
