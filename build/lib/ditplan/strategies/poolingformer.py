"""``pool``: SparseDiT's Poolingformer layer, usable without fine-tuning.

Attention is replaced by the global mean of the value projection, broadcast to every token:
``proj(mean_tokens(v(x)))`` (the block's own norm and gate stay around it, as in the paper's
``x + gate · proj(mean_tokens(v(norm(x))))``). This is exactly dense attention whose softmax is
uniform, needs no Q/K and is O(N) in memory (the public reference builds an N×N matrix of ones).
SparseDiT applies it to the bottom layers (2 of 28 in DiT-XL), at every step.
"""

from __future__ import annotations

import torch

from ditplan.strategies.attention import project_out
from ditplan.strategies.base import AttentionCall, AttentionShape, Strategy, register


@register
class Poolingformer(Strategy):
    """Global average of the value projection, with the layer's pretrained V and output projection."""

    name = "pool"
    writes = frozenset({"output"})

    def attention(self, call: AttentionCall) -> torch.Tensor:
        x = call.hidden_states  # (B, N, C)
        if call.attn.norm_k is not None or call.attn.residual_connection:
            raise NotImplementedError("pool supports DiT/PixArt self-attention only")
        pooled = call.attn.to_v(x).mean(dim=1, keepdim=True)  # (B, 1, C): mean over tokens
        return project_out(call.attn, pooled).expand_as(x)  # (B, N, C): the same vector at every token

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        # the value projection on every token; the output projection on one pooled token per sample
        return float(shape.batch * (2 * shape.tokens * shape.dim * shape.dim + 2 * shape.dim * shape.dim))
