"""Recording a trial's outcome: plan file first, then COMPLETE (or FAIL) in the study, then the tracker.

A crash between any two steps is repaired on resume (:meth:`Recorder.repair`): a COMPLETE trial gets its
plan file back, a failed one loses a file it may have left, and the tracker learns of every finished trial.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from ditplan.evaluators.cost import FLOPS_COUNT
from ditplan.plan import Plan, library_versions
from ditplan.plansearch.attrs import ERROR, METRICS_ATTR, PROMOTED
from ditplan.plansearch.records import (
    feasible_hypervolume,
    reference_point,
    samples_of,
    scored,
    trial_metrics,
)
from ditplan.plansearch.storage import counts
from ditplan.rundir import SearchDir
from ditplan.spec import ExperimentSpec

PlanFor = Callable[[Any, Mapping[str, Any]], "Plan | None"]  # (trial, its user attributes) → its plan


class TrialTracker(Protocol):
    """What the recorder tells a tracker (:class:`~ditplan.plansearch.tracking.Tracker`, MLflow)."""

    def log_trial(self, number: int, state: str, params: Mapping[str, Any], metrics: Mapping[str, float],
                  plan_path: Any) -> Any: ...

    def log_hypervolume(self, value: float, step: int, key: str = "hypervolume") -> None: ...

    def logged_trials(self) -> set[int]: ...


class Recorder:
    """Records the trials of one study. ``dense``: dense's metrics on the first K search samples, by K
    (what a bound relative to dense compares a trial with); ``plan_for``: rebuilds a trial's plan."""

    def __init__(self, study: optuna.Study, spec: ExperimentSpec, search_dir: SearchDir,
                 dense: Mapping[int, Mapping[str, float]], tracker: TrialTracker, plan_for: PlanFor) -> None:
        self.study, self.spec, self.search_dir = study, spec, search_dir
        self.dense, self.tracker, self.plan_for = dense, tracker, plan_for
        self.objectives = [o.metric for o in spec.search.objectives]
        self.directions = [o.resolved_direction() for o in spec.search.objectives]

    def save_plan(self, number: int, plan: Plan, values: Mapping[str, float], samples: int) -> Any:
        """The trial's plan file, with its metrics on the first ``samples`` search seeds (written atomically)."""
        search = self.spec.search
        plan = plan.with_provenance(search=plan.provenance.get("search", f"optuna-{search.sampler}"),
                                    study=self.spec.name, trial=number,
                                    metrics={k: float(v) for k, v in values.items()},
                                    evaluated_on={"set": "search", "first_seed": self.spec.workload.first_seeds()["search"],
                                                  "samples": samples},
                                    flops_count=FLOPS_COUNT, versions=library_versions())
        return self.search_dir.save_trial(number, plan)

    def tell(self, trial: optuna.Trial, values: Mapping[str, float]) -> None:
        dense = self.dense[samples_of(trial, self.spec.search)]
        for constraint in self.spec.search.constraints:
            trial.set_constraint(constraint.metric, constraint.violation(values[constraint.metric], dense[constraint.metric]))
        self.study.tell(trial, [values[o] for o in self.objectives])

    def complete(self, trial: optuna.Trial, plan: Plan, values: Mapping[str, float]) -> None:
        """Plan file first, then COMPLETE in the study, then the tracker: a crash between any two is repaired."""
        try:
            trial.set_user_attr(METRICS_ATTR, {k: float(v) for k, v in values.items()})
            path = self.save_plan(trial.number, plan, values, samples_of(trial, self.spec.search))
            self.tell(trial, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # found stale by another driver meanwhile, and queued again there
        self.tracker.log_trial(trial.number, "COMPLETE", trial.params, values, path)
        self._log_hypervolume(trial)

    def fail(self, trial: optuna.Trial, error: str) -> None:
        try:
            trial.set_user_attr(ERROR, error)
            self.study.tell(trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        self.tracker.log_trial(trial.number, "FAIL", trial.params, {}, None)
        self._log_hypervolume(trial)

    def _log_hypervolume(self, trial: optuna.Trial) -> None:
        """The hypervolume of the trials at ``trial``'s fidelity, at its number (with screening, the screened
        trials' as ``hypervolume_screened``)."""
        promoted = PROMOTED in trial.user_attrs
        final = self.spec.search.screening is None or promoted
        done = scored(self.study, self.spec.search, promoted=promoted)
        self.tracker.log_hypervolume(feasible_hypervolume(done, self.directions, reference_point(self.spec)),
                                     trial.number, "hypervolume" if final else "hypervolume_screened")

    def repair(self, tracker: bool) -> None:
        """Make good what a crash (or another driver) left: a plan file for every COMPLETE trial, none for a
        failed one and, with ``tracker``, every finished trial in the tracker."""
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state == TrialState.COMPLETE and not self.search_dir.trial_path(trial.number).exists():
                self._rewrite_plan(trial)
            elif trial.state == TrialState.FAIL:
                self.search_dir.trial_path(trial.number).unlink(missing_ok=True)  # scored, saved, never told: run again
        if not tracker:
            return
        logged = self.tracker.logged_trials()
        for trial in trials:
            if counts(trial) and trial.number not in logged:
                done = trial.state == TrialState.COMPLETE
                self.tracker.log_trial(trial.number, trial.state.name, trial.params,
                                       trial_metrics(trial, self.objectives) if done else {},
                                       self.search_dir.trial_path(trial.number) if done else None)

    def _rewrite_plan(self, trial: FrozenTrial) -> None:
        try:
            plan = self.plan_for(optuna.trial.FixedTrial(trial.params, trial.number), trial.user_attrs)
        except ValueError:  # parameters this space does not have
            plan = None
        if plan is None:
            warnings.warn(f"trial {trial.number} of study {self.spec.name!r} is complete but its plan cannot be "
                          f"rebuilt here (warm-start plan {trial.user_attrs.get('name')!r} not given, or another space)")
            return
        self.save_plan(trial.number, plan, trial_metrics(trial, self.objectives), samples_of(trial, self.spec.search))
