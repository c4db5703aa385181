"""``full``: the layer's own dense attention, unchanged (the identity strategy)."""

from __future__ import annotations

import torch

from ditplan.strategies.attention import (
    dense_attention,
    merge_heads,
    project_out,
    project_qkv,
)
from ditplan.strategies.base import (
    AttentionCall,
    AttentionShape,
    Strategy,
    dense_attention_flops,
    register,
)


@register
class Full(Strategy):
    """Dense attention. Without cache duties it runs the layer's original diffusers processor, so a
    plan of only ``full`` is bit-identical to no plan. When a later step of the layer reads a
    ``residual`` (WA-RS), the same dense pass also makes it, as the reading strategy defines it."""

    name = "full"
    writes = frozenset({"output", "residual"})

    @classmethod
    def module_share(cls, cfg: bool) -> float:
        return 1.0

    def attention(self, call: AttentionCall) -> torch.Tensor:
        if "residual" not in call.wants:
            return call.original()
        q, k, v = project_qkv(call.attn, call.hidden_states)  # (B, H, N, D) each
        dense = merge_heads(dense_attention(q, k, v))  # (B, N, C)
        reader = call.reader("residual")
        call.cache["residual"] = reader.make_residual(q, k, v, dense)  # type: ignore[union-attr]
        return project_out(call.attn, dense)

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return dense_attention_flops(shape)
