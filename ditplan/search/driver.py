"""The multi-objective plan search: Optuna ask/tell on the driver, trials evaluated as Ray tasks.

Search state lives in Optuna storage (a journal file in the run directory by default, or an RDB that
several drivers share: :mod:`ditplan.search.storage`), so a killed driver resumes by study name
without losing a completed trial. A trial is recorded plan file first, then COMPLETE in the study,
then in MLflow (by the driver that ran it); a resume repairs whatever a crash left between two steps.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
from optuna.trial import FrozenTrial, TrialState

from ditplan.atomic import atomic_write_text
from ditplan.errors import UserError
from ditplan.evaluators.base import METRIC_REFERENCE
from ditplan.evaluators.cost import FLOPS_COUNT
from ditplan.evaluators.reference import dense_reference
from ditplan.plan import Plan, library_versions
from ditplan.progress import progress_bar
from ditplan.search.figures import front_html, front_png
from ditplan.search.pareto import best_by_rank, hypervolume, pareto_mask
from ditplan.search.proxy import PROXY_FILE, cell_flops, experiment_proxy, propose
from ditplan.search.ray_tasks import TaskPool
from ditplan.search.refine import distinct_plans, refine_front
from ditplan.search.space import experiment_space
from ditplan.search.storage import (
    ERROR,
    PROMOTED,
    WARM,
    Heartbeats,
    ask,
    counts,
    interrupt,
    is_shared,
    recover_interrupted,
    sampler_seed,
    study_exists,
    study_storage,
    tally,
)
from ditplan.search.tracking import Tracker, default_tracking_uri
from ditplan.search.trial_eval import dense_metrics, evaluate_in_worker, worker_adapter
from ditplan.spec import ExperimentSpec, SearchSpec


class NSGAIIWithEnqueued(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, whose generations hold the enqueued trials too. NSGA-II puts a trial into a generation
    only when it samples one of its parameters, which an enqueued trial (a proposal, a warm start: every
    parameter given) never does, so it would never breed from the plans proposed to it."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        super().before_trial(study, trial)
        self.get_trial_generation(study, trial)


SAMPLERS = {
    "tpe": lambda search, seed: optuna.samplers.TPESampler(seed=seed, multivariate=True),
    "nsga2": lambda search, seed: NSGAIIWithEnqueued(seed=seed, population_size=search.population_size),
    "gp": lambda search, seed: optuna.samplers.GPSampler(seed=seed),
    "random": lambda search, seed: optuna.samplers.RandomSampler(seed=seed),
}
METRICS = "metrics"  # user attribute: every search-seed metric of a complete trial (its plan file's provenance)
DRIVER = "driver"  # user attribute: the driver (host-pid) that ran the trial
GIVEN = "plan_given"  # user attribute of a warm-start trial whose plan the space cannot express: run whole
REPEAT = "repeat_of"  # user attribute: the earlier trial with the same parameters whose values this one took
PROJECTED = "projected"  # user attribute of such a trial whose parameters are its plan projected onto the space
PROPOSAL = "proposal"  # user attribute of a proposed trial (a learned trial, enqueued first): where it came from
INTERVAL_PROPOSAL = "interval"  # ... a cache interval of the space alone (search.proposals.intervals)


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
    repeats: int = 0  # of the completed: trials that took an earlier trial's values (same parameters), no evaluation
    promoted: int = 0  # with search.screening: trials scored again on every search sample (not in ``completed``)


def reference_point(spec: ExperimentSpec) -> list[float]:
    if spec.search.reference_point is not None:
        return list(spec.search.reference_point)
    missing = [o.metric for o in spec.search.objectives if o.metric not in METRIC_REFERENCE]
    if missing:
        raise UserError(f"objective {missing[0]!r} has no default hypervolume reference; set search.reference_point")
    return [METRIC_REFERENCE[o.metric] for o in spec.search.objectives]


def proposal_max_loss(search: SearchSpec) -> float | None:
    """The most summed proxy loss a proposal may have: the search's ``rel_l1`` bound when the proxy weighs its
    cells by their gains (then a plan's summed loss predicts its final samples' rel. L1), else none."""
    if search.proposals is None or not search.proposals.gain_probes:
        return None
    bounds = [c.max for c in search.constraints if c.metric == "rel_l1" and c.max is not None]
    return min(bounds) if bounds else None


def _import_plugins(plugins: Sequence[str]) -> None:
    for module in plugins:
        importlib.import_module(module)


def _remote_evaluate(spec, plan, dense, conditions, seeds, metrics, threads, plugins):  # noqa: ANN001, ANN202
    _import_plugins(plugins)  # registers third-party strategies in this worker
    return evaluate_in_worker(spec, plan, dense, conditions, seeds, metrics, threads)


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, each plan once: a repeat (same parameters as an earlier trial) is left out."""
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and REPEAT not in t.user_attrs]


