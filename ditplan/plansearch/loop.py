"""The ask / submit / tell loop of one driver.

It asks the study for a batch of trials (``search.batch``), gets each trial's plan, submits them to a pool
of evaluations (Ray tasks on a cluster; anything with the same four methods in tests) as workers free up
and records each outcome; the next batch is asked only when the whole batch is recorded. So every ask sees
the same finished trials whatever the number of workers and the order they finish in, and a seeded
sampler proposes the same trials: one driver's search reproduces (latencies aside). It goes on until the
study holds the trials asked for, whichever drivers ran them. It knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import optuna
from optuna.trial import TrialState

from ditplan.plan import Plan
from ditplan.plansearch.attrs import DRIVER, GIVEN, METRICS_ATTR, PROMOTED, REPEAT, WARM
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
Asked = tuple[optuna.Trial, Plan]


@dataclass
class Batch:
    """The trials of one ask not yet recorded: ``waiting`` to be submitted (in trial order), and ``followers``,
    by the number of the trial of the same batch whose parameters they drew (they take its outcome)."""

    waiting: list[Asked] = field(default_factory=list)
    followers: dict[int, list[Asked]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.waiting or self.followers)

    def unrecorded(self) -> list[Asked]:
        return [*self.waiting, *(a for group in self.followers.values() for a in group)]


def _runs_whole(trial: optuna.Trial) -> bool:
    """A trial evaluated whatever earlier trial drew its parameters: a warm-start plan (each is reported by
    name; one the space cannot express has projected parameters) or a promoted one (scored on more samples)."""
    return any(attr in trial.user_attrs for attr in (WARM, PROMOTED, GIVEN))


class TrialLoop:
    """One driver's loop over the study: ``submit`` starts an evaluation, ``recorder`` records outcomes."""

    def __init__(self, study: optuna.Study, search: SearchSpec, storage: Any, recorder: Recorder, plan_for: PlanFor,
                 driver: str) -> None:
        self.study, self.search, self.storage = study, search, storage
        self.recorder, self.plan_for, self.driver = recorder, plan_for, driver
        self.directions = recorder.directions

    def run(self, learned: int, workers: int, pool: Pool, submit: Submit, bar: Any) -> int:
        """Ask, submit, record until the study holds ``learned`` finished learned trials (warm-start and
        promoted trials on top); returns the number of failed learned trials. Trials still in flight or
        asked and not yet recorded when the loop stops are given up and queued to run again."""
        batch = Batch()
        try:
            with Heartbeats(self.storage) as beats:
                self._loop(pool, beats, bar, learned, workers, submit, batch)
        finally:
            for trial, _ in [*pool.cancel_all(), *batch.unrecorded()]:
                interrupt(self.study, trial, self.search)
        return failed_learned(self.study)

    def _loop(self, pool: Pool, beats: Heartbeats, bar: Any, learned: int, workers: int, submit: Submit,
              batch: Batch) -> None:
        poll = self.search.heartbeat_interval_s
        while True:
            recover_interrupted(self.study, self.storage, self.search, at_start=False)
            if not len(pool) and not batch:  # the batch is recorded: the next one sees all of it
                state = tally(self.study.get_trials(deepcopy=False), learned)
                if state.free:
                    self._ask_batch(min(self.search.batch, state.free), beats, bar, batch)
                    continue  # a batch of repeats only (recorded at once): the next batch
                if state.done:
                    return
                time.sleep(poll)  # the last trials run on other drivers
                continue
            while len(pool) < workers and batch.waiting:
                trial, plan = batch.waiting.pop(0)
                pool.submit(submit(trial, plan), (trial, plan))
            for outcome in pool.wait(poll):
                trial, plan = outcome.item
                for follower, its_plan in [(trial, plan), *batch.followers.pop(trial.number, [])]:
                    beats.discard(follower)
                    if follower is not trial:
                        follower.set_user_attr(REPEAT, trial.number)
                    if outcome.error is None:
                        self.recorder.complete(follower, its_plan, outcome.result)
                    else:
                        self.recorder.fail(follower, outcome.error)
                    self.progress(bar)

    def _ask_batch(self, size: int, beats: Heartbeats, bar: Any, batch: Batch) -> None:
        """Ask ``size`` trials at once into ``batch``. A learned trial whose parameters an earlier complete trial
        had takes that trial's values at once (the same plan, the same search seeds: the same values) and spends
        no forwards — samplers over categorical spaces propose repeats often; one whose parameters a trial of
        the same batch drew follows it and takes its outcome."""
        for _ in range(size):
            trial = ask(self.study)
            beats.add(trial)
            trial.set_user_attr(DRIVER, self.driver)
            plan = self.plan_for(trial, trial.user_attrs)
            if plan is None:
                beats.discard(trial)
                self.recorder.fail(trial, f"warm-start plan {trial.user_attrs.get('name')!r} was not given to this driver")
                continue
            if _runs_whole(trial) or not trial.params:
                batch.waiting.append((trial, plan))
                continue
            earlier = earlier_with_params(self.study, trial.params)
            if earlier is not None:
                beats.discard(trial)
                trial.set_user_attr(REPEAT, earlier.number)
                self.recorder.complete(trial, plan, earlier.user_attrs[METRICS_ATTR])
                self.progress(bar)
                continue
            leader = next((t for t, _ in batch.waiting if not _runs_whole(t) and t.params == trial.params), None)
            if leader is None:
                batch.waiting.append((trial, plan))
            else:
                batch.followers.setdefault(leader.number, []).append((trial, plan))

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
