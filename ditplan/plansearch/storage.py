"""Where a study lives and how drivers share it.

One machine: a journal file in the run directory, one driver. A cluster: an RDB URL
(``search.storage``, PostgreSQL) that several drivers share. There every driver records a heartbeat
per trial it runs (a background thread: a driver busy logging never looks dead) and Optuna's
heartbeat mechanism finds the trials of a dead driver: silent for the grace period, they are failed
and queued to run again by :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`. A journal
study has one driver, so on resume every RUNNING trial is such a trial.

A trial cut off that way stays FAIL without an ``error`` attribute ("interrupted") and is not counted
against the budget; its re-run is. A trial whose evaluation failed has an ``error``.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import optuna
import sqlalchemy
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ditplan.errors import UserError
from ditplan.plansearch.attrs import ERROR, PROMOTED, WARM
from ditplan.rundir import SearchDir
from ditplan.spec import ExperimentSpec, SearchSpec


@contextmanager
def _quiet_experimental() -> Iterator[None]:
    """NOTE: Optuna marks its heartbeat API experimental and warns when ``ask`` runs outside
    ``optimize`` with a heartbeat; this driver records the heartbeats itself (:class:`Heartbeats`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def _retry(search: SearchSpec) -> RetryHeartbeatStaleTrialCallback:
    with _quiet_experimental():
        return RetryHeartbeatStaleTrialCallback(max_retry=search.max_retries)


def study_storage(spec: ExperimentSpec, search_dir: SearchDir) -> BaseStorage:
    """The study's storage: ``search.storage`` (an RDB URL, heartbeats on) or the search folder's journal."""
    search = spec.search
    if not search.storage:
        search_dir.root.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(search_dir.journal)))
    try:
        return _rdb_storage(search)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot open search.storage {_shown(search.storage)!r}: {reason}") from None


def _shown(url: str) -> str:
    """The URL without its password."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return "(not a database URL)"


def _rdb_storage(search: SearchSpec, attempts: int = 5) -> RDBStorage:
    for attempt in range(attempts):
        try:
            with _quiet_experimental():
                return RDBStorage(search.storage, heartbeat_interval=search.heartbeat_interval_s,
                                  grace_period=search.grace_period_s, heartbeat_stale_trial_callback=_retry(search))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # NOTE: drivers started together on an empty database race to create Optuna's tables; the
            # losers find them made on the next try
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def study_exists(storage: BaseStorage, name: str) -> bool:
    return name in optuna.get_all_study_names(storage)


def refuse_existing_study(spec: ExperimentSpec, search_dir: SearchDir) -> None:
    """A study of ``spec`` already in its storage is refused in one line: it is continued with --resume only."""
    if load_finished_study(spec, search_dir) is not None:
        raise UserError(f"study {spec.name!r} already exists in {search_dir.root}; pass --resume to continue it or "
                        "use another output dir")


def load_finished_study(spec: ExperimentSpec, search_dir: SearchDir) -> optuna.Study | None:
    """The study of ``spec`` as its search left it, or None when no search ran there (a journal is not
    created by looking for it)."""
    if not spec.search.storage and not search_dir.journal.exists():
        return None
    storage = study_storage(spec, search_dir)
    if not study_exists(storage, spec.name):
        return None
    return optuna.load_study(study_name=spec.name, storage=storage)


def is_shared(storage: BaseStorage) -> bool:
    """Whether several drivers may run this study at once (an RDB with heartbeats)."""
    return isinstance(storage, RDBStorage) and storage.heartbeat_interval is not None


def sampler_seed(seed: int, trials_in_study: int, driver: str) -> int:
    """A resumed driver (more trials in the study) and a second driver (another ``driver`` id) draw
    new proposals; a fresh single-driver study stays reproducible from ``seed`` (``driver`` empty)."""
    entropy = [seed, trials_in_study, *(ord(c) for c in driver)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def ask(study: optuna.Study, fixed: dict | None = None) -> optuna.Trial:
    with _quiet_experimental():
        return study.ask(fixed)


def interrupt(study: optuna.Study, trial: optuna.Trial | FrozenTrial, search: SearchSpec) -> None:
    """A trial cut off in flight (its driver stopped or died): FAIL without an error, queued to run again."""
    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # another driver already gave it up (and queued its re-run)
    _retry(search)(study, study.get_trials(deepcopy=False)[trial.number])


def recover_interrupted(study: optuna.Study, storage: BaseStorage, search: SearchSpec, at_start: bool) -> None:
    """Queue again the trials a dead driver left RUNNING: the heartbeat-stale ones of a shared study
    (checked on every call), every RUNNING one of a single-driver (journal) study (``at_start`` only)."""
    if is_shared(storage):
        with _quiet_experimental():
            optuna.storages.fail_stale_trials(study)
    elif at_start:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            interrupt(study, trial, search)


def is_interrupted(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and ERROR not in trial.user_attrs


def counts(trial: FrozenTrial) -> bool:
    """Whether a trial spends budget: complete, or failed by its own evaluation (not interrupted)."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and ERROR in trial.user_attrs)


@dataclass(frozen=True)
class Tally:
    """Where a study stands, over all its drivers: ``finished`` trials that spend budget, ``running`` ones,
    the ``target`` (the learned trials asked for plus every warm-start and promoted trial queued, running
    or finished) and how many are ``free`` to start: the learned trials still missing and every queued
    warm-start or promoted trial (learned trials beyond the count, as two drivers starting the last one
    at once leave, take no queued trial's place)."""

    finished: int
    running: int
    target: int
    free: int

    @property
    def done(self) -> bool:
        """Nothing left to start and nothing running, on any driver."""
        return self.free == 0 and self.running == 0


def _on_top(trial: FrozenTrial) -> bool:
    """A trial run on top of the learned ones: a warm-start plan, or a screened trial scored again."""
    return WARM in trial.user_attrs or PROMOTED in trial.user_attrs


def tally(trials: Sequence[FrozenTrial], learned: int) -> Tally:
    started = [counts(t) or t.state == TrialState.RUNNING for t in trials]
    queued = [t.state == TrialState.WAITING for t in trials]
    on_top = sum(_on_top(t) and (s or q) for t, s, q in zip(trials, started, queued))
    missing = max(0, learned - sum(s and not _on_top(t) for t, s in zip(trials, started)))
    return Tally(sum(counts(t) for t in trials), sum(t.state == TrialState.RUNNING for t in trials), learned + on_top,
                 missing + sum(q and _on_top(t) for t, q in zip(trials, queued)))


class Heartbeats:
    """Records a heartbeat for every trial this driver runs, every ``heartbeat_interval`` seconds, in a
    background thread; does nothing for a single-driver storage. Use as a context manager."""

    def __init__(self, storage: BaseStorage) -> None:
        self._storage = storage if is_shared(storage) else None
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ditplan-heartbeats")

    def add(self, trial: optuna.Trial) -> None:
        """Called right after ``ask``: a trial with no heartbeat yet is never found stale."""
        if self._storage is not None:
            trial_id = trial._trial_id  # NOTE: Optuna's heartbeat API takes storage trial ids
            self._storage.record_heartbeat(trial_id)
            with self._lock:
                self._ids.add(trial_id)

    def discard(self, trial: optuna.Trial) -> None:
        with self._lock:
            self._ids.discard(trial._trial_id)

    def _beat(self) -> None:
        assert self._storage is not None
        while not self._stop.wait(self._storage.heartbeat_interval):
            with self._lock:
                ids = list(self._ids)
            for trial_id in ids:
                self._storage.record_heartbeat(trial_id)

    def __enter__(self) -> Heartbeats:
        if self._storage is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
