"""MLflow tracking of a study, from the driver only: a parent run per study, a child run per trial,
hypervolume stepped by trial, the Pareto front as PNG, interactive HTML and JSON rows, and the files
of later stages (held-out record, report) attached to the study's parent run."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from ditplan.rundir import SearchDir

EXPERIMENT = "ditplan"  # the MLflow experiment every study is tracked in
STUDY_TAG = "ditplan.study"
TRIAL_TAG = "ditplan.trial"


def mlflow_key(name: str) -> str:
    """MLflow names allow letters, digits, ``_ - . : /`` and spaces: ``wars+asc.window_size`` → ``wars_asc.window_size``."""
    return re.sub(r"[^\w\-. :/]", "_", name)


class Tracker:
    """One study's runs. Resuming a study finds its parent run by tag instead of starting another."""

    def __init__(
        self, tracking_uri: str, experiment: str, study: str, params: Mapping[str, Any], files: Sequence[Path],
        artifact_location: Path | None = None,
    ) -> None:
        """``artifact_location``: where a new experiment keeps artifacts (for a SQLite store, the run
        directory; MLflow's default would be ./mlruns under whatever directory the driver runs in)."""
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = artifact_location.resolve().as_uri() if artifact_location is not None else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.study = study
        self.parent_id = self._parent_run(params, files)

    def _parents(self) -> list[str]:
        """The study's parent runs, oldest first."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{self.study}'")
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return [r.info.run_id for r in sorted(parents, key=lambda r: (r.info.start_time, r.info.run_id))]

    def _parent_run(self, params: Mapping[str, Any], files: Sequence[Path]) -> str:
        """The study's parent run; made when there is none. Drivers that start together may each make
        one: all then keep the oldest, and a driver whose run lost deletes it."""
        found = self._parents()
        if found:
            return found[0]
        run_id = self.client.create_run(self.experiment_id, run_name=self.study, tags={STUDY_TAG: self.study}).info.run_id
        for key, value in params.items():
            self.client.log_param(run_id, key, str(value)[:6000])
        for path in files:
            self.client.log_artifact(run_id, str(path))
        oldest = self._parents()[0]
        if oldest != run_id:
            self.client.delete_run(run_id)
        return oldest

    def logged_trials(self) -> set[int]:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'")
        return {int(r.data.tags[TRIAL_TAG]) for r in runs if TRIAL_TAG in r.data.tags}

    def log_trial(self, number: int, state: str, params: Mapping[str, Any], metrics: Mapping[str, float], plan_path: Path | None) -> str:
        tags = {"mlflow.parentRunId": self.parent_id, STUDY_TAG: self.study, TRIAL_TAG: str(number), "state": state}
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags=tags)
        run_id = run.info.run_id
        for key, value in params.items():
            self.client.log_param(run_id, mlflow_key(key), str(value))
        for key, value in metrics.items():
            self.client.log_metric(run_id, mlflow_key(key), float(value))
        if plan_path is not None:
            self.client.log_artifact(run_id, str(plan_path))
        self.client.set_terminated(run_id, "FINISHED" if state == "COMPLETE" else "FAILED")
        return run_id

    def log_hypervolume(self, value: float, step: int, key: str = "hypervolume") -> None:
        self.client.log_metric(self.parent_id, key, value, step=step)

    def mark_front(self, numbers: set[int]) -> None:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'")
        for run in runs:
            if TRIAL_TAG in run.data.tags:
                on_front = int(run.data.tags[TRIAL_TAG]) in numbers
                self.client.set_tag(run.info.run_id, "pareto", "true" if on_front else "false")

    def log_front(self, png_figure: Any, html_figure: Any, rows: list[dict[str, Any]]) -> None:
        self.client.log_figure(self.parent_id, png_figure, "pareto_front.png")
        self.client.log_figure(self.parent_id, html_figure, "pareto_front.html")
        self.client.log_dict(self.parent_id, rows, "pareto_front.json")

    def log_metric(self, key: str, value: float) -> None:
        self.client.log_metric(self.parent_id, key, value)

    def finish(self) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED")


def study_tracking_uri(spec: Any, search_dir: SearchDir) -> str:
    """Where a study is tracked: ``search.tracking_uri`` (a server), else SQLite in its search folder."""
    return spec.search.tracking_uri or search_dir.tracking_uri()


def attach_to_study(spec: Any, search_dir: SearchDir, files: Sequence[Path], folder: str) -> None:
    """Attach ``files`` under ``folder`` to the study's parent run (driver-side, like all tracking); a study
    never tracked is left alone."""
    client = MlflowClient(study_tracking_uri(spec, search_dir))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{spec.name}'")
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            for path in files:
                client.log_artifact(run.info.run_id, str(path), artifact_path=folder)

