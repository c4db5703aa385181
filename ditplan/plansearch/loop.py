"""The ask / submit / tell loop of one driver.

It asks the study for a trial, gets the trial's plan, submits it to a pool of evaluations (Ray tasks on a
cluster; anything with the same four methods in tests) and records each outcome, until the study holds
the trials asked for, whichever drivers ran them. It knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from ditplan.plan import Plan
from ditplan.plansearch.attrs import DRIVER, METRICS_ATTR, PROMOTED, REPEAT, WARM
from ditplan.plansearch.recorder import PlanFor, Recorder
from ditplan.plansearch.records import (
    earlier_with_params,
    failed_learned,
    feasible_front,
    is_feasible_trial,
    scored,
)
from ditplan.plansearch.storage import (
    Heartbeats,
    ask,
    counts,
    interrupt,
    recover_interrupted,
    tally,
)
from ditplan.spec import SearchSpec


class Pool(Protocol):
    """Evaluations in flight (:class:`~ditplan.plansearch.ray_tasks.TaskPool`): ``wait`` gives
    :class:`~ditplan.plansearch.ray_tasks.Outcome` s, each with the item it was submitted with."""

    def __len__(self) -> int: ...

    def submit(self, ref: Any, item: Any) -> None: ...

    def wait(self, max_wait_s: float) -> list[Any]: ...

    def cancel_all(self) -> list[Any]: ...


Submit = Callable[[optuna.Trial, Plan], Any]  # a trial and its plan → a handle the pool waits on


class TrialLoop:
    """One driver's loop over the study: ``submit`` starts an evaluation, ``recorder`` records outcomes."""

    def __init__(self, study: optuna.Study, search: SearchSpec, storage: Any, recorder: Recorder, plan_for: PlanFor,
                 driver: str) -> None:
        self.study, self.search, self.storage = study, search, storage
        self.recorder, self.plan_for, self.driver = recorder, plan_for, driver
        self.directions = recorder.directions

    def run(self, learned: int, workers: int, pool: Pool, submit: Submit, bar: Any) -> int:
        """Ask, submit, record until the study holds ``learned`` finished learned trials (warm-start and
        promoted trials on top); returns the number of failed learned trials. Trials still in flight when
        the loop stops are cancelled and queued to run again."""
        try:
            with Heartbeats(self.storage) as beats:
                self._loop(pool, beats, bar, learned, workers, submit)
        finally:
            for trial, _ in pool.cancel_all():
                interrupt(self.study, trial, self.search)
        return failed_learned(self.study)

    def _loop(self, pool: Pool, beats: Heartbeats, bar: Any, learned: int, workers: int, submit: Submit) -> None:
        poll = self.search.heartbeat_interval_s
        while True:
            recover_interrupted(self.study, self.storage, self.search, at_start=False)
            state = tally(self.study.get_trials(deepcopy=False), learned)
            while len(pool) < workers and state.free:  # a repeat completes at once: its slot takes the next trial
                self._start(pool, beats, submit, bar)
                state = tally(self.study.get_trials(deepcopy=False), learned)
            if not len(pool):
                if state.done:
                    return
                time.sleep(poll)  # the last trials run on other drivers
                continue
            for outcome in pool.wait(poll):
                trial, plan = outcome.item
                beats.discard(trial)
                if outcome.error is None:
                    self.recorder.complete(trial, plan, outcome.result)
                else:
                    self.recorder.fail(trial, outcome.error)
                self.progress(bar)

    def _start(self, pool: Pool, beats: Heartbeats, submit: Submit, bar: Any) -> None:
        """Ask for a trial and submit its plan; a learned trial whose parameters an earlier complete trial had
        takes that trial's values at once (the same plan, the same search seeds: the same values) and
        spends no forwards — samplers over categorical spaces propose repeats often."""
        trial = ask(self.study)
        beats.add(trial)
        trial.set_user_attr(DRIVER, self.driver)
        plan = self.plan_for(trial, trial.user_attrs)
        if plan is None:
            beats.discard(trial)
            self.recorder.fail(trial, f"warm-start plan {trial.user_attrs.get('name')!r} was not given to this driver")
            return
        earlier = None if WARM in trial.user_attrs or PROMOTED in trial.user_attrs else earlier_with_params(self.study, trial.params)
        if earlier is None:  # NOTE: warm-start plans always run: each is reported by name; a promoted trial has the
            # parameters of its screened trial and is scored on more samples
            pool.submit(submit(trial, plan), (trial, plan))
            return
        beats.discard(trial)
        trial.set_user_attr(REPEAT, earlier.number)
        self.recorder.complete(trial, plan, earlier.user_attrs[METRICS_ATTR])
        self.progress(bar)

    def progress(self, bar: Any) -> None:
        """One more trial on ``bar``, with the failed count, the front's size and the best of each objective."""
        screened = scored(self.study, self.search, promoted=False)
        bar.update(1, failed=sum(t.state == TrialState.FAIL and counts(t) for t in self.study.get_trials(deepcopy=False)),
                   front=len(feasible_front(screened, self.directions)), **self._best(screened))

    def _best(self, screened: list[optuna.trial.FrozenTrial]) -> dict[str, str]:
        done = [t for t in screened if is_feasible_trial(t)]
        if not done:
            return {}
        objectives = self.recorder.objectives
        return {f"best_{o}": f"{(min if d == 'minimize' else max)(t.values[i] for t in done):.3g}"
                for i, (o, d) in enumerate(zip(objectives, self.directions))}
