"""DiTFastAttn's greedy plan search (their Algorithm 1), faithfully.

For every step after the first (step 0 stays dense): compute the dense transformer output O at the
current latents; for each layer i in order try the candidates from most to least compression,
``[AST, WA-RS+ASC, WA-RS, ASC]``, re-running the whole transformer with layer i compressed (choices
already made for earlier layers at this step stay), and keep the first with
``L(O, O') < (i + 1) / L · δ``; if none passes the layer stays dense. The step is then taken with
the chosen plan, so calibration follows the compressed trajectory. ``L`` is DiTFastAttn's relative L1.
Without guidance the CFG-sharing candidates are left out (they would equal their plain versions).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ditplan.evaluators.cost import peak_memory_bytes
from ditplan.evaluators.fidelity import relative_l1
from ditplan.models.adapters import ModelAdapter
from ditplan.models.sampling import SamplerSettings, combine_guidance, plan_target, sample_batch
from ditplan.plan import Plan, library_versions
from ditplan.progress import Bar
from ditplan.strategies.apply import CachePlanner, apply_plan, build_strategies, remove_plan
from ditplan.strategies.base import BlockStrategy

CANDIDATES: tuple[str, ...] = ("ast", "wars+asc", "wars", "asc")
CFG_SHARING = frozenset({"wars+asc", "asc"})
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15)  # D1 … D6


def threshold_name(index: int) -> str:
    return f"D{index + 1}"


@dataclass
class GreedyResult:
    plan: Plan
    forwards: int
    sample_forwards: int  # rows × forwards: every sample (each CFG half counted) through the transformer once
    seconds: float
    peak_memory_bytes: int = 0  # CUDA: max allocated during calibration; CPU: the process's peak RSS
    # every loss the run measured: (step, layer, candidate) → L(O, O') of that trial forward. At δ = 0
    # nothing passes, so the trajectory stays dense and this is each cell alone against dense (the proxy)
    losses: dict[tuple[int, int, str], float] = field(default_factory=dict)


def greedy_search(
    adapter: ModelAdapter,
    settings: SamplerSettings,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    threshold: float,
    window_size: int | None = None,
    bar: Bar | None = None,
    candidates: Sequence[str] = CANDIDATES,
) -> GreedyResult:
    """One greedy run at threshold δ on the calibration batch ``(conditions, seeds)``, run through the
    transformer in micro-batches of at most ``settings.batch_size`` samples (the plan does not depend on
    the size: each decision's loss is taken over the whole batch). ``candidates``: the methods tried per
    layer, in that order (DiTFastAttn's by default; the proxy adds block caching)."""
    target = plan_target(adapter, settings)
    window = {"window_size": window_size} if window_size is not None else {}
    candidates = tuple(c for c in candidates if settings.cfg or c not in CFG_SHARING)
    grid = [["full"] * adapter.num_layers for _ in range(settings.num_steps)]
    params = {"wars": dict(window), "wars+asc": dict(window)}
    start_plan = Plan(target, tuple(map(tuple, grid)), params=params)
    strategies = build_strategies(start_plan, extra=candidates)
    block_level = any(isinstance(s, BlockStrategy) for s in strategies.values())
    hooked = range(adapter.num_layers) if block_level else ()  # any block may take a block-level candidate
    runtime = apply_plan(adapter.transformer, start_plan, target, block_layers=hooked)
    forwards = [0, 0]  # transformer forwards of the whole batch (micro-batches together), rows through them
    losses: dict[tuple[int, int, str], float] = {}

    # Micro-batches of at most settings.batch_size samples, each with its own caches (attention entries and
    # block residuals): every transformer forward runs them in turn, so a calibration batch of any size fits
    # what one sampling batch needs.
    chunks = [(a, min(a + settings.batch_size, len(seeds))) for a in range(0, len(seeds), settings.batch_size)]
    chunk_caches = [([{} for _ in runtime.caches], [[] for _ in runtime.block_residuals]) for _ in chunks]

    def forward(step: int, row: list[str], model_in: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
        grid[step] = list(row)
        runtime.planner = CachePlanner(Plan(target, tuple(map(tuple, grid)), params=params), strategies, open_ended=True)
        forwards[0] += 1
        forwards[1] += len(model_in) * (2 if settings.cfg else 1)
        outs = []
        for (a, b), (caches, residuals) in zip(chunks, chunk_caches):
            runtime.caches, runtime.block_residuals = caches, residuals
            x = model_in[a:b]
            batch = torch.cat([x, x]) if settings.cfg else x
            outs.append(adapter.predict(batch, t, _chunk_inputs(inputs, a, b, len(model_in), settings.cfg)))
        if not settings.cfg:
            return torch.cat(outs)  # (N, C, H, W): the raw transformer output
        halves = [out.chunk(2) for out in outs]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])  # (2N, C, H, W): [cond; uncond]

    def calibrate(step: int, model_in: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
        row = ["full"] * adapter.num_layers
        if step > 0:
            runtime.frozen = True  # trial forwards read the caches but must not overwrite them
            try:
                dense = forward(step, row, model_in, t, inputs)
                for layer in range(adapter.num_layers):
                    bound = (layer + 1) / adapter.num_layers * threshold
                    for candidate in candidates:
                        row[layer] = candidate
                        losses[step, layer, candidate] = relative_l1(dense, forward(step, row, model_in, t, inputs))
                        if losses[step, layer, candidate] < bound:
                            break
                    else:
                        row[layer] = "full"
            finally:
                runtime.frozen = False
        out = forward(step, row, model_in, t, inputs)  # takes the step with the chosen row (writes caches)
        if bar is not None:
            bar.update(1)
        return combine_guidance(out, settings) if settings.cfg else out

    started = time.perf_counter()
    try:
        device = next(adapter.transformer.parameters()).device
        peak = peak_memory_bytes(lambda: sample_batch(adapter, conditions, seeds, settings, predict=calibrate), device)
    finally:
        remove_plan(adapter.transformer)
    seconds = time.perf_counter() - started
    used = {name for row in grid for name in row}
    plan = Plan(
        target,
        tuple(map(tuple, grid)),
        params={k: v for k, v in params.items() if k in used},
        provenance={
            "search": "greedy",
            "threshold": threshold,
            "candidates": list(candidates),
            "calibration": {"conditions": list(conditions), "seeds": list(seeds)},
            "transformer_forwards": forwards[0],
            "sample_forwards": forwards[1],
            "search_seconds": round(seconds, 2),
            "peak_memory_mb": round(peak / 2**20, 1),
            "versions": library_versions(),
        },
    )
    return GreedyResult(plan, forwards[0], forwards[1], seconds, peak, losses)


def _chunk_inputs(inputs: dict, a: int, b: int, n: int, cfg: bool) -> dict:
    """The transformer inputs of samples ``a:b`` of ``n``: with CFG the rows of both halves, ``[cond; uncond]``."""
    if not cfg:
        return {k: v[a:b] for k, v in inputs.items()}
    return {k: torch.cat([v[a:b], v[n + a : n + b]]) for k, v in inputs.items()}


def expected_forwards(plan: Plan, candidates: Sequence[str]) -> int:
    """Transformer forwards Algorithm 1 spends to produce ``plan``: step 0 one forward; every later step
    one dense reference, one trial per candidate tried per layer, and one forward taking the step."""
    total = 1
    for row in plan.grid[1:]:
        tries = sum(candidates.index(m) + 1 if m in candidates else len(candidates) for m in row)
        total += 2 + tries
    return total
