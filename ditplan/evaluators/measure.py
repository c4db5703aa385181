"""The one measuring path: plans, a seed set and dense → metrics.

Search trials, the held-out stage and ``ditplan evaluate`` all measure through :func:`measure`, so
their figures mean the same thing. For every plan it gives:

- quality: fidelity to dense on the same seeds (rel. L1, MSE, PSNR, SSIM; LPIPS with local weights) and,
  as asked, domain metrics against the experiment's real reference (FID, KID, KID on the low-level layer,
  class agreement, IS, precision/recall) and the CLIP score of prompt workloads;
- cost: FLOPs ratios to dense (analytic; for a plan carrying one of diffusers' caches, counted from what
  ran) and the peak memory its caches held;
- timed, the latency ratio by the interleaved protocol: the seed set is cut into rounds; in each round
  dense and every plan sample that round's seeds in turn (the order rotated round by round), in one
  process, after a warm-up run of each. Each round gives every plan a latency ratio to the dense run
  beside it (drift on a noisy machine hits both alike): the median over rounds, with its min–max band.
  Quality and latency come from the same runs.

Untimed, every plan samples the whole set once and is compared with dense samples the caller gives (or
the cached dense reference): no dense run is spent.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ditplan.evaluators.cost import (
    Flops,
    ideal_flops_ratio,
    plan_flops,
    run_flops,
    sample_forwards,
    synchronize,
    turn_order,
)
from ditplan.evaluators.domain import (
    DOMAIN_METRICS,
    applicable_metrics,
    domain_metrics,
    reference_images,
)
from ditplan.evaluators.fidelity import FidelityEvaluator
from ditplan.evaluators.reference import dense_reference
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan
from ditplan.progress import progress_bar
from ditplan.spec import ExperimentSpec, SeedSet
from ditplan.strategies.apply import run_plan

DENSE = "dense"
WARMUP_SAMPLES = 2
COST_RATIOS = ("flops_ratio", "ideal_flops_ratio", "attention_flops_ratio", "latency_ratio")  # dense's: 1
EXTRA_DISTRIBUTION = ("isc", "prc")  # torch-fidelity's IS and precision/recall: asked for by name only


@dataclass
class Measurement:
    """``metrics``: per plan name its metrics (dense's under :data:`DENSE` when dense ran, i.e. timed);
    ``seconds``: elapsed time of the whole measurement; ``sample_forwards``: what it spent."""

    seed_set: SeedSet
    metrics: dict[str, dict[str, float]]
    seconds: float
    sample_forwards: int


@dataclass
class _Runs:
    """What the runs of every plan gave: samples (N, C, H, W), seconds per round, FLOPs, cache bytes."""

    samples: dict[str, torch.Tensor]
    seconds: dict[str, list[float]]
    flops: dict[str, Flops]
    cache_bytes: dict[str, int]
    round_sizes: list[int]


def rounds(seed_set: SeedSet, count: int) -> list[tuple[list[Any], list[int]]]:
    """``seed_set`` cut into ``count`` consecutive rounds of (nearly) equal size."""
    n = len(seed_set.seeds)
    cuts = [round(i * n / count) for i in range(count + 1)]
    return [(seed_set.conditions[a:b], seed_set.seeds[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]


def _run_rounds(adapter: ModelAdapter, spec: ExperimentSpec, plans: Mapping[str, Plan | None], seed_set: SeedSet,
                count: int, warm_up: bool, bar: Any) -> _Runs:
    """Every plan on the whole set in ``count`` rounds, plans taking turns (rotated) in each, timed."""
    settings = spec.sampler.settings()
    if warm_up:  # loads fine-tuned networks, first-call allocations
        for plan in plans.values():
            run_plan(adapter, plan, seed_set.conditions[:WARMUP_SAMPLES], seed_set.seeds[:WARMUP_SAMPLES], settings)
    out = _Runs({}, {name: [] for name in plans}, dict.fromkeys(plans, Flops(0.0, 0.0)), dict.fromkeys(plans, 0), [])
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in plans}
    device = next(adapter.transformer.parameters()).device
    for index, (conditions, seeds) in enumerate(rounds(seed_set, count)):
        out.round_sizes.append(len(seeds))
        for name in turn_order(list(plans), index, count):
            synchronize(device)
            start = time.perf_counter()
            run = run_plan(adapter, plans[name], conditions, seeds, settings)  # synchronises: .cpu()
            out.seconds[name].append(time.perf_counter() - start)
            parts[name].append(run.samples)
            spent = run_flops(adapter, plans[name], settings, run, len(seeds))
            out.flops[name] = Flops(out.flops[name].attention + spent.attention, out.flops[name].total + spent.total)
            out.cache_bytes[name] = max(out.cache_bytes[name], run.peak_cache_bytes)
            bar.update(len(seeds))
    out.samples = {name: torch.cat(chunks) for name, chunks in parts.items()}
    return out


def domain_wanted(adapter: ModelAdapter, spec: ExperimentSpec, metrics: Sequence[str] | None) -> list[str]:
    """The domain metrics ``metrics`` names (None: every one that applies to this experiment)."""
    if metrics is None:
        return applicable_metrics(spec, getattr(adapter, "num_classes", None))
    return [m for m in metrics if m in DOMAIN_METRICS]


def quality(adapter: ModelAdapter, spec: ExperimentSpec, images: torch.Tensor, dense: torch.Tensor,
            conditions: Sequence[Any], metrics: Sequence[str] | None, reference: torch.Tensor | str | None = None,
            ) -> dict[str, float]:
    """Fidelity of ``images`` to ``dense`` (same seeds; LPIPS where ``evaluation.lpips_weights_path`` is set and
    ``metrics`` is None or names it) and the domain metrics ``metrics`` asks for (None: every one that
    applies), against ``reference`` (default: the experiment's real images)."""
    values = {m.name: m.value for m in FidelityEvaluator().evaluate(images, dense)}
    if spec.evaluation.lpips_weights_path and (metrics is None or "lpips" in metrics):
        from ditplan.evaluators.lpips import lpips

        values["lpips"] = lpips(images, dense, spec.evaluation.lpips_weights_path, spec.model.torch_device())
    wanted = domain_wanted(adapter, spec, metrics)
    if wanted:
        num_classes = getattr(adapter, "num_classes", None)
        values.update({m.name: m.value for m in domain_metrics(spec, images, conditions, num_classes, wanted, reference)})
    if spec.workload.prompts is not None and spec.evaluation.clip_weights_path and (metrics is None or "clip_score" in metrics):
        from ditplan.evaluators.clip_score import ClipScorer

        values["clip_score"] = ClipScorer(spec.evaluation.clip_weights_path).score(images, conditions).value
    return values


def dense_values(adapter: ModelAdapter, spec: ExperimentSpec, dense: torch.Tensor, conditions: Sequence[Any],
                 metrics: Sequence[str]) -> dict[str, float]:
    """Dense's own values of ``metrics`` on its samples ``dense``: what a bound relative to dense
    (``relative_to: dense``) compares a plan with; its cost ratios are 1."""
    return {**dict.fromkeys(COST_RATIOS, 1.0), **quality(adapter, spec, dense, dense, conditions, metrics)}


def _costs(adapter: ModelAdapter, spec: ExperimentSpec, plan: Plan | None, flops: Flops, dense_flops: Flops,
           cache_bytes: int) -> dict[str, float]:
    ratio = flops.total / dense_flops.total
    return {"flops_ratio": ratio, "attention_flops_ratio": flops.attention / dense_flops.attention,
            "ideal_flops_ratio": ideal_flops_ratio(adapter, plan, spec.sampler.settings(), ratio),
            "cache_peak_mb": cache_bytes / 2**20}


def _latency(seconds: list[float], dense: list[float], round_sizes: list[int]) -> dict[str, float]:
    ratios = [mine / theirs for mine, theirs in zip(seconds, dense)]
    return {"latency_ratio": statistics.median(ratios), "latency_ratio_min": min(ratios),
            "latency_ratio_max": max(ratios),
            "latency_ms": 1000 * statistics.median(s / k for s, k in zip(seconds, round_sizes))}  # per sample


def measure(
    adapter: ModelAdapter, spec: ExperimentSpec, plans: Mapping[str, Plan | None], seed_set: SeedSet,
    metrics: Sequence[str] | None = None, timed: bool = False, rounds_count: int = 1, dense: torch.Tensor | None = None,
    show_progress: bool = False,
) -> Measurement:
    """Measure ``plans`` (by name; None is dense) on ``seed_set``. ``metrics``: the domain metrics to compute
    besides fidelity and cost (None: every one that applies). ``timed``: latency by the interleaved protocol
    in ``rounds_count`` rounds, dense running beside the plans (its metrics under :data:`DENSE`); untimed,
    each plan runs once and ``dense`` (default: the cached dense reference) is what they are compared with."""
    settings = spec.sampler.settings()
    started = time.perf_counter()
    runs_of = {DENSE: None, **plans} if timed else dict(plans)
    with progress_bar(len(runs_of) * len(seed_set.seeds), f"measuring on {seed_set.name} seeds",
                      enabled=show_progress) as bar:
        runs = _run_rounds(adapter, spec, runs_of, seed_set, rounds_count if timed else 1, timed, bar)
    if timed:
        dense = runs.samples[DENSE]
    elif dense is None:
        dense = dense_reference(adapter, settings, seed_set.conditions, seed_set.seeds, spec.evaluation.cache_dir)
    distribution = set(domain_wanted(adapter, spec, metrics)) - {"class_agreement"}
    reference = reference_images(spec) if distribution else None  # read once for every plan
    dense_flops = plan_flops(adapter, None, settings, len(seed_set.seeds))
    out: dict[str, dict[str, float]] = {}
    for name, samples in runs.samples.items():
        plan = plans.get(name)
        values = quality(adapter, spec, samples, dense, seed_set.conditions, metrics, reference)
        values.update(_costs(adapter, spec, plan, runs.flops[name], dense_flops, runs.cache_bytes[name]))
        if timed:
            values.update(_latency(runs.seconds[name], runs.seconds[DENSE], runs.round_sizes))
        out[name] = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    warm = len(runs.samples) * sample_forwards(min(WARMUP_SAMPLES, len(seed_set.seeds)), settings) if timed else 0
    spent = len(runs.samples) * sample_forwards(len(seed_set.seeds), settings) + warm
    return Measurement(seed_set, out, time.perf_counter() - started, spent)
