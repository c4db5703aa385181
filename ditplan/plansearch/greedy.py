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
from ditplan.models.family import ModelAdapter
from ditplan.models.sampling import cfg_predictions, plan_target, sample_batch
from ditplan.plan import Plan, library_versions
from ditplan.progress import Bar
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import (
    CachePlanner,
    apply_plan,
    build_strategies,
    remove_plan,
)
from ditplan.strategies.base import BlockStrategy

CANDIDATES: tuple[str, ...] = ("ast", "wars+asc", "wars", "asc")
# on joint attention (no wars+asc there): a block's reuse, then AST, WA-RS over the image tokens, ASC
JOINT_CANDIDATES: tuple[str, ...] = ("reuse", "ast", "wars", "asc")


def family_candidates(adapter: ModelAdapter) -> tuple[str, ...]:
    """Greedy's candidates on ``adapter``'s family, most compressing first: those among the family's default methods."""
    candidates = CANDIDATES if adapter.plan_attention else JOINT_CANDIDATES
    return tuple(c for c in candidates if c in adapter.default_methods)
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
    conditions: Sequence[Any], seeds: Sequence[int],  # the calibration batch: a condition and a seed per sample
    threshold: float,
    window_size: int | None = None,
    bar: Bar | None = None,
    candidates: Sequence[str] = CANDIDATES,
) -> GreedyResult:
    """One greedy run at threshold δ on the calibration batch ``(conditions, seeds)``, run through the
    transformer in micro-batches of at most ``settings.batch_size`` samples (the plan does not depend on
    the size: each decision's loss is taken over the whole batch). ``candidates``: the methods tried per
    layer, in that order (DiTFastAttn's by default; the proxy adds block caching)."""
    run = _Calibration(adapter, settings, len(seeds), threshold, window_size, bar, candidates)
    started = time.perf_counter()
    try:
        device = next(adapter.transformer.parameters()).device
        peak = peak_memory_bytes(lambda: sample_batch(adapter, conditions, seeds, settings, predict=run.calibrate),
                                 device)
    finally:
        remove_plan(adapter.transformer)
    seconds = time.perf_counter() - started
    plan = run.found_plan(conditions, seeds, seconds, peak)
    return GreedyResult(plan, run.forwards, run.sample_forwards, seconds, peak, run.losses)