def _scored(study: optuna.Study, search: SearchSpec, promoted: bool) -> list[FrozenTrial]:
    """The complete trials of one fidelity: with ``search.screening``, the promoted ones (scored on every
    search sample: what fronts are chosen from) or the screened ones; without it, all of them."""
    done = _complete(study)
    return done if search.screening is None else [t for t in done if (PROMOTED in t.user_attrs) == promoted]


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


def _front_table(rows: list[dict[str, Any]], objectives: list[str], dense: dict[str, float], samples: int) -> str:
    """Every trial's objectives, after dense's own on the same ``samples`` search samples (what a metric against a
    real reference, FID or KID, reads against)."""
    return "\n".join([f"dense on the same {samples} search samples: " + ", ".join(f"{o} {dense[o]:.4g}" for o in objectives),
                      "", "| trial | name | " + " | ".join(objectives) + " | feasible | front |",
                      "|---|---|" + "---|" * len(objectives) + "---|---|"] +
                     [f"| {r['trial']} | {r['name']} | " + " | ".join(f"{r[o]:.4g}" for o in objectives) +
                      f" | {'yes' if r['feasible'] else 'no'} | {'yes' if r['on_front'] else ''} |" for r in rows])


def resolve_ray_address(given: str | None) -> str | None:
    """The Ray cluster a search connects to: ``given`` (``--ray-address``), else ``RAY_ADDRESS``, else None (a
    local instance of its own). A ``host:port`` (or ``ray://host:port``) that accepts no connection within 5 s
    is a :class:`UserError` — ``ray.init`` would retry it for many minutes — raised before anything is written."""
    address, source = (given, "--ray-address") if given else (os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS")
    if address is None or address in ("auto", "local"):
        return address
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise UserError(f"{source} {address!r} is not host:port; give the address `ray start --head` prints, "
                        "e.g. 127.0.0.1:6379")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise UserError(f"no Ray cluster answers at {source} {address!r} ({err.strerror or err}); check the address, "
                        "or leave --ray-address and RAY_ADDRESS out to start a local Ray instance") from None
    return address


def ray_init_options() -> dict[str, Any]:
    """``ray.init`` options of every driver: no dashboard, no usage stats, worker logs kept off the driver's
    console, and workers that import what the driver imports (its working directory on their path)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p),
           "RAY_USAGE_STATS_ENABLED": "0"}
    return {"include_dashboard": False, "runtime_env": {"env_vars": env}, "log_to_driver": False}


@contextmanager
def _ray(address: str | None) -> Iterator[None]:
    """Connect to Ray for the block (``address``, from :func:`resolve_ray_address`) or start a local instance
    of its own — never one found on the machine (a ``ray start`` cluster of someone else's); shut down after
    the block only what this call connected to."""
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, **ray_init_options())
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), **ray_init_options())
    try:
        yield
    finally:
        ray.shutdown()


class _Search:
    """One driver of a study: its storage, space, dense reference on the search seeds and tracker."""

    def __init__(self, spec: ExperimentSpec, run_dir: Path, resume: bool) -> None:
        self.spec, self.search, self.run_dir = spec, spec.search, run_dir
        self.objectives = [o.metric for o in self.search.objectives]
        self.directions = [o.resolved_direction() for o in self.search.objectives]
        self.needed = tuple(sorted(set(self.objectives) | {c.metric for c in self.search.constraints}))
        self.adapter = worker_adapter(spec)  # the driver's copy: dense reference, search space
        self.space = experiment_space(self.adapter, spec)  # a space it refuses leaves nothing written
        run_dir.mkdir(parents=True, exist_ok=True)
        self.storage = study_storage(spec, run_dir)
        self.study = self._open_study(resume)
        settings = spec.sampler.settings()
        _, self.conditions, self.seeds = spec.seed_set("search")
        self.dense = dense_reference(self.adapter, settings, self.conditions, self.seeds, spec.evaluation.cache_dir)
        first = self.search.trial_samples()  # what a trial is scored on first: all the search samples without screening
        self.first_dense = self.dense if first == len(self.seeds) else dense_reference(
            self.adapter, settings, self.conditions[:first], self.seeds[:first], spec.evaluation.cache_dir)
        # dense's own metrics on each fidelity's samples: what bounds relative to dense compare a trial with
        self.dense_values = {len(d): dense_metrics(self.adapter, spec, d, self.conditions[:len(d)], self.needed)
                             for d in (self.dense, self.first_dense)}
        self.reference = reference_point(spec)
        self.tracker = Tracker(
            self.search.tracking_uri or default_tracking_uri(run_dir), "ditplan", spec.name,
            {"experiment": spec.model_dump_json(), "sampler": self.search.sampler, "seed": self.search.seed,
             "objectives": self.objectives, "reference_point": self.reference, **library_versions()}, [],
            artifact_location=None if self.search.tracking_uri else run_dir / "mlartifacts")
        self.plans_dir = run_dir / "trials"
        self.warm_plans: dict[str, Plan] = {}

    def _open_study(self, resume: bool) -> optuna.Study:
        """Create or load the study; reseed its sampler from what the study already holds (and, when
        several drivers share it, this driver's id) so no driver replays another's proposals; queue
        again the trials a dead driver left behind."""
        if study_exists(self.storage, self.spec.name) and not resume:
            raise UserError(f"study {self.spec.name!r} already exists in {self.run_dir}; pass --resume to continue it "
                            "or use another output dir")
        study = optuna.create_study(study_name=self.spec.name, storage=self.storage, directions=self.directions,
                                    load_if_exists=True)
        self.driver = f"{socket.gethostname()}-{os.getpid()}"
        seed = sampler_seed(self.search.seed, len(study.get_trials(deepcopy=False)),
                            self.driver if is_shared(self.storage) else "")
        study.sampler = SAMPLERS[self.search.sampler](self.search, seed)
        recover_interrupted(study, self.storage, self.search, at_start=True)
        return study

    # --- plan files -------------------------------------------------------------------------------
    def plan_path(self, number: int) -> Path:
        return self.plans_dir / f"trial-{number:04d}.yaml"

    def save_plan(self, number: int, plan: Plan, values: dict[str, float], samples: int) -> Path:
        """The trial's plan file, with its metrics on the first ``samples`` search seeds (written atomically)."""
        plan = plan.with_provenance(search=plan.provenance.get("search", f"optuna-{self.search.sampler}"),
                                    study=self.spec.name, trial=number,
                                    metrics={k: float(v) for k, v in values.items()},
                                    evaluated_on={"set": "search", "first_seed": self.seeds[0], "samples": samples},
                                    flops_count=FLOPS_COUNT, versions=library_versions())
        return plan.save(self.plan_path(number))

    def _plan(self, attrs: dict[str, Any], trial: optuna.Trial | optuna.trial.FixedTrial) -> Plan | None:
        """The plan a trial runs: a warm-start plan given whole (None when this driver was not given
        it), or the space's plan for the trial's parameters."""
        if attrs.get(GIVEN):
            if attrs.get(PROJECTED):
                self.space.suggest(trial)  # records the projected parameters: the sampler learns from them
            return self.warm_plans.get(attrs.get("name", ""))
        return self.space.suggest(trial)

    def repair(self, mlflow: bool) -> None:
        """Make good what a crash (or another driver) left: a plan file for every COMPLETE trial, none
        for a failed one and, with ``mlflow``, every finished trial in MLflow."""
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state == TrialState.COMPLETE and not self.plan_path(trial.number).exists():
                self._rewrite_plan(trial)
            elif trial.state == TrialState.FAIL:
                self.plan_path(trial.number).unlink(missing_ok=True)  # scored, saved, never told: run again
        if mlflow:
            logged = self.tracker.logged_trials()
            for trial in trials:
                if counts(trial) and trial.number not in logged:
                    done = trial.state == TrialState.COMPLETE
                    self.tracker.log_trial(trial.number, trial.state.name, trial.params,
                                           self._metrics(trial) if done else {},
                                           self.plan_path(trial.number) if done else None)

    def _metrics(self, trial: FrozenTrial) -> dict[str, float]:
        return dict(trial.user_attrs.get(METRICS) or zip(self.objectives, trial.values))

    def _samples(self, trial: FrozenTrial | optuna.Trial) -> int:
        """The search samples ``trial`` was scored on."""
        return len(self.seeds) if PROMOTED in trial.user_attrs else self.search.trial_samples()

    def _rewrite_plan(self, trial: FrozenTrial) -> None:
        try:
            plan = self._plan(trial.user_attrs, optuna.trial.FixedTrial(trial.params, trial.number))
        except ValueError:  # parameters this space does not have
            plan = None
        if plan is None:
            warnings.warn(f"trial {trial.number} of study {self.spec.name!r} is complete but its plan cannot be "
                          f"rebuilt here (warm-start plan {trial.user_attrs.get('name')!r} not given, or another space)")
            return
        self.save_plan(trial.number, plan, self._metrics(trial), self._samples(trial))

    # --- trials -----------------------------------------------------------------------------------
    def warm_start(self, plans: Sequence[Plan]) -> None:
        """Known plans (greedy D1 … D6) join the study, queued to run first on the workers like any
        trial: plans the space can express by their parameters (the samplers learn from them, NSGA-II
        breeds from them); others run whole, recorded with the parameters of their projection onto the
        space (:meth:`PlanSpace.project`) so that the samplers learn from them too."""
        self.warm_plans = {str(p.provenance.get("name", "warm-start")): p for p in plans}
        known = {t.user_attrs.get("name") for t in self.study.get_trials(deepcopy=False)}
        for name, plan in self.warm_plans.items():
            if name in known:
                continue
            params = self.space.params_for(plan)
            projected = self.space.project(plan) if params is None else None
            attrs = {"name": name, WARM: str(plan.provenance.get("search", "warm-start")),
                     **({GIVEN: True} if params is None else {}), **({PROJECTED: True} if projected else {})}
            self.study.enqueue_trial(params or projected or {}, user_attrs=attrs)

    def propose(self) -> None:
        """``search.proposals``: the proxy (measured once on the calibration batch, kept in the run
        directory with its cost) proposes plans that join the study as enqueued learned trials with
        their parameters, ahead of the sampler's own; a resumed study keeps them and adds none twice. With
        ``proposals.intervals`` each cache interval of the space alone follows them (:meth:`PlanSpace.interval_plans`)."""
        proposals = self.search.proposals
        if proposals is None:
            return
        settings = self.spec.sampler.settings()
        proxy, measured = experiment_proxy(self.adapter, self.spec, self.run_dir / PROXY_FILE)
        if measured:
            self.tracker.client.log_metric(self.tracker.parent_id, "proxy_sample_forwards", proxy.sample_forwards)
        known = {t.user_attrs.get("name") for t in self.study.get_trials(deepcopy=False)}
        plans = propose(self.space, proxy, cell_flops(self.adapter, settings, proxy), proposals.count,
                         proposals.spread, proposals.max_reuse_run, proposal_max_loss(self.search))
        named = {f"proposal-{index}": (plan, proposals.source) for index, plan in enumerate(plans)}
        if proposals.intervals:
            named.update({name: (plan, INTERVAL_PROPOSAL)
                          for name, plan in self.space.interval_plans(proposals.max_reuse_run).items()})
        for name, (plan, source) in named.items():
            params = self.space.params_for(plan)
            if name not in known and params is not None:
                self.study.enqueue_trial(params, user_attrs={"name": name, PROPOSAL: source})

    def tell(self, trial: optuna.Trial, values: dict[str, float]) -> None:
        dense = self.dense_values[self._samples(trial)]
        for constraint in self.search.constraints:
            trial.set_constraint(constraint.metric, constraint.violation(values[constraint.metric], dense[constraint.metric]))
        self.study.tell(trial, [values[o] for o in self.objectives])

    def _submitter(self, plugins: Sequence[str]) -> Callable[[optuna.Trial, Plan], ray.ObjectRef]:
        """Submits a trial's plan as a Ray task (Ray is up), scored on the search samples that trial is
        scored on (:meth:`_samples`)."""
        threads = max(1, int(self.search.cpus_per_trial))
        task = ray.remote(_remote_evaluate).options(num_cpus=self.search.cpus_per_trial,
                                                    num_gpus=self.search.gpus_per_trial, max_retries=self.search.max_retries)
        dense = {len(self.seeds): ray.put(self.dense), len(self.first_dense): ray.put(self.first_dense)}

        def submit(trial: optuna.Trial, plan: Plan) -> ray.ObjectRef:
            n = self._samples(trial)
            return task.remote(self.spec, plan, dense[n], self.conditions[:n], self.seeds[:n], self.needed, threads,
                               tuple(plugins))
        return submit

    def run_trials(self, n_trials: int, n_workers: int, plugins: Sequence[str], show_progress: bool) -> int:
        """Ask, evaluate on Ray (connected), tell, until the study holds ``n_trials`` finished learned trials
        (warm-start and promoted trials on top), whichever drivers ran them; returns the number of failed
        learned trials. Trials still in flight when the driver stops are cancelled and queued to run again."""
        start = tally(self.study.get_trials(deepcopy=False), n_trials)
        pool = TaskPool(self.search.trial_timeout_s)
        try:
            with Heartbeats(self.storage) as beats, progress_bar(start.target, "search trials", completed=start.finished,
                                                                 enabled=show_progress) as bar:
                self._loop(pool, beats, bar, n_trials, n_workers, self._submitter(plugins))
        finally:
            for trial, _ in pool.cancel_all():
                interrupt(self.study, trial, self.search)
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if counts(t) and WARM not in t.user_attrs)

    def promote(self) -> bool:
        """``search.screening``: the best screened learned trials (:func:`~ditplan.search.pareto.best_by_rank`
        of the feasible ones, each distinct plan once) join the study again, queued to be scored on every
        search sample by the trial loop (heartbeats, retries and resume as for any trial), each a trial of its
        own with the parameters of the first. One promoted before (a resumed study) is not queued twice unless
        its promoted trial was lost (interrupted past its retries). Warm-start plans are not promoted: they
        are greedy's side, measured on the held-out seeds as such. True when any is queued."""
        screening = self.search.screening
        if screening is None:
            return False
        feasible = [t for t in self._screened() if is_feasible_trial(t) and WARM not in t.user_attrs
                    and self.plan_path(t.number).exists()]
        screened = [t for t, _ in distinct_plans(feasible, self.plans_dir).values()]  # other parameters, the same plan: once
        claimed = {t.user_attrs[PROMOTED] for t in self.study.get_trials(deepcopy=False) if PROMOTED in t.user_attrs
                   and (counts(t) or t.state in (TrialState.RUNNING, TrialState.WAITING))}
        best = [screened[i] for i in best_by_rank(np.array([t.values for t in screened]), self.directions,
                                                   screening.promote)] if screened else []
        todo = [t for t in best if t.number not in claimed]
        for trial in todo:
            kept = {k: v for k, v in trial.user_attrs.items() if k in ("name", PROPOSAL)}
            self.study.enqueue_trial(trial.params, user_attrs={**kept, PROMOTED: trial.number})
        return bool(todo)

    def _loop(self, pool: TaskPool, beats: Heartbeats, bar: Any, learned: int, workers: int,
              submit: Callable[[optuna.Trial, Plan], ray.ObjectRef]) -> None:
        poll = self.search.heartbeat_interval_s
        while True:
            recover_interrupted(self.study, self.storage, self.search, at_start=False)
            state = tally(self.study.get_trials(deepcopy=False), learned)
            while len(pool) < workers and state.free:  # a repeat completes at once: its slot takes the next trial
                self._start(pool, beats, submit, bar)
                state = tally(self.study.get_trials(deepcopy=False), learned)
            if not pool:
                if state.done:
                    return
                time.sleep(poll)  # the last trials run on other drivers
                continue
            for outcome in pool.wait(poll):
                trial, plan = outcome.item
                beats.discard(trial)
                if outcome.error is None:
                    self.record_complete(trial, plan, outcome.result)
                else:
                    self.record_fail(trial, outcome.error)
                self._progress(bar)

    def _progress(self, bar: Any) -> None:
        bar.update(1, failed=sum(t.state == TrialState.FAIL and counts(t) for t in self.study.get_trials(deepcopy=False)),
                   front=len(feasible_front(self._screened(), self.directions)), **self._best())

    def _screened(self) -> list[FrozenTrial]:
        """The complete trials as first scored (every one, without screening)."""
        return _scored(self.study, self.search, promoted=False)

    def _start(self, pool: TaskPool, beats: Heartbeats, submit: Callable[[optuna.Trial, Plan], ray.ObjectRef],
               bar: Any) -> None:
        """Ask for a trial and submit its plan; a learned trial whose parameters an earlier complete trial had
        takes that trial's values at once (the same plan, the same search seeds: the same values) and
        spends no forwards — samplers over categorical spaces propose repeats often."""
        trial = ask(self.study)
        beats.add(trial)
        trial.set_user_attr(DRIVER, self.driver)
        plan = self._plan(trial.user_attrs, trial)
        if plan is None:
            beats.discard(trial)
            self.record_fail(trial, f"warm-start plan {trial.user_attrs.get('name')!r} was not given to this driver")
            return
        earlier = None if WARM in trial.user_attrs or PROMOTED in trial.user_attrs else self._earlier_with_params(trial.params)
        if earlier is None:  # NOTE: warm-start plans (greedy D1 … D6) always run: each is reported by name; a promoted
            # trial has the parameters of its screened trial and is scored on more samples
            pool.submit(submit(trial, plan), (trial, plan))
            return
        beats.discard(trial)
        trial.set_user_attr(REPEAT, earlier.number)
        self.record_complete(trial, plan, earlier.user_attrs[METRICS])
        self._progress(bar)

    def _earlier_with_params(self, params: dict[str, Any]) -> FrozenTrial | None:
        """An earlier complete trial whose values are those of the plan ``params`` give: not a promoted
        one (scored on more samples), nor a warm-start plan run whole (its parameters are a projection)."""
        if not params:  # a warm-start plan the space cannot express
            return None
        return next((t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.params == params and METRICS in t.user_attrs
                     and PROMOTED not in t.user_attrs and GIVEN not in t.user_attrs), None)

    def record_complete(self, trial: optuna.Trial, plan: Plan, values: dict[str, float]) -> None:
        """Plan file first, then COMPLETE in the study, then MLflow: a crash between any two is repaired."""
        try:
            trial.set_user_attr(METRICS, {k: float(v) for k, v in values.items()})
            path = self.save_plan(trial.number, plan, values, self._samples(trial))
            self.tell(trial, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # found stale by another driver meanwhile, and queued again there
        self.tracker.log_trial(trial.number, "COMPLETE", trial.params, values, path)
        self._log_hypervolume(trial)

    def record_fail(self, trial: optuna.Trial, error: str) -> None:
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
        final = self.search.screening is None or PROMOTED in trial.user_attrs
        done = _scored(self.study, self.search, promoted=PROMOTED in trial.user_attrs)
        self.tracker.log_hypervolume(feasible_hypervolume(done, self.directions, self.reference), trial.number,
                                     "hypervolume" if final else "hypervolume_screened")

    def _best(self) -> dict[str, str]:
        done = [t for t in self._screened() if is_feasible_trial(t)]
        if not done:
            return {}
        return {f"best_{o}": f"{(min if d == 'minimize' else max)(t.values[i] for t in done):.3g}"
                for i, (o, d) in enumerate(zip(self.objectives, self.directions))}

    def publish_front(self) -> list[FrozenTrial]:
        """The feasible front (with screening: of the promoted trials): Markdown table (every trial of that
        fidelity, feasible or not), MLflow ``pareto`` tags, figures."""
        done = _scored(self.study, self.search, promoted=True)
        rows = _front_rows(done, self.objectives, self.directions)
        front = [t for t in done if t.number in {r["trial"] for r in rows if r["on_front"]}]
        if rows:
            groups: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                groups.setdefault(row["source"], []).append(row)
            table = _front_table(rows, self.objectives, self.dense_values[len(self.seeds)], len(self.seeds))
            self.tracker.mark_front({t.number for t in front})
            self.tracker.log_front(front_png(groups, self.objectives), front_html(groups, self.objectives), table, rows)
            atomic_write_text(self.run_dir / "pareto_front.md", table + "\n")
        return front

    def refine(self, front: list[FrozenTrial]) -> None:
        """Held-out evaluation of the feasible front and the warm-start (greedy) plans."""
        metrics = self.search.refine.metrics  # type: ignore[union-attr]
        numbers = {t.number for t in front}
        warm = [t for t in self._screened() if "source" in t.user_attrs and t.number not in numbers]
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
    refine: bool = True,
) -> SearchResult:
    """Run (or resume) the study of ``spec`` in ``run_dir`` until it holds ``trials`` finished trials,
    score the best again on every search sample (``search.screening``), publish its feasible front and
    measure it (with the warm-start plans) on the held-out seeds (``search.refine``). ``refine=False``: a
    helper driver of a shared study; it runs trials and leaves the promotion and the held-out evaluation
    to the main driver."""
    address = resolve_ray_address(ray_address)
    run_dir = Path(run_dir)
    _import_plugins(plugins)
    driver = _Search(spec, run_dir, resume)
    driver.warm_start(warm_start)
    driver.propose()
    driver.repair(mlflow=True)
    trials, workers = trials or spec.search.trials, workers or spec.search.workers
    with _ray(address):
        failed = driver.run_trials(trials, workers, plugins, show_progress)
        driver.repair(mlflow=False)  # plan files of the trials other drivers completed
        if refine and driver.promote():  # NOTE: one driver of a shared study promotes and measures, not each
            failed = driver.run_trials(trials, workers, plugins, show_progress)
            driver.repair(mlflow=False)  # ... and of the promoted trials a helper driver ran
    if not refine and spec.search.screening is not None:
        warnings.warn("search.screening: this driver promotes nothing (--no-refine); its front is empty until the "
                      "main driver, run without --no-refine, scores the best screened trials on every search sample")
    front = driver.publish_front()
    if refine and spec.search.refine is not None:
        driver.refine(front)
    driver.tracker.finish()
    return _result(driver, front, failed)


def _result(driver: _Search, front: list[FrozenTrial], failed: int) -> SearchResult:
    trials = driver.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    repeats = sum(REPEAT in t.user_attrs for t in trials)
    hv = feasible_hypervolume(_scored(driver.study, driver.search, promoted=True), driver.directions, driver.reference)
    return SearchResult(driver.spec.name, driver.run_dir, driver.objectives, driver.directions, front, hv,
                        sum(PROMOTED not in t.user_attrs for t in trials), failed, repeats,
                        sum(PROMOTED in t.user_attrs for t in trials))
