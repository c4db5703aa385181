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

from ditplan.atomic import atomic_write_text
from ditplan.errors import UserError
from ditplan.evaluators.base import METRIC_REFERENCE
from ditplan.evaluators.reference import dense_reference
from ditplan.plan import Plan, library_versions
from ditplan.progress import progress_bar
from ditplan.search.figures import front_html, front_png
from ditplan.search.pareto import hypervolume, pareto_mask
from ditplan.search.space import experiment_space
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


def is_feasible_trial(trial: FrozenTrial) -> bool:
    """Every constraint the trial was told holds (Optuna's rule: each value ≤ 0)."""
    return all(v <= 0 for v in trial.constraints.values())


def feasible_front(trials: list[FrozenTrial], directions: list[str]) -> list[FrozenTrial]:
    """The Pareto front of the feasible ``trials``; infeasible ones are never on it."""
    feasible = [t for t in trials if is_feasible_trial(t)]
    if not feasible:
        return []
    mask = pareto_mask(np.array([t.values for t in feasible]), directions)
    return [t for t, keep in zip(feasible, mask) if keep]


def feasible_hypervolume(trials: list[FrozenTrial], directions: list[str], reference: list[float]) -> float:
    feasible = [t.values for t in trials if is_feasible_trial(t)]
    return hypervolume(np.array(feasible), directions, reference) if feasible else 0.0


def _front_rows(trials: list[FrozenTrial], objectives: list[str], directions: list[str]) -> list[dict[str, Any]]:
    """Every trial, feasible or not, with whether it is on the (feasible) front."""
    front = {t.number for t in feasible_front(trials, directions)}
    return [
        {"trial": t.number, "name": t.user_attrs.get("name", f"trial-{t.number}"),
         "source": t.user_attrs.get("source", "search"), "feasible": is_feasible_trial(t), "on_front": t.number in front,
         **{o: v for o, v in zip(objectives, t.values)}}
        for t in trials
    ]


def _front_table(rows: list[dict[str, Any]], objectives: list[str]) -> str:
    return "\n".join(["| trial | name | " + " | ".join(objectives) + " | feasible | front |",
                      "|---|---|" + "---|" * len(objectives) + "---|---|"] +
                     [f"| {r['trial']} | {r['name']} | " + " | ".join(f"{r[o]:.4g}" for o in objectives) +
                      f" | {'yes' if r['feasible'] else 'no'} | {'yes' if r['on_front'] else ''} |" for r in rows])


def _start_ray(ray_address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    env = {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p),
           "RAY_USAGE_STATS_ENABLED": "0"}
    kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": {"env_vars": env}, "log_to_driver": False}
    if ray_address:
        ray.init(address=ray_address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), **kwargs)
    return True