class _Calibration:
    """One greedy run in progress: the plan grid decided so far, installed on the transformer, the
    micro-batches with their own caches, and the forwards and losses counted on the way."""

    def __init__(self, adapter: ModelAdapter, settings: SamplerSettings, num_samples: int, threshold: float,
                 window_size: int | None, bar: Bar | None, candidates: Sequence[str]) -> None:
        """Install the all-dense plan; every block is hooked when a candidate works on whole blocks."""
        self.adapter, self.settings, self.threshold, self.bar = adapter, settings, threshold, bar
        self.target = plan_target(adapter, settings)
        window = {"window_size": window_size} if window_size is not None else {}
        self.candidates = tuple(c for c in candidates if settings.cfg or c not in CFG_SHARING)
        self.grid = [["full"] * adapter.num_layers for _ in range(settings.num_steps)]
        self.params = {"wars": dict(window), "wars+asc": dict(window)}
        start_plan = self.current_plan()
        self.strategies = build_strategies(start_plan, extra=self.candidates)
        block_level = any(isinstance(s, BlockStrategy) for s in self.strategies.values())
        hooked = range(adapter.num_layers) if block_level else ()  # any block may take a block-level candidate
        self.runtime = apply_plan(adapter.transformer, start_plan, self.target, block_layers=hooked)
        self.forwards = 0  # transformer forwards of the whole batch (micro-batches together)
        self.sample_forwards = 0  # rows through them
        self.losses: dict[tuple[int, int, str], float] = {}
        # Micro-batches of at most settings.batch_size samples, each with its own caches (attention entries and
        # block residuals, the runtime's per-chunk state): every transformer forward runs them in turn, so a
        # calibration batch of any size fits what one sampling batch needs.
        size = settings.batch_size
        self.chunks = [(a, min(a + size, num_samples)) for a in range(0, num_samples, size)]

    def current_plan(self) -> Plan:
        """The grid as decided so far, as a plan (without provenance)."""
        return Plan(self.target, tuple(map(tuple, self.grid)), params=self.params)

    def calibrate(self, step: int, model_in: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``sample_batch``'s predict: choose the row of ``step`` (step 0 stays dense), take the step with it
        and return its (guided) prediction."""
        row = self.choose_row(step, model_in, t, inputs) if step > 0 else ["full"] * self.adapter.num_layers
        out = self.forward(step, row, model_in, t, inputs)  # takes the step with the chosen row (writes caches)
        if self.bar is not None:
            self.bar.update(1)
        return self.adapter.guide(*out.chunk(2), self.settings.cfg_scale) if self.settings.cfg else out

    def choose_row(self, step: int, model_in: torch.Tensor, t: torch.Tensor, inputs: dict) -> list[str]:
        """Algorithm 1 at ``step``: layer by layer, the first candidate passing its bound against the dense
        output (choices for earlier layers stay), else ``full``."""
        row = ["full"] * self.adapter.num_layers
        self.runtime.frozen = True  # trial forwards read the caches but must not overwrite them
        try:
            dense = self.forward(step, row, model_in, t, inputs)
            for layer in range(self.adapter.num_layers):
                row[layer] = self.choose_cell(step, layer, row, dense, model_in, t, inputs)
        finally:
            self.runtime.frozen = False
        return row

    def choose_cell(self, step: int, layer: int, row: list[str], dense: torch.Tensor, model_in: torch.Tensor,
                    t: torch.Tensor, inputs: dict) -> str:
        """The first candidate for ``layer`` (in ``row``) whose loss L(O, O') is below (layer + 1) / L · δ,
        recording every loss tried; ``full`` when none is."""
        bound = (layer + 1) / self.adapter.num_layers * self.threshold
        for candidate in self.candidates:
            trial = [*row[:layer], candidate, *row[layer + 1 :]]
            self.losses[step, layer, candidate] = relative_l1(dense, self.forward(step, trial, model_in, t, inputs))
            if self.losses[step, layer, candidate] < bound:
                return candidate
        return "full"

    def forward(self, step: int, row: list[str], model_in: torch.Tensor, t: torch.Tensor, inputs: dict) -> torch.Tensor:
        """One transformer forward of the whole batch with ``row`` as the plan of ``step``, micro-batch by
        micro-batch, each on its own caches."""
        self.grid[step] = list(row)
        self.runtime.use(CachePlanner(self.current_plan(), self.strategies, open_ended=True))
        self.forwards += 1
        self.sample_forwards += len(model_in) * (2 if self.settings.cfg else 1)
        outs = []
        for chunk, (a, b) in enumerate(self.chunks):
            self.runtime.chunk = chunk
            chunk_inputs = _chunk_inputs(inputs, a, b, len(model_in), self.settings.cfg)
            if self.settings.cfg:
                outs.append(cfg_predictions(self.adapter, model_in[a:b], t, chunk_inputs))
            else:
                outs.append(self.adapter.predict(model_in[a:b], t, chunk_inputs))
        if not self.settings.cfg:
            return torch.cat(outs)  # (N, C, H, W): the raw transformer output
        return torch.cat([h[0] for h in outs] + [h[1] for h in outs])  # (2N, C, H, W): [cond; uncond]

    def found_plan(self, conditions: Sequence[Any], seeds: Sequence[int], seconds: float, peak: int) -> Plan:
        """The plan the run chose, with the parameters of the methods it uses and its provenance."""
        used = {name for row in self.grid for name in row}
        return Plan(
            self.target,
            tuple(map(tuple, self.grid)),
            params={k: v for k, v in self.params.items() if k in used},
            provenance={
                "search": "greedy",
                "threshold": self.threshold,
                "candidates": list(self.candidates),
                "calibration": {"conditions": list(conditions), "seeds": list(seeds)},
                "transformer_forwards": self.forwards,
                "sample_forwards": self.sample_forwards,
                "search_seconds": round(seconds, 2),
                "peak_memory_mb": round(peak / 2**20, 1),
                "versions": library_versions(),
            },
        )


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
