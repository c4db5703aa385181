"""Promotion (``search.screening``): the best screened learned trials are scored again on every search sample.

They join the study again as trials of their own with the parameters of the screened trial, queued for
the trial loop (heartbeats, retries and resume as for any trial). Fronts are chosen from the promoted
trials only: at full fidelity, never on a mix of the two.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from ditplan.plansearch.attrs import NAME, PROMOTED, PROPOSAL
from ditplan.plansearch.pareto import best_by_rank
from ditplan.plansearch.records import (
    distinct_plans,
    is_feasible_trial,
    is_warm,
    scored,
)
from ditplan.plansearch.storage import counts
from ditplan.rundir import SearchDir
from ditplan.spec import SearchSpec


def to_promote(study: optuna.Study, search: SearchSpec, directions: list[str], search_dir: SearchDir) -> list[FrozenTrial]:
    """The screened trials to promote now: :func:`~ditplan.plansearch.pareto.best_by_rank` of the feasible learned
    ones, each distinct plan once, less those promoted before (a resumed study) unless their promoted trial
    was lost (interrupted past its retries). Warm-start plans are never promoted: they are their own side."""
    screening = search.screening
    if screening is None:
        return []
    feasible = [t for t in scored(study, search, promoted=False) if is_feasible_trial(t) and not is_warm(t)
                and search_dir.trial_path(t.number).exists()]
    screened = [t for t, _ in distinct_plans(feasible, search_dir).values()]  # other parameters, the same plan: once
    if not screened:
        return []
    claimed = {t.user_attrs[PROMOTED] for t in study.get_trials(deepcopy=False) if PROMOTED in t.user_attrs
               and (counts(t) or t.state in (TrialState.RUNNING, TrialState.WAITING))}
    best = [screened[i] for i in best_by_rank(np.array([t.values for t in screened]), directions, screening.promote)]
    return [t for t in best if t.number not in claimed]


def promote(study: optuna.Study, search: SearchSpec, directions: list[str], search_dir: SearchDir) -> bool:
    """Queue the trials :func:`to_promote` names; True when any is queued."""
    todo = to_promote(study, search, directions, search_dir)
    for trial in todo:
        kept = {k: v for k, v in trial.user_attrs.items() if k in (NAME, PROPOSAL)}
        study.enqueue_trial(trial.params, user_attrs={**kept, PROMOTED: trial.number})
    return bool(todo)
