"""Evaluate one plan for a search: the same path serves learned trials, greedy plans and re-evaluation,
so their metrics are comparable. Runs in Ray workers; the model is loaded once per worker."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ditplan.evaluators.base import METRIC_DIRECTIONS
from ditplan.evaluators.cost import ideal_flops_ratio, plan_flops, run_flops
from ditplan.evaluators.domain import DOMAIN_METRICS, domain_metrics
from ditplan.evaluators.fidelity import FidelityEvaluator
from ditplan.models.adapters import ModelAdapter, adapter_from_spec, check_classes
from ditplan.strategies.apply import PlanRun, run_plan
from ditplan.plan import Plan
from ditplan.spec import ExperimentSpec


_WORKER_ADAPTERS: dict[str, ModelAdapter] = {}
_WORKER_DENSE_SECONDS: dict[str, float] = {}


def worker_adapter(spec: ExperimentSpec) -> ModelAdapter:
    """The experiment's model, loaded once per process (Ray workers keep it between trials)."""
    key = json.dumps(spec.model.model_dump(), sort_keys=True)
    if key not in _WORKER_ADAPTERS:
        _WORKER_ADAPTERS[key] = adapter_from_spec(spec.model, spec.workload.all_conditions())
    check_classes(_WORKER_ADAPTERS[key], spec.workload.all_conditions())  # NOTE: another workload may share the model
    return _WORKER_ADAPTERS[key]


def _timed_sample(adapter: ModelAdapter, plan: Plan | None, spec: ExperimentSpec, conditions: Sequence[Any], seeds: Sequence[int]) -> tuple[PlanRun, float]:
    start = time.perf_counter()
    run = run_plan(adapter, plan, conditions, seeds, spec.sampler.settings())
    return run, time.perf_counter() - start


COST_RATIOS = ("flops_ratio", "ideal_flops_ratio", "attention_flops_ratio", "latency_ratio")  # dense's: 1


def plan_metrics(
    adapter: ModelAdapter,
    spec: ExperimentSpec,
    plan: Plan,
    dense: torch.Tensor,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    metrics: Sequence[str],
    latency_repeats: int = 1,
) -> dict[str, float]:
    """The requested metrics of ``plan`` on ``(conditions, seeds)`` against ``dense`` (same seeds)."""
    settings = spec.sampler.settings()
    run, _ = _timed_sample(adapter, plan, spec, conditions, seeds)  # also the warm-up
    values = quality_metrics(adapter, spec, run.samples, dense, conditions, metrics)
    flops, dense_flops = run_flops(adapter, plan, settings, run, len(seeds)), plan_flops(adapter, None, settings, len(seeds))
    values["flops_ratio"] = flops.total / dense_flops.total
    values["ideal_flops_ratio"] = ideal_flops_ratio(adapter, plan, settings, values["flops_ratio"])
    values["attention_flops_ratio"] = flops.attention / dense_flops.attention
    if "latency_ratio" in metrics:
        key = f"{adapter.weights_hash}-{len(seeds)}"
        if key not in _WORKER_DENSE_SECONDS:
            _timed_sample(adapter, None, spec, conditions, seeds)
            _WORKER_DENSE_SECONDS[key] = statistics.median(
                _timed_sample(adapter, None, spec, conditions, seeds)[1] for _ in range(max(1, latency_repeats))
            )
        seconds = statistics.median(_timed_sample(adapter, plan, spec, conditions, seeds)[1] for _ in range(max(1, latency_repeats)))
        values["latency_ratio"] = seconds / _WORKER_DENSE_SECONDS[key]
    return _checked(values, metrics)


def dense_metrics(adapter: ModelAdapter, spec: ExperimentSpec, dense: torch.Tensor, conditions: Sequence[Any],
                  metrics: Sequence[str]) -> dict[str, float]:
    """Dense's own values of ``metrics`` on its samples ``dense`` of ``conditions``, by the path trials take:
    what a bound relative to dense (``relative_to: dense``) compares a trial with; cost ratios are 1."""
    return _checked({**dict.fromkeys(COST_RATIOS, 1.0), **quality_metrics(adapter, spec, dense, dense, conditions, metrics)},
                    metrics)


def quality_metrics(adapter: ModelAdapter, spec: ExperimentSpec, samples: torch.Tensor, dense: torch.Tensor,
                    conditions: Sequence[Any], metrics: Sequence[str]) -> dict[str, float]:
    """Fidelity of ``samples`` to ``dense`` and, where ``metrics`` asks for them, domain metrics of ``samples``."""
    values: dict[str, float] = {m.name: m.value for m in FidelityEvaluator().evaluate(samples, dense)}
    if DOMAIN_METRICS & set(metrics):
        for m in domain_metrics(spec, samples, conditions, getattr(adapter, "num_classes", None), metrics):
            values[m.name] = m.value
    return values


def _checked(values: dict[str, float], metrics: Sequence[str]) -> dict[str, float]:
    missing = [m for m in metrics if m not in values]
    if missing:
        raise ValueError(f"metric {missing[0]!r} is not computed by search trials; choose from {sorted(METRIC_DIRECTIONS)}")
    bad = [m for m in metrics if not math.isfinite(values[m])]
    if bad:
        raise FloatingPointError(f"metric {bad[0]} is {values[bad[0]]} for this plan")
    return values


def evaluate_in_worker(
    spec: ExperimentSpec, plan: Plan, dense: torch.Tensor, conditions: list, seeds: list[int],
    metrics: tuple[str, ...], threads: int,
) -> dict[str, float]:
    """Entry point of a Ray evaluation task; a ``latency_ratio`` is the median of ``evaluation.latency_repeats``
    timed runs."""
    torch.set_num_threads(threads)  # NOTE: workers share the machine's cores; don't oversubscribe
    return plan_metrics(worker_adapter(spec), spec, plan, dense, conditions, seeds, metrics, spec.evaluation.latency_repeats)
