"""The held-out evaluation: every plan a report states, measured on the held-out seed set.

The held-out samples are drawn in ``refine.latency_repeats`` equal rounds. In each round dense and
every plan sample that round's seeds in turn, in one process, timed: each round gives every plan a
latency ratio to the dense run next to it (drift on a noisy machine hits both alike), and the rounds
together give every plan its held-out samples — quality and latency come from the same runs, so the
latency costs no extra sampling. Quality: fidelity to dense on the same seeds, FLOPs (analytic; for
a plan carrying one of diffusers' caches, counted from what ran in its rounds) and,
when the experiment names a feature extractor, domain FID/KID against the real reference, KID on the
extractor's low-level layer (``kid_low``) and class agreement.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ditplan.evaluators.cost import Flops, ideal_flops_ratio, run_flops, sample_forwards, turn_order
from ditplan.evaluators.domain import domain_metrics
from ditplan.evaluators.fidelity import FidelityEvaluator
from ditplan.models.adapters import ModelAdapter
from ditplan.strategies.apply import run_plan
from ditplan.plan import Plan
from ditplan.spec import ExperimentSpec, SeedSet

DENSE = "dense"
WARMUP_SAMPLES = 2


@dataclass
class HeldOutResult:
    """``metrics``: per plan name (and ``dense``) its held-out metrics, with ``latency_ratio`` the
    median over rounds and ``latency_ratio_min`` / ``_max`` the band, ``latency_ms`` the median
    milliseconds per sample (a sample's whole denoising loop in a batch of the round's size). ``seconds``: elapsed time of
    the whole evaluation; ``sample_forwards``: what it spent, in transformer sample-forwards."""

    seed_set: SeedSet
    metrics: dict[str, dict[str, float]]
    seconds: float
    sample_forwards: int


def rounds(seed_set: SeedSet, count: int) -> list[tuple[list[Any], list[int]]]:
    """``seed_set`` cut into ``count`` consecutive rounds of (nearly) equal size."""
    n = len(seed_set.seeds)
    cuts = [round(i * n / count) for i in range(count + 1)]
    return [(seed_set.conditions[a:b], seed_set.seeds[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]


def _timed_rounds(
    adapter: ModelAdapter, spec: ExperimentSpec, plans: Mapping[str, Plan | None], seed_set: SeedSet, count: int,
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], dict[str, Flops]]:
    """Samples of every plan on the whole set, seconds per round and FLOPs of all rounds, plans taking
    turns in each round."""
    settings = spec.sampler.settings()
    warm = (seed_set.conditions[:WARMUP_SAMPLES], seed_set.seeds[:WARMUP_SAMPLES])
    for plan in plans.values():  # loads fine-tuned networks, first-call allocations
        run_plan(adapter, plan, *warm, settings)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in plans}
    seconds: dict[str, list[float]] = {name: [] for name in plans}
    flops = dict.fromkeys(plans, Flops(0.0, 0.0))
    device = next(adapter.transformer.parameters()).device
    for index, (conditions, seeds) in enumerate(rounds(seed_set, count)):
        for name in turn_order(list(plans), index, count):
            plan = plans[name]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run = run_plan(adapter, plan, conditions, seeds, settings)  # synchronises: .cpu()
            seconds[name].append(time.perf_counter() - start)
            samples[name].append(run.samples)
            spent = run_flops(adapter, plan, settings, run, len(seeds))
            flops[name] = Flops(flops[name].attention + spent.attention, flops[name].total + spent.total)
    return {name: torch.cat(parts) for name, parts in samples.items()}, seconds, flops


def _quality(spec: ExperimentSpec, images: torch.Tensor, dense: torch.Tensor, conditions: Sequence[Any],
             reference: torch.Tensor | str | None, num_classes: int | None) -> dict[str, float]:
    values = {m.name: m.value for m in FidelityEvaluator().evaluate(images, dense)}
    values.update({m.name: m.value for m in domain_metrics(spec, images, conditions, num_classes, reference=reference)})
    return values


def held_out_metrics(adapter: ModelAdapter, spec: ExperimentSpec, plans: Mapping[str, Plan]) -> HeldOutResult:
    """Measure ``plans`` (by name) and dense on the experiment's held-out seed set."""
    refine = spec.search.refine
    if refine is None:
        raise ValueError("the experiment has no search.refine section: no held-out evaluation is configured")
    settings = spec.sampler.settings()
    seed_set = spec.seed_set("held_out")
    runs: dict[str, Plan | None] = {DENSE: None, **plans}
    started = time.perf_counter()
    samples, seconds, flops_by_plan = _timed_rounds(adapter, spec, runs, seed_set, refine.latency_repeats)
    n = len(seed_set.seeds)
    dense_flops = flops_by_plan[DENSE]
    metrics: dict[str, dict[str, float]] = {}
    round_sizes = [len(seeds) for _, seeds in rounds(seed_set, refine.latency_repeats)]
    reference = None
    if spec.evaluation.feature_extractor:
        from ditplan.evaluators.evaluate import reference_images

        reference = reference_images(spec)  # once for every plan
    for name, plan in runs.items():
        values = _quality(spec, samples[name], samples[DENSE], seed_set.conditions, reference,
                          getattr(adapter, "num_classes", None))
        flops = flops_by_plan[name]
        ratios = [mine / dense for mine, dense in zip(seconds[name], seconds[DENSE])]
        values.update(
            flops_ratio=flops.total / dense_flops.total,
            ideal_flops_ratio=ideal_flops_ratio(adapter, plan, settings, flops.total / dense_flops.total),
            attention_flops_ratio=flops.attention / dense_flops.attention,
            latency_ratio=statistics.median(ratios), latency_ratio_min=min(ratios), latency_ratio_max=max(ratios),
            latency_ms=1000 * statistics.median(s / k for s, k in zip(seconds[name], round_sizes)),  # per sample
        )
        metrics[name] = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    spent = len(runs) * sample_forwards(n + WARMUP_SAMPLES, settings)
    return HeldOutResult(seed_set, metrics, time.perf_counter() - started, spent)
