"""The multi-objective plan search: Optuna ask/tell on the driver, trials evaluated as Ray tasks.

Search state lives in Optuna storage (a journal file in the run directory by default), so a killed
driver resumes by study name without losing a completed trial. Every trial is logged to MLflow by
the driver only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from ditplan.errors import UserError
from ditplan.evaluators.base import METRIC_REFERENCE
from ditplan.evaluators.reference import dense_reference
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, library_versions
from ditplan.progress import progress_bar
from ditplan.search.figures import front_html, front_png
from ditplan.search.pareto import hypervolume, pareto_mask
from ditplan.search.space import build_space, sparse_choices
from ditplan.search.tracking import Tracker, default_tracking_uri
from ditplan.search.trial_eval import evaluate_in_worker, plan_metrics, worker_adapter
from ditplan.spec import ExperimentSpec

SAMPLERS = {
    "tpe": lambda search: optuna.samplers.TPESampler(seed=search.seed, multivariate=True),
    "nsga2": lambda search: optuna.samplers.NSGAIISampler(seed=search.seed, population_size=search.population_size),
    "gp": lambda search: optuna.samplers.GPSampler(seed=search.seed),
    "random": lambda search: optuna.samplers.RandomSampler(seed=search.seed),
}


@dataclass
class SearchResult:
    study_name: str
    run_dir: Path
    objectives: list[str]
    directions: list[str]
    front: list[FrozenTrial]
    hypervolume: float
    completed: int
    failed: int


def study_storage(spec: ExperimentSpec, run_dir: Path) -> Any:
    if spec.search.storage:
        return spec.search.storage
    return JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal")))


def reference_point(spec: ExperimentSpec) -> list[float]:
    if spec.search.reference_point is not None:
        return list(spec.search.reference_point)
    missing = [o.metric for o in spec.search.objectives if o.metric not in METRIC_REFERENCE]
    if missing:
        raise UserError(f"objective {missing[0]!r} has no default hypervolume reference; set search.reference_point")
    return [METRIC_REFERENCE[o.metric] for o in spec.search.objectives]


def _import_plugins(plugins: Sequence[str]) -> None:
    for module in plugins:
        importlib.import_module(module)


def _remote_evaluate(spec, plan, dense, conditions, seeds, metrics, threads, plugins):  # noqa: ANN001, ANN202
    _import_plugins(plugins)  # registers third-party strategies in this worker
    return evaluate_in_worker(spec, plan, dense, conditions, seeds, metrics, threads)


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _front_rows(trials: list[FrozenTrial], objectives: list[str], directions: list[str]) -> list[dict[str, Any]]:
    if not trials:
        return []
    values = np.array([t.values for t in trials])
    mask = pareto_mask(values, directions)
    return [
        {"trial": t.number, "name": t.user_attrs.get("name", f"trial-{t.number}"),
         "source": t.user_attrs.get("source", "search"), "on_front": bool(on),
         **{o: v for o, v in zip(objectives, t.values)}}
        for t, on in zip(trials, mask)
    ]


def run_search(
    spec: ExperimentSpec,
    run_dir: str | Path,
    trials: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    warm_start: Sequence[Plan] = (),
    plugins: Sequence[str] = (),
    show_progress: bool = True,
) -> SearchResult:
    """Run (or resume) the study of ``spec`` in ``run_dir`` until it holds ``trials`` finished trials."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _import_plugins(plugins)
    search = spec.search
    n_trials, n_workers = trials or search.trials, workers or search.workers
    objectives = [o.metric for o in search.objectives]
    directions = [o.resolved_direction() for o in search.objectives]
    needed = tuple(sorted(set(objectives) | {c.metric for c in search.constraints}))
    study_name = spec.name
    storage = study_storage(spec, run_dir)
    exists = study_name in optuna.get_all_study_names(storage)
    if exists and not resume:
        raise UserError(f"study {study_name!r} already exists in {run_dir}; pass --resume to continue it or use another output dir")
    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions,
                                sampler=SAMPLERS[search.sampler](search), load_if_exists=True)
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)  # NOTE: left RUNNING by a killed driver

    adapter = worker_adapter(spec)  # the driver's copy: dense reference, warm start
    settings = spec.sampler.settings()
    conditions = spec.workload.conditions()[: search.samples]
    seeds = spec.workload.seeds()[: search.samples]
    dense = dense_reference(adapter, settings, conditions, seeds, spec.evaluation.cache_dir)
    space = build_space(plan_target(adapter, settings), search.space.methods, search.space.layer_groups,
                        search.space.step_segments, search.space.params, sparse_choices(adapter, spec))
    ref = reference_point(spec)
    tracker = Tracker(search.tracking_uri or default_tracking_uri(run_dir), "ditplan", study_name,
                      {"experiment": spec.model_dump_json(), "sampler": search.sampler, "seed": search.seed,
                       "objectives": objectives, "reference_point": ref, **library_versions()}, [],
                      artifact_location=None if search.tracking_uri else run_dir / "mlartifacts")
    plans_dir = run_dir / "trials"

    def record(trial_number: int, plan: Plan | None, values: dict[str, float] | None, state: str, params: dict) -> None:
        path = None
        if plan is not None and values is not None:
            plan = plan.with_provenance(search=plan.provenance.get("search", f"optuna-{search.sampler}"),
                                        study=study_name, trial=trial_number,
                                        metrics={k: float(v) for k, v in values.items()},
                                        evaluated_on={"samples": len(seeds)}, versions=library_versions())
            path = plan.save(plans_dir / f"trial-{trial_number:04d}.yaml")
        tracker.log_trial(trial_number, state, params, values or {}, path)
        done = _complete(study)
        if done:
            tracker.log_hypervolume(hypervolume(np.array([t.values for t in done]), directions, ref), trial_number)

    def tell(trial: optuna.Trial, values: dict[str, float]) -> None:
        for constraint in search.constraints:
            trial.set_constraint(constraint.metric, constraint.violation(values[constraint.metric]))
        study.tell(trial, [values[o] for o in objectives])

    # Warm start: known plans (greedy D1 … D6) join the study. Plans the space can express are
    # enqueued (evaluated by the workers like any trial, and NSGA-II breeds from them); others enter
    # as known results evaluated here, on the same path.
    known = {t.user_attrs.get("name") for t in study.get_trials(deepcopy=False)}
    for plan in warm_start:
        name = str(plan.provenance.get("name", "warm-start"))
        if name in known:
            continue
        attrs = {"name": name, "source": str(plan.provenance.get("search", "warm-start"))}
        params = space.params_for(plan)
        if params is not None:
            study.enqueue_trial(params, user_attrs=attrs)
            continue
        values = plan_metrics(adapter, spec, plan, dense, conditions, seeds, needed)
        trial = study.ask()
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        tell(trial, values)
        record(trial.number, plan, values, "COMPLETE", {"warm_start": name})

    started_ray = False
    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p),
               "RAY_USAGE_STATS_ENABLED": "0"}
        kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": {"env_vars": env}, "log_to_driver": False}
        if ray_address:
            ray.init(address=ray_address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count(), **kwargs)
        started_ray = True
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // n_workers)
    task = ray.remote(_remote_evaluate).options(num_cpus=cpus, num_gpus=search.gpus_per_trial,
                                                max_retries=search.max_retries)
    dense_ref = ray.put(dense)

    def count(states: tuple[TrialState, ...], warm: bool | None = None) -> int:
        return sum(1 for t in study.get_trials(deepcopy=False, states=states)
                   if warm is None or ("source" in t.user_attrs) == warm)

    finished_states = (TrialState.COMPLETE, TrialState.FAIL)
    # ``trials`` counts learned trials; warm-start trials (finished or waiting) come on top.
    target = n_trials + count(finished_states + (TrialState.WAITING,), warm=True)
    failed = count((TrialState.FAIL,), warm=False)
    in_flight: dict[Any, tuple[optuna.Trial, Plan]] = {}
    try:
        with progress_bar(target, "search trials", completed=min(target, count(finished_states)),
                          enabled=show_progress) as bar:
            while True:
                finished = count(finished_states)
                while len(in_flight) < n_workers and finished + len(in_flight) < target:
                    trial = study.ask()
                    plan = space.suggest(trial)
                    ref_obj = task.remote(spec, plan, dense_ref, conditions, seeds, needed, cpus, tuple(plugins))
                    in_flight[ref_obj] = (trial, plan)
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                trial, plan = in_flight.pop(ready[0])
                try:
                    values = ray.get(ready[0])
                except ray.exceptions.RayError as err:  # the trial raised, or its worker died past retries
                    trial.set_user_attr("error", str(err).strip().splitlines()[-1][:500])
                    study.tell(trial, state=TrialState.FAIL)
                    failed += 1
                    record(trial.number, None, None, "FAIL", trial.params)
                else:
                    tell(trial, values)
                    record(trial.number, plan, values, "COMPLETE", trial.params)
                done = _complete(study)
                best = {o: (min if d == "minimize" else max)(t.values[i] for t in done)
                        for i, (o, d) in enumerate(zip(objectives, directions))} if done else {}
                bar.update(1, failed=failed, front=len(study.best_trials),
                           **{f"best_{k}": f"{v:.3g}" for k, v in best.items()})
    finally:
        for trial, _ in in_flight.values():  # interrupted: nothing stays RUNNING
            study.tell(trial, state=TrialState.FAIL)
        if started_ray:
            ray.shutdown()

    done = _complete(study)
    rows = _front_rows(done, objectives, directions)
    front_numbers = {r["trial"] for r in rows if r["on_front"]}
    hv = hypervolume(np.array([t.values for t in done]), directions, ref) if done else 0.0
    if rows:
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(row["source"], []).append(row)
        table = "\n".join(["| trial | name | " + " | ".join(objectives) + " | front |",
                           "|---|---|" + "---|" * len(objectives) + "---|"] +
                          [f"| {r['trial']} | {r['name']} | " + " | ".join(f"{r[o]:.4g}" for o in objectives) +
                           f" | {'yes' if r['on_front'] else ''} |" for r in rows])
        tracker.mark_front(front_numbers)
        tracker.log_front(front_png(groups, objectives), front_html(groups, objectives), table, rows)
        (run_dir / "pareto_front.md").write_text(table + "\n")
    front = [t for t in done if t.number in front_numbers]
    if search.refine is not None and front:
        from ditplan.search.refine import refine_front

        warm = [t for t in done if "source" in t.user_attrs and t.number not in front_numbers]
        refined = refine_front(spec, storage, study_name, front + warm, plans_dir, show_progress)
        lines = ["| trial | name | " + " | ".join(search.refine.metrics) + " |", "|---|---|" + "---|" * len(search.refine.metrics)]
        for t in refined.get_trials(deepcopy=False):
            lines.append(f"| {t.user_attrs['source_trial']} | {t.user_attrs['name']} | " + " | ".join(f"{v:.4g}" for v in t.values) + " |")
            for key, value in t.user_attrs["metrics"].items():
                tracker.client.log_metric(tracker.parent_id, f"refined.{t.user_attrs['name']}.{key}", float(value))
        (run_dir / "refined_front.md").write_text("\n".join(lines) + "\n")
        tracker.client.log_artifact(tracker.parent_id, str(run_dir / "refined_front.md"))
    tracker.finish()
    return SearchResult(study_name, run_dir, objectives, directions, front, hv, len(done), failed)
