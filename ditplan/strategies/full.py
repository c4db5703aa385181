"""``full``: the layer's own dense attention, unchanged (the identity strategy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
from ditplan.strategies.joint import run_with_kernel


@register
class Full(Strategy):
    """Dense attention. Without cache duties it runs the layer's original diffusers processor, so a
    plan of only ``full`` is bit-identical to no plan. When a later step of the layer reads a
    ``residual`` (WA-RS), the same dense pass also makes it, as the reading strategy defines it (on joint
    attention, in the attention kernel the family's own processor calls)."""

    name = "full"
    writes = frozenset({"output", "residual"})

    @classmethod
    def module_share(cls, cfg: bool) -> float:
        return 1.0

    def attention(self, call: AttentionCall) -> torch.Tensor:
        if "residual" not in call.wants:
            return call.original()
        reader = call.reader("residual")
        if call.joint is not None:  # the family's own processor; its kernel also makes the residual
            def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
                dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                call.cache["residual"] = reader.make_joint_residual(call.joint, q, k, v, mask, dense)  # type: ignore[union-attr]
                return dense

            return run_with_kernel(call.original, kernel)
        q, k, v = project_qkv(call.attn, call.hidden_states)  # (B, H, N, D) each
        dense = merge_heads(dense_attention(q, k, v))  # (B, N, C)
        call.cache["residual"] = reader.make_residual(q, k, v, dense)  # type: ignore[union-attr]
        return project_out(call.attn, dense)

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return dense_attention_flops(shape)
