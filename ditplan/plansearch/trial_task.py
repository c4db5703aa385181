"""One trial's evaluation, as a Ray task: the trial's plan measured on its search samples by the one
measuring path (:func:`~ditplan.evaluators.measure.measure`). The model is loaded once per worker."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch

from ditplan.evaluators.measure import measure
from ditplan.models.adapters import experiment_adapter
from ditplan.plan import Plan
from ditplan.plugins import import_plugins
from ditplan.spec import ExperimentSpec, SeedSet

PLAN = "plan"


def checked(values: Mapping[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """``values`` once every metric a search needs is there and finite."""
    missing = [m for m in metrics if m not in values]
    if missing:
        raise ValueError(f"metric {missing[0]!r} is not computed for this plan (a domain metric needs the "
                         "experiment's feature extractor)")
    bad = [m for m in metrics if not math.isfinite(values[m])]
    if bad:
        raise FloatingPointError(f"metric {bad[0]} is {values[bad[0]]} for this plan")
    return dict(values)


def trial_metrics(spec: ExperimentSpec, plan: Plan, dense: torch.Tensor, seed_set: SeedSet,
                  metrics: Sequence[str]) -> dict[str, float]:
    """The ``metrics`` (and every cost and fidelity figure) of ``plan`` on ``seed_set``. With ``latency_ratio``
    among them, dense runs beside the plan in ``evaluation.latency_repeats`` interleaved rounds; otherwise
    the plan runs once against the ``dense`` samples of the same seeds."""
    timed = "latency_ratio" in metrics
    result = measure(experiment_adapter(spec), spec, {PLAN: plan}, seed_set, metrics, timed=timed,
                     rounds_count=spec.evaluation.latency_repeats, dense=None if timed else dense)
    return checked(result.metrics[PLAN], metrics)


def _remote_trial(spec: ExperimentSpec, plan: Plan, dense: torch.Tensor, seed_set: SeedSet, metrics: tuple[str, ...],
                  threads: int, plugins: tuple[str, ...]) -> dict[str, float]:
    """The Ray task: registers third-party strategies in this worker, then :func:`trial_metrics`."""
    import_plugins(plugins)
    torch.set_num_threads(threads)  # NOTE: workers share the machine's cores; don't oversubscribe
    return trial_metrics(spec, plan, dense, seed_set, metrics)


def submitter(spec: ExperimentSpec, search_set: SeedSet, dense: Mapping[int, torch.Tensor], metrics: Sequence[str],
              samples_of: Any, plugins: Sequence[str]) -> Any:
    """A function (trial, plan) → Ray object ref that measures the plan on the first K search samples, K the
    trial's fidelity (``samples_of(trial)``), against ``dense`` samples by K. Ray must be up."""
    search = spec.search
    task = ray.remote(_remote_trial).options(num_cpus=search.cpus_per_trial, num_gpus=search.gpus_per_trial,
                                            max_retries=search.max_retries)
    refs = {k: ray.put(samples) for k, samples in dense.items()}
    threads = max(1, int(search.cpus_per_trial))

    def submit(trial: Any, plan: Plan) -> ray.ObjectRef:
        k = samples_of(trial)
        subset = SeedSet(search_set.name, search_set.conditions[:k], search_set.seeds[:k])
        return task.remote(spec, plan, refs[k], subset, tuple(metrics), threads, tuple(plugins))
    return submit
