"""Studies made by hand for tests: trials recorded through the driver's own parts (study, recorder,
tracker), without Ray."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import optuna

from ditplan.models.adapters import experiment_adapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan
from ditplan.plansearch.driver import dense_on_search_seeds, publish_front, study_tracker
from ditplan.plansearch.recorder import Recorder
from ditplan.plansearch.storage import study_storage
from ditplan.plansearch.study import open_study
from ditplan.rundir import RunDir
from ditplan.spec import ExperimentSpec


class MemoryTracker:
    """A tracker that keeps what it is told in memory (the driver's parts, tested without MLflow)."""

    def __init__(self) -> None:
        self.trials: dict[int, tuple[str, dict]] = {}
        self.hypervolumes: list[tuple[str, int, float]] = []
        self.front: set[int] = set()

    def log_trial(self, number, state, params, metrics, plan_path):  # noqa: ANN001, ANN201
        self.trials[number] = (state, dict(metrics))

    def log_hypervolume(self, value, step, key="hypervolume"):  # noqa: ANN001, ANN201
        self.hypervolumes.append((key, step, value))

    def logged_trials(self) -> set[int]:
        return set(self.trials)

    def mark_front(self, numbers) -> None:  # noqa: ANN001
        self.front = set(numbers)

    def log_front(self, png, html, rows) -> None:  # noqa: ANN001
        pass


@dataclass
class HandStudy:
    spec: ExperimentSpec
    run: RunDir
    study: optuna.Study
    recorder: Recorder

    def record(self, name: str, plan: Plan, values: Mapping[str, float]) -> optuna.Trial:
        """A trial named ``name`` that ran ``plan`` and measured ``values``, recorded as the driver does."""
        trial = self.study.ask()
        trial.set_user_attr("name", name)
        self.recorder.complete(trial, plan, values)
        return trial

    def publish(self) -> tuple[list, list[dict]]:
        return publish_front(self.study, self.spec, self.recorder.tracker)


def hand_study(spec: ExperimentSpec, run: RunDir, dense: Mapping[int, Mapping[str, float]] | None = None,
               tracker: object = None) -> HandStudy:
    """A fresh study of ``spec`` in ``run``'s search folder, tracked by ``tracker`` (default: its MLflow store);
    ``dense``: dense's metrics by search fidelity (default: measured, as the driver does)."""
    storage = study_storage(spec, run.search)
    study = open_study(spec, run.search, storage, resume=False, driver="test")
    if dense is None:
        dense = dense_on_search_seeds(experiment_adapter(spec), spec).values
    tracker = tracker if tracker is not None else study_tracker(spec, run.search)
    recorder = Recorder(study, spec, run.search, dense, tracker, lambda *_: None)
    return HandStudy(spec, run, study, recorder)


def uniform_after_dense(spec: ExperimentSpec, method: str) -> Plan:
    """A plan whose first step is dense and every later cell ``method``."""
    target = plan_target(experiment_adapter(spec), spec.sampler.settings())
    grid = (("full",) * target.num_layers,) + ((method,) * target.num_layers,) * (target.num_steps - 1)
    return Plan(target, grid)


def names(trials: Iterable) -> list[str]:
    return sorted(t.user_attrs["name"] for t in trials)
