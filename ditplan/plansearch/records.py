"""What a study records of its trials, and how it is read back.

Every trial's state lives in Optuna storage: its parameters and values, and these user attributes.
The readers here (complete trials, fidelities, the feasible front, distinct plans, trial records) are
plain functions of the study and its search folder, so the driver, the held-out stage and the report
read the same facts the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ditplan.errors import UserError
from ditplan.plan import Plan
from ditplan.plansearch.attrs import (
    ERROR,
    GIVEN,
    METRICS_ATTR,
    NAME,
    PROMOTED,
    REPEAT,
    WARM,
)
from ditplan.plansearch.pareto import hypervolume, pareto_mask
from ditplan.registry import METRICS
from ditplan.rundir import SearchDir
from ditplan.spec import ExperimentSpec, SearchSpec
from ditplan.strategies.apply import sparse_layout


def trial_name(trial: FrozenTrial) -> str:
    return trial.user_attrs.get(NAME, f"trial-{trial.number}")


def is_warm(trial: FrozenTrial) -> bool:
    """A warm-start trial: a plan given to the study, not one the search found."""
    return WARM in trial.user_attrs


def complete(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, each plan once: a repeat (same parameters as an earlier trial) is left out."""
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and REPEAT not in t.user_attrs]


def scored(study: optuna.Study, search: SearchSpec, promoted: bool) -> list[FrozenTrial]:
    """The complete trials of one fidelity: with ``search.screening``, the promoted ones (scored on every
    search sample: what fronts are chosen from) or the screened ones; without it, all of them."""
    done = complete(study)
    return done if search.screening is None else [t for t in done if (PROMOTED in t.user_attrs) == promoted]


def failed_learned(study: optuna.Study) -> int:
    """The learned trials whose own evaluation failed (interrupted ones spend no budget and are not counted)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if ERROR in t.user_attrs
               and not is_warm(t))


def samples_of(trial: FrozenTrial | optuna.Trial, search: SearchSpec) -> int:
    """The search samples ``trial`` is scored on."""
    return search.samples if PROMOTED in trial.user_attrs else search.trial_samples()


def is_feasible_trial(trial: FrozenTrial) -> bool:
    """Every constraint the trial was told holds (Optuna's rule: each value ≤ 0)."""
    return all(v <= 0 for v in trial.constraints.values())


def feasible_front(trials: Sequence[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    """The Pareto front of the feasible ``trials``; infeasible ones are never on it."""
    feasible = [t for t in trials if is_feasible_trial(t)]
    if not feasible:
        return []
    mask = pareto_mask(np.array([t.values for t in feasible]), directions)
    return [t for t, keep in zip(feasible, mask) if keep]


def feasible_hypervolume(trials: Sequence[FrozenTrial], directions: list[str], reference: list[float]) -> float:
    feasible = [t.values for t in trials if is_feasible_trial(t)]
    return hypervolume(np.array(feasible), directions, reference) if feasible else 0.0


def learned_front(study: optuna.Study, search: SearchSpec, directions: list[str]) -> list[FrozenTrial]:
    """The feasible front of the learned trials at the final fidelity: what the search found (warm-start
    plans are their own side, never on it)."""
    return feasible_front([t for t in scored(study, search, promoted=True) if not is_warm(t)], directions)


def reference_point(spec: ExperimentSpec) -> list[float]:
    """The hypervolume reference: the experiment's, or each objective's default."""
    if spec.search.reference_point is not None:
        return list(spec.search.reference_point)
    missing = [o.metric for o in spec.search.objectives if METRICS[o.metric].reference is None]
    if missing:
        raise UserError(f"objective {missing[0]!r} has no default hypervolume reference; set search.reference_point")
    return [METRICS[o.metric].reference for o in spec.search.objectives]  # type: ignore[misc]


def trial_metrics(trial: FrozenTrial, objectives: Sequence[str]) -> dict[str, float]:
    """Every search-seed metric of a complete trial (its objective values when none were recorded)."""
    return dict(trial.user_attrs.get(METRICS_ATTR) or zip(objectives, trial.values))


def earlier_with_params(study: optuna.Study, params: dict[str, Any]) -> FrozenTrial | None:
    """An earlier complete trial whose values are those of the plan ``params`` give: not a promoted one
    (scored on more samples), nor a warm-start plan run whole (its parameters are a projection)."""
    if not params:  # a warm-start plan the space cannot express
        return None
    return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.params == params and METRICS_ATTR in t.user_attrs
                 and PROMOTED not in t.user_attrs and GIVEN not in t.user_attrs), None)


def plan_key(plan: Plan) -> str:
    """What a plan runs, without where it came from: identical plans proposed twice share it, and so do
    pruning curves of different families that give the same tokens at every step."""
    data = {k: v for k, v in plan.to_dict().items() if k != "provenance"}
    layout = sparse_layout(plan)
    if layout is not None:
        tokens = [layout.tokens_by_block(step, plan.num_steps, plan.num_layers, plan.target.num_tokens)
                  for step in range(plan.num_steps)]
        data["sparse"] = {**data["sparse"], "curve": tokens}
    return json.dumps(data, sort_keys=True)


def distinct_plans(trials: Sequence[FrozenTrial], search_dir: SearchDir) -> dict[str, tuple[FrozenTrial, Plan]]:
    """The first trial (by name) of every distinct plan among ``trials``: a sampler that proposes the
    same plan again costs one measurement, not two."""
    seen: set[str] = set()
    out = {}
    for trial in trials:
        plan = search_dir.load_trial(trial.number)
        key = plan_key(plan)
        if key not in seen:
            seen.add(key)
            out[trial_name(trial)] = (trial, plan)
    return out


@dataclass(frozen=True)
class TrialRecord:
    """One complete trial as reports read it: its search-seed ``metrics`` on ``samples`` search samples,
    whether it met the constraints, its plan file, and where it came from (``warm``: the source of a
    warm-start plan, e.g. ``greedy``; None for a learned trial)."""

    number: int
    name: str
    warm: str | None
    metrics: dict[str, float]
    samples: int
    feasible: bool
    promoted: bool
    started: datetime | None
    completed: datetime | None
    plan_path: Path


def trial_records(study: optuna.Study, search: SearchSpec, search_dir: SearchDir, objectives: Sequence[str]
                  ) -> list[TrialRecord]:
    """Every complete trial of ``study`` with a plan file in ``search_dir`` (repeats left out)."""
    return [TrialRecord(t.number, trial_name(t), t.user_attrs.get(WARM), trial_metrics(t, objectives),
                        samples_of(t, search), is_feasible_trial(t), PROMOTED in t.user_attrs, t.datetime_start,
                        t.datetime_complete, search_dir.trial_path(t.number))
            for t in complete(study) if search_dir.trial_path(t.number).exists()]
