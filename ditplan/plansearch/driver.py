"""The multi-objective plan search: Optuna ask/tell on the driver, trials evaluated as Ray tasks.

Search state lives in Optuna storage (a journal file in the search folder by default, or an RDB that
several drivers share: :mod:`ditplan.plansearch.storage`), so a killed driver resumes by study name without
losing a completed trial. Its parts, each testable alone: opening and reseeding the study
(:mod:`~ditplan.plansearch.study`), what joins it first (:mod:`~ditplan.plansearch.queue`), the ask / submit / tell
loop (:mod:`~ditplan.plansearch.loop`), the records (:mod:`~ditplan.plansearch.recorder`,
:mod:`~ditplan.plansearch.records`) and promotion (:mod:`~ditplan.plansearch.promotion`). The driver measures
nothing on held-out seeds and writes no report: that is the comparison stage's.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from ditplan.evaluators.measure import dense_values
from ditplan.evaluators.reference import dense_reference
from ditplan.models.adapters import experiment_adapter
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan, library_versions
from ditplan.plansearch.attrs import PROMOTED, REPEAT
from ditplan.plansearch.figures import Axes, scatter_html, scatter_png
from ditplan.plansearch.loop import TrialLoop
from ditplan.plansearch.promotion import promote
from ditplan.plansearch.queue import (
    PlanSource,
    enqueue_proposals,
    enqueue_warm_start,
    proposed_plans,
)
from ditplan.plansearch.ray_tasks import LazyRay, TaskPool, resolve_ray_address
from ditplan.plansearch.recorder import Recorder
from ditplan.plansearch.records import (
    failed_learned,
    feasible_hypervolume,
    is_feasible_trial,
    is_warm,
    learned_front,
    reference_point,
    samples_of,
    scored,
    trial_name,
)
from ditplan.plansearch.space import PlanSpace, experiment_space
from ditplan.plansearch.storage import study_storage, tally
from ditplan.plansearch.study import driver_id, open_study
from ditplan.plansearch.tracking import Tracker, study_tracking_uri
from ditplan.plansearch.trial_task import submitter
from ditplan.plugins import import_plugins
from ditplan.progress import progress_bar
from ditplan.registry import label
from ditplan.rundir import SearchDir
from ditplan.spec import ExperimentSpec


@dataclass
class SearchResult:
    """``front``: the feasible front of the learned trials (at the final fidelity), ``hypervolume`` its
    hypervolume; ``dense``: dense's own metrics on the search samples."""

    study_name: str
    search_dir: SearchDir
    objectives: list[str]
    directions: list[str]
    front: list[FrozenTrial]
    hypervolume: float
    completed: int
    failed: int
    repeats: int = 0  # of the completed: trials that took an earlier trial's values (same parameters), no evaluation
    promoted: int = 0  # with search.screening: trials scored again on every search sample (not in ``completed``)
    dense: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)  # every trial of the final fidelity: name, source, objectives, feasible, on_front


@dataclass
class DenseReference:
    """Dense samples on the first K search samples and dense's own metrics there, by K (the trials' fidelities)."""

    samples: dict[int, torch.Tensor]
    values: dict[int, dict[str, float]]


def dense_on_search_seeds(adapter: ModelAdapter, spec: ExperimentSpec) -> DenseReference:
    """Dense on every fidelity a trial is scored at (all the search samples, and the screening's first ones)."""
    search_set = spec.seed_set("search")
    needed = tuple(sorted({o.metric for o in spec.search.objectives} | {c.metric for c in spec.search.constraints}))
    out = DenseReference({}, {})
    for k in sorted({spec.search.samples, spec.search.trial_samples()}):
        conditions, seeds = search_set.conditions[:k], search_set.seeds[:k]
        out.samples[k] = dense_reference(adapter, spec.sampler.settings(), conditions, seeds, spec.evaluation.cache_dir)
        out.values[k] = dense_values(adapter, spec, out.samples[k], conditions, needed)
    return out


def study_tracker(spec: ExperimentSpec, search_dir: SearchDir) -> Tracker:
    """The study's MLflow tracker, its parent run made (or found) with the experiment's settings."""
    objectives = [o.metric for o in spec.search.objectives]
    params = {"experiment": spec.model_dump_json(), "sampler": spec.search.sampler, "seed": spec.search.seed,
              "objectives": objectives, "reference_point": reference_point(spec), **library_versions()}
    return Tracker(study_tracking_uri(spec, search_dir), "ditplan", spec.name, params, [],
                   artifact_location=None if spec.search.tracking_uri else search_dir.artifacts)


@dataclass
class _Driver:
    """What one driver holds while it runs a study."""

    spec: ExperimentSpec
    search_dir: SearchDir
    space: PlanSpace
    study: optuna.Study
    storage: object
    dense: DenseReference
    tracker: Tracker
    plans: PlanSource
    recorder: Recorder
    driver: str


def _open(spec: ExperimentSpec, search_dir: SearchDir, resume: bool, warm_start: Mapping[str, Plan]) -> _Driver:
    """Everything a driver needs, the search space first: a space it refuses leaves nothing written."""
    adapter = experiment_adapter(spec)
    space = experiment_space(adapter, spec)
    storage = study_storage(spec, search_dir)
    driver = driver_id()
    study = open_study(spec, search_dir, storage, resume, driver)
    dense = dense_on_search_seeds(adapter, spec)
    tracker = study_tracker(spec, search_dir)
    plans = PlanSource(space, warm_start)
    recorder = Recorder(study, spec, search_dir, dense.values, tracker, plans)
    enqueue_warm_start(study, space, warm_start)
    named, measured = proposed_plans(adapter, spec, space, search_dir.proxy)
    if measured is not None:
        tracker.log_metric("proxy_sample_forwards", measured)
    enqueue_proposals(study, space, named)
    return _Driver(spec, search_dir, space, study, storage, dense, tracker, plans, recorder, driver)


