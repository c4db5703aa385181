"""``ditplan evaluate``: one plan against dense on an experiment's seeds, quality and cost in one table.

The metrics come from the one measuring path (:func:`~ditplan.evaluators.measure.measure`, timed:
latency in rounds interleaved with dense); two profiles of one run each are added beside them, the
share of time spent in self-attention and the peak memory.
"""

from __future__ import annotations

import warnings

from ditplan.evaluators.base import Metric
from ditplan.evaluators.cost import attention_time_share, peak_memory_bytes
from ditplan.evaluators.measure import DENSE, EXTRA_DISTRIBUTION, domain_wanted, measure
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan
from ditplan.registry import direction
from ditplan.spec import ExperimentSpec, SeedSet
from ditplan.strategies.apply import run_plan

PLAN = "plan"


def _profiles(adapter: ModelAdapter, spec: ExperimentSpec, plan: Plan | None, seed_set: SeedSet) -> dict[str, tuple[float, float]]:
    """Attention time share and peak memory (MiB) of one run of ``plan`` and of dense on ``seed_set``."""
    device = next(adapter.transformer.parameters()).device
    settings = spec.sampler.settings()
    runs = {mine: (lambda p=p: run_plan(adapter, p, seed_set.conditions, seed_set.seeds, settings))
            for mine, p in ((True, plan), (False, None))}
    return {
        "attention_time_share": (attention_time_share(adapter, runs[True]), attention_time_share(adapter, runs[False])),
        # CUDA: max allocated during a run; CPU: the process's peak RSS so far (not per run: see cache_peak_mb)
        "peak_memory_mb": (peak_memory_bytes(runs[True], device) / 2**20, peak_memory_bytes(runs[False], device) / 2**20),
    }


def evaluate_plan(
    spec: ExperimentSpec, adapter: ModelAdapter, plan: Plan | None, show_progress: bool = False,
    samples: int | None = None, seed_set: str = "held_out",
) -> dict[str, tuple[Metric, Metric]]:
    """``{metric: (plan value, dense value)}`` on the first ``samples`` samples (default: the experiment's
    size of that set) of ``seed_set`` (``held_out`` by default: what a user reads; ``search`` or
    ``calibration`` to check a search); latency in ``evaluation.latency_repeats`` interleaved rounds."""
    chosen = spec.workload.seed_set(seed_set, samples) if samples else spec.seed_set(seed_set)
    if spec.workload.prompts is not None and not spec.evaluation.clip_weights_path:
        warnings.warn("clip_score skipped: set evaluation.clip_weights_path to a local CLIP folder to compute it",
                      stacklevel=2)
    if not spec.evaluation.lpips_weights_path:
        warnings.warn("lpips skipped: set evaluation.lpips_weights_path to a local folder of torch-fidelity's LPIPS "
                      "checkpoints to compute it", stacklevel=2)
    wanted = [*domain_wanted(adapter, spec, None), *(EXTRA_DISTRIBUTION if spec.evaluation.feature_extractor else ()),
              "clip_score", "lpips"]
    result = measure(adapter, spec, {PLAN: plan} if plan is not None else {}, chosen, wanted, timed=True,
                     rounds_count=spec.evaluation.latency_repeats, show_progress=show_progress)
    mine, dense = result.metrics[PLAN if plan is not None else DENSE], result.metrics[DENSE]
    pairs = {name: (mine[name], dense.get(name, float("nan"))) for name in mine}
    pairs.update(_profiles(adapter, spec, plan, chosen))
    return {name: (Metric(name, a, direction(name)), Metric(name, b, direction(name))) for name, (a, b) in pairs.items()}


def format_table(results: dict[str, tuple[Metric, Metric]]) -> str:
    lines = ["| metric | plan | dense | better |", "|---|---|---|---|"]
    for name, (mine, ref) in results.items():
        lines.append(f"| {name} | {mine.value:.4g} | {ref.value:.4g} | {'lower' if mine.direction == 'minimize' else 'higher'} |")
    return "\n".join(lines)
