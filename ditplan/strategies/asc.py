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
from ditplan.strategies.sharing import conditional_half_only


@register
class AttentionShareCFG(Strategy):
    """Computes dense attention for the conditional half of the CFG batch only and reuses it for the
    unconditional half: half the attention work. Only meaningful with guidance (otherwise dense)."""

    name = "asc"
    writes = frozenset({"output"})

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return conditional_half_only(call.hidden_states, call.context, call.original)

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return dense_attention_flops(shape, batch=shape.batch // 2 if cfg else shape.batch)
