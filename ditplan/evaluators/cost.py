"""Cost of a plan: analytic FLOPs, end-to-end latency, attention time share, peak memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ditplan.models.family import ModelAdapter, linear_flops
from ditplan.models.sampling import plan_target, target_settings
from ditplan.plan import Plan, PlanError
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import (
    CachePlanner,
    PlanRun,
    build_strategies,
    sparse_layout,
)
from ditplan.strategies.base import (
    AttentionShape,
    cross_attention_flops,
    dense_attention_flops,
)
from ditplan.strategies.guidance import GuidanceSchedule


@dataclass(frozen=True)
class Flops:
    """FLOPs of sampling one batch: self-attention only, and the whole transformer."""

    attention: float
    total: float


# NOTE: ``flops_ratio`` (objectives, reports, plan files) counts window attention as the pairs its kernel
# executes: that is what a plan costs when it runs (and what latency follows), and what FlopCounterMode
# measures on the kernel. The masked band computes its query blocks' whole key spans, more than its ideal
# band; ``ideal_flops_ratio`` counts the ideal band (DiTFastAttn's own count). Blocks and tiles: equal.
FLOPS_COUNT = "executed"


def sdtm_overhead_flops(adapter: ModelAdapter) -> int:
    """What one SDTM adds per sample and forward: the merge (two C×C maps on N tokens) and the second
    modulation of each end block that makes its keys/values (where the family's blocks modulate themselves)."""
    c, n = adapter.hidden_dim, adapter.num_tokens
    return 2 * linear_flops(n, c, c) + 2 * adapter.block_modulation_flops()


def plan_flops(adapter: ModelAdapter, plan: Plan | None, settings: SamplerSettings, batch: int = 1,
               text_tokens: int | None = None, window_count: str = FLOPS_COUNT) -> Flops:
    """Analytic FLOPs of ``settings.num_steps`` transformer forwards of ``batch`` samples (×2 with CFG)
    under ``plan`` (dense when None). Counts matrix products, as ``torch.utils.flop_counter`` does;
    ``text_tokens`` (default: the adapter's, PixArt's prompt length) cost their cross-attention K/V and
    caption projections on both sides of every ratio. ``window_count``: window attention counted as the
    pairs its kernel executes (``executed``) or as the ideal window (``ideal``)."""
    text_tokens = adapter.text_tokens if text_tokens is None else text_tokens
    if plan is not None and plan.cache:
        raise PlanError("the FLOPs of a plan carrying one of diffusers' caches are what ran: count a run with the "
                        "runtime's ExecutionCounter and use executed_flops")
    plan = plan if plan is not None else Plan.uniform(plan_target(adapter, settings))
    strategies = build_strategies(plan)
    planner = CachePlanner(plan, strategies)
    schedule = GuidanceSchedule.from_plan(plan) if settings.cfg else None
    count = (text_tokens, window_count)
    if schedule is None:
        return _stream_flops(adapter, planner, planner.steps, batch * (2 if settings.cfg else 1), settings.cfg, *count)
    # guidance skips unconditional steps: the conditional calls at every step, the unconditional ones at the steps
    # that compute it, each on its own cache plan; an unconditional call costs what a batch of both halves costs
    # beyond the conditional half alone (nothing where it takes the conditional call's attention output: ASC)
    uncond = CachePlanner(plan, strategies, steps=schedule.computed_steps)
    cond = _stream_flops(adapter, planner, planner.steps, batch, False, *count)
    both = _stream_flops(adapter, uncond, uncond.steps, 2 * batch, True, *count)
    alone = _stream_flops(adapter, uncond, uncond.steps, batch, False, *count)
    return Flops(attention=cond.attention + both.attention - alone.attention, total=cond.total + both.total - alone.total)


def _stream_flops(adapter: ModelAdapter, planner: CachePlanner, steps: Sequence[int], rows: int, cfg: bool,
                  text_tokens: int, window_count: str) -> Flops:
    """FLOPs of the transformer calls of ``rows`` rows (``cfg``: both guidance halves) at ``steps`` on ``planner``."""
    plan = planner.plan
    n, layers = adapter.num_tokens, adapter.num_layers
    shape = AttentionShape(batch=rows, tokens=n, dim=adapter.hidden_dim, heads=adapter.transformer.config.num_attention_heads,
                           window_count=window_count)
    once = adapter.other_flops(text_tokens)[1]
    layout = sparse_layout(plan)
    attention, other = 0.0, 0.0
    for step in steps:
        # (query, key/value) tokens of each block's attention; SDTM changes them, nothing else does
        tokens = layout.tokens_by_block(step, plan.num_steps, layers, n) if layout else [(n, n)] * layers
        for layer, (queries, keys) in enumerate(tokens):
            if planner.strategy_at(step, layer).level == "block":
                continue  # the whole block is skipped: its output comes from cached residuals
            other += rows * adapter.other_flops(text_tokens, queries, layer)[0]
            if not adapter.plan_attention:
                attention += rows * joint_cell_flops(adapter, planner, step, layer, cfg, text_tokens, window_count)
                continue
            if (queries, keys) != (n, n):  # an SDTM block: its attention is always computed
                attention += cross_attention_flops(rows, queries, keys, shape.dim)
                continue
            wants = planner.wants(step, layer)
            attention += planner.strategy_at(step, layer).attention_flops(shape, cfg, wants)
            for entry in wants:  # e.g. the window pass a dense step spends on a later WA-RS residual
                attention += planner.next_reader(step, layer, entry).production_flops(entry, shape)  # type: ignore[union-attr]
        computed_modules = [m for m in layout.modules if planner.strategy_at(step, m[0]).level != "block"] if layout else []
        other += rows * (once + sdtm_overhead_flops(adapter) * len(computed_modules))
    return Flops(attention=attention, total=attention + other)


def joint_cell_flops(adapter: ModelAdapter, planner: CachePlanner, step: int, layer: int, cfg: bool, text_tokens: int,
                     window_count: str) -> float:
    """FLOPs per sample of one (step, layer) cell on a joint attention: a whole-module strategy's share of the
    family's count, or a kernel strategy's pairs in the family's count, plus the pairs a dense step's kernel adds
    for a later cell's cache entry (WA-RS's residual)."""
    strategy, n = planner.strategy_at(step, layer), adapter.num_tokens
    share = strategy.module_share(cfg)
    if share is not None:
        flops = share * adapter.joint_attention_flops(layer, text_tokens)
    else:
        flops = adapter.joint_attention_flops(layer, text_tokens, strategy.joint_pairs(n, text_tokens, window_count))
    for entry in planner.wants(step, layer):
        extra = planner.next_reader(step, layer, entry).joint_production_pairs(entry, n, text_tokens, window_count)  # type: ignore[union-attr]
        # the family's count of those pairs alone: its count with them, less its count with none
        flops += adapter.joint_attention_flops(layer, text_tokens, extra) - adapter.joint_attention_flops(layer, text_tokens, 0)
    return float(flops)


def layer_attention_flops(adapter: ModelAdapter, layer: int, text_tokens: int) -> float:
    """FLOPs of block ``layer``'s self-attention computed in full, per sample."""
    if not adapter.plan_attention:
        return float(adapter.joint_attention_flops(layer, text_tokens))
    return dense_attention_flops(AttentionShape(batch=1, tokens=adapter.num_tokens, dim=adapter.hidden_dim,
                                                heads=adapter.transformer.config.num_attention_heads))


def executed_flops(adapter: ModelAdapter, counts: dict[str, list[int]], calls: int, rows: int,
                   text_tokens: int | None = None) -> Flops:
    """Whole-transformer and self-attention FLOPs of what ran, from the counts of an ``ExecutionCounter``
    (block parts executed per layer over ``calls`` transformer calls of ``rows`` rows each): for plans
    carrying one of diffusers' caches, which decide at run time what computes."""
    text_tokens = adapter.text_tokens if text_tokens is None else text_tokens
    cross = adapter.cross_attention_block_flops(text_tokens)
    attention, other = 0.0, float(calls * adapter.other_flops(text_tokens)[1])
    for layer in range(adapter.num_layers):
        per_block = adapter.other_flops(text_tokens, layer=layer)[0]
        attention += counts["self_attention"][layer] * layer_attention_flops(adapter, layer, text_tokens)
        other += counts["block"][layer] * (per_block - cross) + counts["cross_attention"][layer] * cross
    return Flops(attention=rows * attention, total=rows * (attention + other))


def run_flops(adapter: ModelAdapter, plan: Plan | None, settings: SamplerSettings, run: PlanRun, batch: int) -> Flops:
    """FLOPs of one sampling run of ``batch`` samples under ``plan``: analytic, or for a plan carrying
    one of diffusers' caches, from what ran (its self-attention part: the self-attentions that ran)."""
    if run.executed is None:
        return plan_flops(adapter, plan, settings, batch)
    rows = batch * (2 if settings.cfg and not adapter.two_calls() else 1)  # rows per transformer call
    return executed_flops(adapter, run.executed.counts, run.executed.calls, rows)


def plan_flops_ratio(adapter: ModelAdapter, plan: Plan) -> float | None:
    """``plan``'s whole-transformer FLOPs ratio to dense on ``adapter`` under the sampler the plan records;
    None when the model is not the plan's shape (layers, tokens) or the plan carries one of diffusers'
    caches (its FLOPs are what a run executed)."""
    if plan.cache or (adapter.num_layers, adapter.num_tokens) != (plan.target.num_layers, plan.target.num_tokens):
        return None
    settings = target_settings(plan.target, type(adapter))
    return plan_flops(adapter, plan, settings).total / plan_flops(adapter, None, settings).total


def ideal_flops_ratio(adapter: ModelAdapter, plan: Plan | None, settings: SamplerSettings, flops_ratio: float) -> float:
    """The FLOPs ratio of ``plan`` to dense with window attention counted as its ideal window; a plan
    carrying one of diffusers' caches runs no window, so it is ``flops_ratio`` (what ran) itself."""
    if plan is None or plan.cache:
        return flops_ratio
    return plan_flops(adapter, plan, settings, window_count="ideal").total / plan_flops(adapter, None, settings).total


@dataclass(frozen=True)
class Latency:
    """Seconds per run over ``repeats`` (after warm-up), and the torch threads used."""

    median: float
    minimum: float
    maximum: float
    runs: tuple[float, ...]
    threads: int


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads what ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(run: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> Latency:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Latency(statistics.median(times), min(times), max(times), tuple(times), torch.get_num_threads())


def turn_order(names: Sequence[str], index: int, count: int) -> list[str]:
    """The order in which ``names`` take turns in round ``index`` of ``count``: rotated by a
    ``1 / count`` share each round, so that no plan (dense included) always runs first. NOTE: with dense
    first in every round, diffusers' FirstBlockCache at a threshold that skips nothing (every block
    computed, plus its check) measured 0.956 of dense (band 0.95–0.99) on the 2-core CPU machine."""
    shift = index * len(names) // count
    return [*names[shift:], *names[:shift]]


def interleaved_times(runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Seconds of each run over ``repeats`` rounds, the runs taking turns in every round (in rotated
    order) so that drift on a noisy machine hits all of them alike (call each run once before, as a
    warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(repeats):
        for name in turn_order(list(runs), index, repeats):
            run = runs[name]
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def attention_time_share(adapter: ModelAdapter, run: Callable[[], Any]) -> float:
    """Share of one run's wall time spent inside the self-attention modules (timed by forward hooks)."""
    device = next(adapter.transformer.parameters()).device
    spent = [0.0]
    started: list[float] = []

    def before(*_: Any) -> None:
        synchronize(device)
        started.append(time.perf_counter())

    def after(*_: Any) -> None:
        synchronize(device)
        spent[0] += time.perf_counter() - started.pop()

    handles = []
    for attn in adapter.self_attention_layers():
        handles += [attn.register_forward_pre_hook(before), attn.register_forward_hook(after)]
    try:
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return spent[0] / total


def peak_memory_bytes(run: Callable[[], Any], device: torch.device) -> int:
    """CUDA: max allocated during ``run``. CPU: the process's peak RSS after it (model, data and all:
    what the machine must hold; its growth alone reads 0 whenever an earlier stage peaked higher)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        run()
        return torch.cuda.max_memory_allocated(device)
    run()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # NOTE: KiB on Linux


def sample_forwards(samples: int, settings: SamplerSettings) -> int:
    """The budget unit: transformer sample-forwards of sampling ``samples`` samples once — every row
    (each CFG half counted) through the transformer at every step."""
    return samples * (2 if settings.cfg else 1) * settings.num_steps
