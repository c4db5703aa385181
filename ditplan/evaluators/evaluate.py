"""Evaluate one plan against dense on an experiment's workload: quality and cost in one table."""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path

import torch

from ditplan.errors import UserError
from ditplan.evaluators.base import Metric
from ditplan.evaluators.cost import (
    attention_time_share,
    ideal_flops_ratio,
    interleaved_times,
    peak_memory_bytes,
    plan_flops,
    run_flops,
)
from ditplan.evaluators.domain import applicable_metrics, domain_metrics
from ditplan.evaluators.fidelity import FidelityEvaluator
from ditplan.evaluators.reference import dense_reference
from ditplan.files import check_folder, readable_file
from ditplan.models.adapters import ModelAdapter
from ditplan.strategies.apply import PlanRun, run_plan
from ditplan.plan import Plan
from ditplan.spec import DIGITS_REFERENCE, ExperimentSpec



def reference_images(spec: ExperimentSpec) -> torch.Tensor | str:
    """The real images distribution metrics compare with (``evaluation.reference``)."""
    reference = spec.evaluation.reference
    if reference == DIGITS_REFERENCE:
        from ditplan.models.digits import load_digits

        return load_digits("held_out")[0]
    if reference is None or not Path(reference).is_dir():
        raise UserError(f"evaluation.reference {reference!r} is neither '{DIGITS_REFERENCE}' nor a folder of images")
    return reference


def check_evaluation(spec: ExperimentSpec) -> None:
    """Refuse, before any work, an evaluation section whose extractor, weights or reference do not exist."""
    evaluation = spec.evaluation
    if evaluation.feature_extractor:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        import ditplan.evaluators.distribution  # noqa: F401  (registers the digit extractor)

        if evaluation.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise UserError(f"evaluation.feature_extractor {evaluation.feature_extractor!r} is not registered; choose one "
                            f"of {sorted(FEATURE_EXTRACTORS_REGISTRY)} or register yours with torch-fidelity")
    if evaluation.feature_extractor_weights_path:
        readable_file(evaluation.feature_extractor_weights_path, "evaluation.feature_extractor_weights_path file", 1 << 40)
    if evaluation.reference and evaluation.reference != DIGITS_REFERENCE:
        check_folder(evaluation.reference, "evaluation.reference folder")
    if evaluation.clip_weights_path:
        check_folder(evaluation.clip_weights_path, "evaluation.clip_weights_path folder")


def evaluate_plan(
    spec: ExperimentSpec, adapter: ModelAdapter, plan: Plan | None, show_progress: bool = False, samples: int | None = None,
    seed_set: str = "held_out",
) -> dict[str, tuple[Metric, Metric]]:
    """``{metric: (plan value, dense value)}``: fidelity, distribution quality (when configured) and cost,
    on the first ``samples`` samples (default: the experiment's size of that set) of ``seed_set``
    (``held_out`` by default: what a user reads; ``search`` or ``calibration`` to check a search)."""
    settings = spec.sampler.settings()
    _, conditions, seeds = spec.workload.seed_set(seed_set, samples) if samples else spec.seed_set(seed_set)
    device = next(adapter.transformer.parameters()).device
    dense = dense_reference(adapter, settings, conditions, seeds, spec.evaluation.cache_dir, show_progress)

    def run(with_plan: Plan | None) -> torch.Tensor:
        runs[with_plan is not None] = result = run_plan(adapter, with_plan, conditions, seeds, settings)
        return result.samples

    runs: dict[bool, PlanRun] = {}
    images = run(plan)  # also the warm-up
    plan_run = runs[plan is not None]  # what ran (FLOPs of a plan carrying one of diffusers' caches), cache sizes
    named = interleaved_times({"plan": lambda: run(plan), "dense": lambda: run(None)}, device,
                              spec.evaluation.latency_repeats)
    times = {True: named["plan"], False: named["dense"]}

    out: dict[str, tuple[Metric, Metric]] = {}
    for mine, ref in zip(FidelityEvaluator().evaluate(images, dense), FidelityEvaluator().evaluate(dense, dense)):
        out[mine.name] = (mine, ref)
    if spec.evaluation.feature_extractor:
        num_classes = getattr(adapter, "num_classes", None)
        wanted = [*applicable_metrics(spec, num_classes), "isc", "prc"]
        reference = reference_images(spec)
        mine_and_dense = (domain_metrics(spec, x, conditions, num_classes, wanted, reference) for x in (images, dense))
        for mine, ref in zip(*mine_and_dense):
            out[mine.name] = (mine, ref)
    if spec.workload.prompts is not None:
        if spec.evaluation.clip_weights_path:
            from ditplan.evaluators.clip_score import ClipScorer

            scorer = ClipScorer(spec.evaluation.clip_weights_path)
            out["clip_score"] = (scorer.score(images, conditions), scorer.score(dense, conditions))
        else:
            warnings.warn(
                "clip_score skipped: set evaluation.clip_weights_path to a local CLIP folder to compute it",
                stacklevel=2,
            )
    flops, dense_flops = run_flops(adapter, plan, settings, plan_run, len(seeds)), plan_flops(adapter, None, settings, len(seeds))
    latency = {k: statistics.median(v) for k, v in times.items()}
    pairs = {
        "latency_s": (latency[True], latency[False], "minimize"),
        "latency_ratio": (latency[True] / latency[False], 1.0, "minimize"),
        "attention_flops_ratio": (flops.attention / dense_flops.attention, 1.0, "minimize"),
        "flops_ratio": (flops.total / dense_flops.total, 1.0, "minimize"),
        "ideal_flops_ratio": (ideal_flops_ratio(adapter, plan, settings, flops.total / dense_flops.total), 1.0, "minimize"),
        "cache_peak_mb": (plan_run.peak_cache_bytes / 2**20, 0.0, "minimize"),
    }
    for name, (mine_value, ref_value, direction) in pairs.items():
        out[name] = (Metric(name, mine_value, direction), Metric(name, ref_value, direction))
    share_plan = attention_time_share(adapter, lambda: run(plan))
    out["attention_time_share"] = (
        Metric("attention_time_share", share_plan, "minimize"),
        Metric("attention_time_share", attention_time_share(adapter, lambda: run(None)), "minimize"),
    )
    # CUDA: max allocated during a run; CPU: the process's peak RSS so far (not per run: see plan cache memory)
    out["peak_memory_mb"] = (
        Metric("peak_memory_mb", peak_memory_bytes(lambda: run(plan), device) / 2**20, "minimize"),
        Metric("peak_memory_mb", peak_memory_bytes(lambda: run(None), device) / 2**20, "minimize"),
    )
    out["latency_noise_band"] = (
        Metric("latency_noise_band", (max(times[True]) - min(times[True])) / latency[True], "minimize"),
        Metric("latency_noise_band", (max(times[False]) - min(times[False])) / latency[False], "minimize"),
    )
    return out


def format_table(results: dict[str, tuple[Metric, Metric]]) -> str:
    lines = ["| metric | plan | dense | better |", "|---|---|---|---|"]
    for name, (mine, ref) in results.items():
        lines.append(f"| {name} | {mine.value:.4g} | {ref.value:.4g} | {'lower' if mine.direction == 'minimize' else 'higher'} |")
    return "\n".join(lines)