class _Search:
    """One study's driver: its storage, space, dense reference on the search seeds and tracker."""

    def __init__(self, spec: ExperimentSpec, run_dir: Path, resume: bool) -> None:
        self.spec, self.search, self.run_dir = spec, spec.search, run_dir
        self.objectives = [o.metric for o in self.search.objectives]
        self.directions = [o.resolved_direction() for o in self.search.objectives]
        self.needed = tuple(sorted(set(self.objectives) | {c.metric for c in self.search.constraints}))
        self.storage = study_storage(spec, run_dir)
        if spec.name in optuna.get_all_study_names(self.storage) and not resume:
            raise UserError(f"study {spec.name!r} already exists in {run_dir}; pass --resume to continue it or use another output dir")
        self.study = optuna.create_study(study_name=spec.name, storage=self.storage, directions=self.directions,
                                         sampler=SAMPLERS[self.search.sampler](self.search), load_if_exists=True)
        for stale in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(stale.number, state=TrialState.FAIL)  # NOTE: left RUNNING by a killed driver
        self.adapter = worker_adapter(spec)  # the driver's copy: dense reference, warm start
        settings = spec.sampler.settings()
        _, self.conditions, self.seeds = spec.seed_set("search")
        self.dense = dense_reference(self.adapter, settings, self.conditions, self.seeds, spec.evaluation.cache_dir)
        self.space = experiment_space(self.adapter, spec)
        self.reference = reference_point(spec)
        self.tracker = Tracker(
            self.search.tracking_uri or default_tracking_uri(run_dir), "ditplan", spec.name,
            {"experiment": spec.model_dump_json(), "sampler": self.search.sampler, "seed": self.search.seed,
             "objectives": self.objectives, "reference_point": self.reference, **library_versions()}, [],
            artifact_location=None if self.search.tracking_uri else run_dir / "mlartifacts")
        self.plans_dir = run_dir / "trials"

    def record(self, number: int, plan: Plan | None, values: dict[str, float] | None, state: str, params: dict) -> None:
        """Plan file first (with its search-seed metrics), then MLflow; hypervolume of the feasible trials."""
        path = None
        if plan is not None and values is not None:
            plan = plan.with_provenance(search=plan.provenance.get("search", f"optuna-{self.search.sampler}"),
                                        study=self.spec.name, trial=number,
                                        metrics={k: float(v) for k, v in values.items()},
                                        evaluated_on={"set": "search", "first_seed": self.seeds[0],
                                                      "samples": len(self.seeds)},
                                        versions=library_versions())
            path = plan.save(self.plans_dir / f"trial-{number:04d}.yaml")
        self.tracker.log_trial(number, state, params, values or {}, path)
        self.tracker.log_hypervolume(feasible_hypervolume(_complete(self.study), self.directions, self.reference), number)

    def tell(self, trial: optuna.Trial, values: dict[str, float]) -> None:
        for constraint in self.search.constraints:
            trial.set_constraint(constraint.metric, constraint.violation(values[constraint.metric]))
        self.study.tell(trial, [values[o] for o in self.objectives])

    def warm_start(self, plans: Sequence[Plan]) -> None:
        """Known plans (greedy D1 … D6) join the study. Plans the space can express are enqueued
        (evaluated by the workers like any trial, and NSGA-II breeds from them); others enter as known
        results evaluated here, on the same path."""
        known = {t.user_attrs.get("name") for t in self.study.get_trials(deepcopy=False)}
        for plan in plans:
            name = str(plan.provenance.get("name", "warm-start"))
            if name in known:
                continue
            attrs = {"name": name, "source": str(plan.provenance.get("search", "warm-start"))}
            params = self.space.params_for(plan)
            if params is not None:
                self.study.enqueue_trial(params, user_attrs=attrs)
                continue
            values = plan_metrics(self.adapter, self.spec, plan, self.dense, self.conditions, self.seeds, self.needed)
            trial = self.study.ask()
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            self.tell(trial, values)
            self.record(trial.number, plan, values, "COMPLETE", {"warm_start": name})

    def count(self, states: tuple[TrialState, ...], warm: bool | None = None) -> int:
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=states)
                   if warm is None or ("source" in t.user_attrs) == warm)

    def run_trials(self, n_trials: int, n_workers: int, ray_address: str | None, plugins: Sequence[str],
                   show_progress: bool) -> int:
        """Ask, evaluate on Ray, tell, until ``n_trials`` learned trials (warm-start trials on top) are
        finished; returns the number of failed learned trials."""
        started_ray = _start_ray(ray_address)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // n_workers)
        task = ray.remote(_remote_evaluate).options(num_cpus=cpus, num_gpus=self.search.gpus_per_trial,
                                                    max_retries=self.search.max_retries)
        dense_ref = ray.put(self.dense)
        finished_states = (TrialState.COMPLETE, TrialState.FAIL)
        target = n_trials + self.count(finished_states + (TrialState.WAITING,), warm=True)
        failed = self.count((TrialState.FAIL,), warm=False)
        in_flight: dict[Any, tuple[optuna.Trial, Plan]] = {}
        try:
            with progress_bar(target, "search trials", completed=min(target, self.count(finished_states)),
                              enabled=show_progress) as bar:
                while True:
                    finished = self.count(finished_states)
                    while len(in_flight) < n_workers and finished + len(in_flight) < target:
                        trial = self.study.ask()
                        plan = self.space.suggest(trial)
                        ref = task.remote(self.spec, plan, dense_ref, self.conditions, self.seeds, self.needed, cpus,
                                          tuple(plugins))
                        in_flight[ref] = (trial, plan)
                    if not in_flight:
                        break
                    ready, _ = ray.wait(list(in_flight), num_returns=1)
                    failed += self._collect(ready[0], *in_flight.pop(ready[0]))
                    bar.update(1, failed=failed, front=len(self.study.best_trials), **self._best())
        finally:
            for trial, _ in in_flight.values():  # interrupted: nothing stays RUNNING
                self.study.tell(trial, state=TrialState.FAIL)
            if started_ray:
                ray.shutdown()
        return failed

    def _collect(self, ref: Any, trial: optuna.Trial, plan: Plan) -> int:
        """Tell the study one finished task; 1 when it failed."""
        try:
            values = ray.get(ref)
        except ray.exceptions.RayError as err:  # the trial raised, or its worker died past retries
            trial.set_user_attr("error", str(err).strip().splitlines()[-1][:500])
            self.study.tell(trial, state=TrialState.FAIL)
            self.record(trial.number, None, None, "FAIL", trial.params)
            return 1
        self.tell(trial, values)
        self.record(trial.number, plan, values, "COMPLETE", trial.params)
        return 0

    def _best(self) -> dict[str, str]:
        done = [t for t in _complete(self.study) if is_feasible_trial(t)]
        if not done:
            return {}
        return {f"best_{o}": f"{(min if d == 'minimize' else max)(t.values[i] for t in done):.3g}"
                for i, (o, d) in enumerate(zip(self.objectives, self.directions))}

    def publish_front(self) -> list[FrozenTrial]:
        """The feasible front: Markdown table (every trial, feasible or not), MLflow ``pareto`` tags, figures."""
        done = _complete(self.study)
        rows = _front_rows(done, self.objectives, self.directions)
        front = [t for t in done if t.number in {r["trial"] for r in rows if r["on_front"]}]
        if rows:
            groups: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                groups.setdefault(row["source"], []).append(row)
            table = _front_table(rows, self.objectives)
            self.tracker.mark_front({t.number for t in front})
            self.tracker.log_front(front_png(groups, self.objectives), front_html(groups, self.objectives), table, rows)
            atomic_write_text(self.run_dir / "pareto_front.md", table + "\n")
        return front

    def refine(self, front: list[FrozenTrial]) -> None:
        """Held-out evaluation of the feasible front and the warm-start (greedy) plans."""
        from ditplan.search.refine import refine_front

        metrics = self.search.refine.metrics  # type: ignore[union-attr]
        numbers = {t.number for t in front}
        warm = [t for t in _complete(self.study) if "source" in t.user_attrs and t.number not in numbers]
        refined = refine_front(self.spec, self.storage, self.spec.name, warm + front, self.plans_dir)  # greedy first
        lines = ["| trial | name | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for t in refined.get_trials(deepcopy=False):
            lines.append(f"| {t.user_attrs['source_trial']} | {t.user_attrs['name']} | "
                         + " | ".join(f"{v:.4g}" for v in t.values) + " |")
            for key, value in t.user_attrs["metrics"].items():
                self.tracker.client.log_metric(self.tracker.parent_id, f"held_out.{t.user_attrs['name']}.{key}", float(value))
        atomic_write_text(self.run_dir / "refined_front.md", "\n".join(lines) + "\n")
        self.tracker.client.log_artifact(self.tracker.parent_id, str(self.run_dir / "refined_front.md"))


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
    """Run (or resume) the study of ``spec`` in ``run_dir`` until it holds ``trials`` finished trials,
    publish its feasible front and measure it (with the warm-start plans) on the held-out seeds."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _import_plugins(plugins)
    driver = _Search(spec, run_dir, resume)
    driver.warm_start(warm_start)
    failed = driver.run_trials(trials or spec.search.trials, workers or spec.search.workers, ray_address, plugins,
                               show_progress)
    front = driver.publish_front()
    if spec.search.refine is not None:
        driver.refine(front)
    driver.tracker.finish()
    done = _complete(driver.study)
    hv = feasible_hypervolume(done, driver.directions, driver.reference)
    return SearchResult(spec.name, run_dir, driver.objectives, driver.directions, front, hv, len(done), failed)