def _run_loop(d: _Driver, trials: int, workers: int, plugins: Sequence[str], show_progress: bool, ray: LazyRay) -> None:
    """The trial loop on Ray until the study holds ``trials`` learned trials (Ray is connected only when a
    trial is left to run, here or on another driver)."""
    start = tally(d.study.get_trials(deepcopy=False), trials)
    if start.done:
        return
    ray.connect()
    loop = TrialLoop(d.study, d.spec.search, d.storage, d.recorder, d.plans, d.driver)
    needed = sorted({o.metric for o in d.spec.search.objectives} | {c.metric for c in d.spec.search.constraints})
    submit = submitter(d.spec, d.spec.seed_set("search"), d.dense.samples, needed,
                       lambda trial: samples_of(trial, d.spec.search), plugins)
    with progress_bar(start.target, "search trials", completed=start.finished, enabled=show_progress) as bar:
        loop.run(trials, workers, TaskPool(d.spec.search.trial_timeout_s), submit, bar)


def publish_front(study: optuna.Study, spec: ExperimentSpec, tracker: Tracker) -> tuple[list[FrozenTrial], list[dict]]:
    """The learned front, and every trial of the final fidelity as rows (name, source, objectives, feasible,
    on_front); to MLflow: ``pareto`` tags, the figures and the rows."""
    directions = [o.resolved_direction() for o in spec.search.objectives]
    objectives = [o.metric for o in spec.search.objectives]
    front = learned_front(study, spec.search, directions)
    on_front = {t.number for t in front}
    rows = [{"trial": t.number, "name": trial_name(t), "source": t.user_attrs.get("source", "search"),
             "feasible": is_feasible_trial(t), "on_front": t.number in on_front,
             **{o: v for o, v in zip(objectives, t.values)}} for t in scored(study, spec.search, promoted=True)]
    if rows:
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row["source"], []).append(row)
        axes = Axes(objectives[1], objectives[0], f"{label(objectives[1])} (search seeds)",
                    f"{label(objectives[0])} (search seeds)", f"{spec.name}: trials and the learned front")
        tracker.mark_front(on_front)
        tracker.log_front(scatter_png(groups, axes), scatter_html(groups, axes), rows)
    return front, rows


def run_search(
    spec: ExperimentSpec,
    search_dir: SearchDir | str | Path,
    trials: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    warm_start: Mapping[str, Plan] | None = None,
    plugins: Sequence[str] = (),
    show_progress: bool = True,
    promote_best: bool = True,
) -> SearchResult:
    """Run (or resume) the study of ``spec`` in ``search_dir`` until it holds ``trials`` finished learned
    trials, with the ``warm_start`` plans (by name) queued first; score the best again on every search
    sample (``search.screening``) and publish the learned front. ``promote_best=False``: a helper driver of
    a shared study; it runs trials and leaves promotion to the main driver."""
    address = resolve_ray_address(ray_address)
    search_dir = search_dir if isinstance(search_dir, SearchDir) else SearchDir(Path(search_dir))
    import_plugins(plugins)
    d = _open(spec, search_dir, resume, dict(warm_start or {}))
    d.recorder.repair(tracker=True)
    trials, workers = trials or spec.search.trials, workers or spec.search.workers
    if workers > spec.search.batch:
        warnings.warn(f"workers ({workers}) above search.batch ({spec.search.batch}): at most {spec.search.batch} trials "
                      f"run at once; raise search.batch to keep every worker busy")
    with LazyRay(address) as ray:
        _run_loop(d, trials, workers, plugins, show_progress, ray)
        d.recorder.repair(tracker=False)  # plan files of the trials other drivers completed
        if promote_best and promote(d.study, spec.search, d.recorder.directions, search_dir):
            _run_loop(d, trials, workers, plugins, show_progress, ray)  # NOTE: one driver promotes, not each
            d.recorder.repair(tracker=False)  # ... and of the promoted trials a helper driver ran
    if not promote_best and spec.search.screening is not None:
        warnings.warn("search.screening: this driver promotes nothing (--no-refine); its front is empty until the "
                      "main driver, run without --no-refine, scores the best screened trials on every search sample")
    front, rows = publish_front(d.study, spec, d.tracker)
    d.tracker.finish()
    return _result(d, front, rows, failed_learned(d.study))


def _result(d: _Driver, front: list[FrozenTrial], rows: list[dict], failed: int) -> SearchResult:
    directions = d.recorder.directions
    trials = d.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    learned = [t for t in scored(d.study, d.spec.search, promoted=True) if not is_warm(t)]
    return SearchResult(d.spec.name, d.search_dir, d.recorder.objectives, directions, front,
                        feasible_hypervolume(learned, directions, reference_point(d.spec)),
                        sum(PROMOTED not in t.user_attrs for t in trials), failed,
                        sum(REPEAT in t.user_attrs for t in trials), sum(PROMOTED in t.user_attrs for t in trials),
                        d.dense.values[d.spec.search.samples], rows)
