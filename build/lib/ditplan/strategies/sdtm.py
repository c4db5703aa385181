"""SparseDiT's sparse–dense token modules (SDTM), installed with diffusers hooks around the blocks.

A module spans the blocks ``[start, end)`` of the transformer (at least two):

- block ``start`` *generates* the sparse tokens: the dense tokens are average-pooled on their
  √N×√N grid to an m×m grid (M = m² tokens) and the block runs on them, its self-attention turned
  into cross-attention — queries from the sparse tokens, keys/values from the dense tokens, through
  the block's own norm, modulation and Q/K/V;
- blocks ``start+1 … end-2`` run unchanged on the M sparse tokens;
- block ``end-1`` *recovers* the dense tokens: nearest upsampling of the sparse tokens to the full
  grid, the merge ``W_up·up + W_skip·x_dense`` (x_dense = the module's dense input), then the block
  runs on the merged dense tokens with cross-attention from dense queries to the sparse keys/values —
  it is the dense block that closes the module.

The merge starts as ``W_up = I, W_skip = 0``: with M = N the module is then exactly the pretrained
blocks, so fine-tuning starts from the dense model's function and learns how much of the skipped
dense detail to mix back in. (SparseDiT's paper initialises the *upsampled* side to zero; that
discards the sparse path before fine-tuning, and no unfine-tuned SDTM would work at all.)

M follows a time-wise pruning curve (:mod:`ditplan.strategies.curves`): r = 1 − M/N at each step,
rounded to the nearest square grid. Hooks are removed by :meth:`SparseRuntime.remove`, which leaves
the blocks exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook

from ditplan.models.context import current_step
from ditplan.strategies.curves import PruningCurve, curve_from_dict
from ditplan.strategies.hooks import remove_hook

_GENERATE = "ditplan_sdtm_generate"
_RECOVER = "ditplan_sdtm_recover"


@dataclass(frozen=True)
class SparseLayout:
    """The SparseDiT part of a plan.

    pool_layers: how many bottom blocks run the Poolingformer (``pool`` in the grid at every step).
    modules: block ranges ``(start, end)`` of the SDTMs, end exclusive, at least two blocks each.
    curve: the pruning rate per step.
    weights: the fine-tuned network this layout needs (a folder relative to the base model's folder,
      made by ``ditplan finetune-sparse``), or None to run on the pretrained weights with the identity
      merge.
    """

    modules: tuple[tuple[int, int], ...]
    curve: PruningCurve
    weights: str | None = None
    pool_layers: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparseLayout:
        keys = {"pool_layers", "modules", "curve", "weights"}
        unknown = sorted(set(data) - keys)
        if unknown:
            raise ValueError(f"plan 'sparse' has no key {unknown[0]!r}; its keys are {sorted(keys)}")
        try:
            modules = tuple((int(a), int(b)) for a, b in data.get("modules") or [])
        except (TypeError, ValueError):
            raise ValueError(f"plan sparse.modules must be a list of [start, end] block ranges, got {data.get('modules')!r}") from None
        return cls(modules=modules, curve=curve_from_dict(data.get("curve") or {"name": "constant"}),
                   weights=data.get("weights"), pool_layers=int(data.get("pool_layers") or 0))

    def to_dict(self) -> dict[str, Any]:
        return {"pool_layers": self.pool_layers, "modules": [list(m) for m in self.modules],
                "curve": self.curve.to_dict(), "weights": self.weights}

    @property
    def name(self) -> str:
        """A folder name for a network fine-tuned for this layout, e.g. ``p1-s1_5``."""
        return "-".join([f"p{self.pool_layers}", *(f"s{a}_{b}" for a, b in self.modules)])

    def blocks(self) -> set[int]:
        return {layer for start, end in self.modules for layer in range(start, end)}

    def fixed_cells(self) -> dict[int, str]:
        """The method the layout requires of a layer at every step: its Poolingformer layers ``pool``, its
        SDTM blocks ``full`` (their attention is SDTM's own, on a token count that changes per step)."""
        return {**{layer: "full" for layer in self.blocks()}, **{layer: "pool" for layer in range(self.pool_layers)}}

    def validate(self, num_layers: int, num_tokens: int) -> None:
        if math.isqrt(num_tokens) ** 2 != num_tokens:
            raise ValueError(f"SDTM pools a square token grid; this model has {num_tokens} tokens")
        if not 0 <= self.pool_layers < num_layers:
            raise ValueError(f"pool_layers={self.pool_layers} must leave at least one of the {num_layers} blocks")
        taken: set[int] = set(range(self.pool_layers))
        for start, end in self.modules:
            if not 0 <= start < end <= num_layers or end - start < 2:
                raise ValueError(
                    f"SDTM module [{start}, {end}) must cover at least two of the blocks 0…{num_layers - 1} "
                    "(one generates the sparse tokens, the last recovers the dense ones)"
                )
            span = set(range(start, end))
            if span & taken:
                raise ValueError(f"SDTM module [{start}, {end}) overlaps another module or the Poolingformer layers; "
                                 "give disjoint ranges above the pool layers")
            taken |= span

    def side(self, rate: float, num_tokens: int) -> int:
        """The sparse grid side m for pruning rate ``rate``: m² ≈ (1 − r)·N, at least 1."""
        grid = math.isqrt(num_tokens)
        return min(grid, max(1, round(grid * math.sqrt(1.0 - rate))))

    def tokens_by_block(self, step: int, num_steps: int, num_layers: int, num_tokens: int) -> list[tuple[int, int]]:
        """(query tokens, key/value tokens) of every block's self-attention at ``step``; a block's other
        layers (MLP, cross-attention) run on its query tokens. The cost model's input."""
        n = num_tokens
        m = self.side(self.curve.rate(step, num_steps), n) ** 2
        out = [(n, n)] * num_layers
        for start, end in self.modules:
            out[start] = (m, n)
            out[start + 1 : end - 1] = [(m, m)] * (end - start - 2)
            out[end - 1] = (n, m)
        return out


def pool_tokens(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, N, C) tokens of a √N×√N grid → (B, side², C) by adaptive average pooling."""
    b, n, c = x.shape
    grid = math.isqrt(n)
    if side == grid:
        return x
    pooled = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b, c, grid, grid), side)  # (B, C, m, m)
    return pooled.flatten(2).transpose(1, 2)


def upsample_tokens(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, m², C) → (B, grid², C) by nearest upsampling on the token grid."""
    b, mm, c = x.shape
    side = math.isqrt(mm)
    if side == grid:
        return x
    up = F.interpolate(x.transpose(1, 2).reshape(b, c, side, side), size=(grid, grid), mode="nearest")
    return up.flatten(2).transpose(1, 2)


def attention_input(block: torch.nn.Module, x: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """What ``block`` feeds its self-attention for tokens ``x``: norm1 with the block's modulation."""
    if block.norm_type == "ada_norm_zero":  # DiT
        return block.norm1(x, kwargs.get("timestep"), kwargs.get("class_labels"), hidden_dtype=x.dtype)[0]
    if block.norm_type == "ada_norm_single":  # PixArt
        shift, scale = (block.scale_shift_table[None] + kwargs["timestep"].reshape(x.shape[0], 6, -1)).chunk(6, dim=1)[:2]
        return block.norm1(x) * (1 + scale) + shift
    raise TypeError(f"SDTM supports DiT and PixArt blocks, not norm type {block.norm_type!r}")


class _ModuleHook(ModelHook):
    """Shared by the two ends of one module: which module, and the runtime holding its state."""

    def __init__(self, runtime: SparseRuntime, index: int) -> None:
        super().__init__()
        self.runtime = runtime  # holds the per-forward state; the plan's reset clears it
        self.index = index

    def _run(self, block: torch.nn.Module, layer: int, queries: torch.Tensor, keys_values: torch.Tensor,
             args: tuple, kwargs: dict) -> torch.Tensor:
        self.runtime.key_values[layer] = attention_input(block, keys_values, kwargs)
        try:
            return self.fn_ref.original_forward(queries, *args, **kwargs)
        finally:
            del self.runtime.key_values[layer]


class _GenerateHook(_ModuleHook):
    def new_forward(self, block: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        runtime = self.runtime
        dense = hidden_states  # (B, N, C)
        runtime.dense[self.index] = dense
        sparse = pool_tokens(dense, runtime.current_side())  # (B, M, C)
        return self._run(block, runtime.layout.modules[self.index][0], sparse, dense, args, kwargs)


class _RecoverHook(_ModuleHook):
    def new_forward(self, block: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        runtime = self.runtime
        sparse = hidden_states  # (B, M, C)
        dense = runtime.dense.pop(self.index)  # (B, N, C)
        merge = runtime.merges[self.index]
        merged = merge["up"](upsample_tokens(sparse, math.isqrt(dense.shape[1]))) + merge["skip"](dense)
        return self._run(block, runtime.layout.modules[self.index][1] - 1, merged, sparse, args, kwargs)


class SparseRuntime:
    """The SDTMs of an applied plan: their hooks, merges and per-forward state."""

    def __init__(self, layout: SparseLayout, num_tokens: int, merges: torch.nn.ModuleList) -> None:
        if len(merges) != len(layout.modules):
            raise ValueError(f"{len(merges)} merge weights for {len(layout.modules)} SDTM modules; the fine-tuned "
                             "network was made for another layout")
        self.layout = layout
        self.num_tokens = num_tokens
        self.merges = merges
        self.key_values: dict[int, torch.Tensor] = {}  # layer → its attention's key/value tokens this call
        self.dense: dict[int, torch.Tensor] = {}  # module → its dense input, until recovery
        self.fixed_rate: float | None = None

    def current_side(self) -> int:
        if self.fixed_rate is not None:
            return self.layout.side(self.fixed_rate, self.num_tokens)
        context = current_step()
        if context is None:
            raise RuntimeError("SDTM needs the denoising step for its pruning curve; sample with ditplan's loop "
                               "or set a rate with SparseRuntime.rate(r)")
        return self.layout.side(self.layout.curve.rate(context.step, context.num_steps), self.num_tokens)

    @contextmanager
    def rate(self, rate: float) -> Iterator[None]:
        """Run every step at pruning rate ``rate`` (fine-tuning draws one per batch)."""
        self.fixed_rate = rate
        try:
            yield
        finally:
            self.fixed_rate = None

    def install(self, blocks: Sequence[torch.nn.Module]) -> None:
        for index, (start, end) in enumerate(self.layout.modules):
            HookRegistry.check_if_exists_or_initialize(blocks[start]).register_hook(_GenerateHook(self, index), _GENERATE)
            HookRegistry.check_if_exists_or_initialize(blocks[end - 1]).register_hook(_RecoverHook(self, index), _RECOVER)

    def remove(self, blocks: Sequence[torch.nn.Module]) -> None:
        for start, end in self.layout.modules:
            remove_hook(blocks[start], _GENERATE)
            remove_hook(blocks[end - 1], _RECOVER)
        self.reset()

    def reset(self) -> None:
        self.key_values.clear()
        self.dense.clear()
