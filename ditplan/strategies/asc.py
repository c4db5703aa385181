"""``asc``: attention sharing across classifier-free guidance (DiTFastAttn)."""

from __future__ import annotations

import torch

from ditplan.strategies.base import (
    AttentionCall,
    AttentionShape,
    Strategy,
    dense_attention_flops,
    register,
)
from ditplan.strategies.sharing import share_conditional_half


@register
class AttentionShareCFG(Strategy):
    """Computes the attention module for the conditional half of the CFG batch only and reuses its output
    for the unconditional half: half the attention work (on joint attention, both streams' outputs). Only
    meaningful with guidance (otherwise dense)."""

    name = "asc"
    writes = frozenset({"output"})

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return share_conditional_half(call)

    @classmethod
    def module_share(cls, cfg: bool) -> float:
        return 0.5 if cfg else 1.0

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return dense_attention_flops(shape, batch=shape.batch // 2 if cfg else shape.batch)
