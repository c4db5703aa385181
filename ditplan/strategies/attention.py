"""One attention routine for every strategy: project, attend (dense or 1-D sliding window), project out.

The operations mirror diffusers' ``AttnProcessor2_0`` for self-attention exactly, so a dense pass
through here is bit-identical to the layer's own processor.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, C) → q, k, v each (B, H, N, D)."""
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
        raise NotImplementedError("ditplan's attention strategies support DiT/PixArt self-attention only")
    batch, tokens, _ = x.shape
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = k.shape[-1] // attn.heads
    q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) → (B, N, H·D)."""
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def project_out(attn: Attention, merged: torch.Tensor) -> torch.Tensor:
    """(B, N, C) → (B, N, C) through the output projection (and its dropout)."""
    return attn.to_out[1](attn.to_out[0](merged)) / attn.rescale_output_factor


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def window_keys(tokens: int, window: int) -> int:
    """Number of (query, key) pairs of a ±window band over ``tokens``: N(2w+1) − w(w+1), or N² if w ≥ N−1."""
    if window >= tokens - 1:
        return tokens * tokens
    return tokens * (2 * window + 1) - window * (window + 1)


@lru_cache(maxsize=32)
def _band_mask(tokens: int, window: int, block: int, device: torch.device) -> torch.Tensor:
    """(blocks, block, block + 2w) bool: query i of a block sees key j of its span iff |i − j| ≤ w and
    j is a real (not padding) token."""
    blocks = -(-tokens // block)
    query = torch.arange(blocks * block, device=device).view(blocks, block, 1)  # absolute query index
    key = (torch.arange(blocks, device=device) * block).view(blocks, 1, 1) - window + torch.arange(
        block + 2 * window, device=device
    ).view(1, 1, -1)  # absolute key index of each span slot
    return ((query - key).abs() <= window) & (key >= 0) & (key < tokens)


def _banded_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """Queries in blocks of ``block``; each block attends to its span of ``block + 2w`` keys only, so the
    work is N·(block + 2w) pairs instead of N² (not a masked full attention)."""
    batch, heads, tokens, head_dim = q.shape
    blocks = -(-tokens // block)
    pad_end = blocks * block - tokens
    span = block + 2 * window
    # NOTE: 4-D inputs keep SDPA on its fused CPU kernel; 5-D ones fall back to the slow math path.
    qb = F.pad(q, (0, 0, 0, pad_end)).reshape(batch, heads * blocks, block, head_dim)
    # keys/values padded by w in front and w + pad_end behind; span b starts at b·block
    kp = F.pad(k, (0, 0, window, window + pad_end))
    vp = F.pad(v, (0, 0, window, window + pad_end))
    kb = kp.unfold(2, span, block).transpose(-1, -2).reshape(batch, heads * blocks, span, head_dim)
    vb = vp.unfold(2, span, block).transpose(-1, -2).reshape(batch, heads * blocks, span, head_dim)
    mask = _band_mask(tokens, window, block, q.device)  # (blocks, block, span)
    mask = mask.expand(heads, -1, -1, -1).reshape(1, heads * blocks, block, span)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # (B, H·blocks, block, D)
    return out.view(batch, heads, blocks * block, head_dim)[:, :, :tokens]


def _flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    block_mask = _flex_block_mask(q.shape[2], window, q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # NOTE: each (batch, heads, tokens) shape compiles once; dynamo's default limit of 8 shapes would
    # otherwise silently drop to the (very slow) uncompiled flex_attention.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=32)
def _flex_block_mask(tokens: int, window: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q_idx, kv_idx):  # noqa: ANN001 (flex_attention's mask_mod signature)
        return (q_idx - kv_idx).abs() <= window

    return create_block_mask(band, None, None, tokens, tokens, device=device)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, implementation: str | None = None
) -> torch.Tensor:
    """1-D sliding-window attention over the flattened tokens: query i attends to keys |i − j| ≤ w.

    A window covering every token is dense attention (computed as such). ``implementation``:
    ``banded`` (blocked band through SDPA, any device) or ``flex`` (torch ``flex_attention`` with a
    block-sparse band, CUDA); by default flex on CUDA, banded elsewhere.
    """
    tokens = q.shape[2]
    if window >= tokens - 1:
        return dense_attention(q, k, v)
    if implementation is None:
        implementation = "flex" if q.is_cuda else "banded"
    if implementation == "flex":
        return _flex_window_attention(q, k, v, window)
    return _banded_window_attention(q, k, v, window, block=max(8, window // 2))
