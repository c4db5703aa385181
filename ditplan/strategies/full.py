"""``full``: the layer's own dense attention, unchanged (the identity strategy)."""

from __future__ import annotations

import torch

from ditplan.strategies.base import AttentionCall, AttentionShape, Strategy, dense_attention_flops, register


@register
class Full(Strategy):
    """Dense attention through the layer's original diffusers processor: bit-identical to no plan."""

    name = "full"
    writes = frozenset({"output"})

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return call.original()

    def attention_flops(self, shape: AttentionShape, cfg: bool) -> float:
        return dense_attention_flops(shape)
