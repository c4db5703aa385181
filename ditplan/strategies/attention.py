"""One attention routine for every strategy: project, attend (dense or windowed), project out.

The operations mirror diffusers' ``AttnProcessor2_0`` for self-attention exactly, so a dense pass
through here is bit-identical to the layer's own processor.

Windows (:class:`WindowLayout`) come in three shapes: ``band``, the exact ±w sliding band over the
flattened tokens (DiTFastAttn's public code); ``blocks``, query blocks of b tokens that each see the
keys of their own block and a halo of its neighbours; and ``tiles``, the same over the √N × √N token
grid with t × t tiles (Sliding Tile Attention). Blocks and tiles are made of dense, unmasked pieces, so
PyTorch's fused SDPA kernels run at full speed on them; the band needs a mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


WINDOW_SHAPES = ("band", "blocks", "tiles")
# How window FLOPs are counted: the pairs the kernel executes (the cost model's default) or the ideal window.
WINDOW_COUNTS = ("executed", "ideal")


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


@dataclass(frozen=True)
class GlobalKeys:
    """Keys (and their values) that every query of a window sees besides its window: joint attention's text
    tokens. k, v: (B, H, L, D); mask: which of them a query may see, broadcastable to (B, 1, 1, L) (bool, or
    additive float), or None for all."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None

    def prepend(self, keys: torch.Tensor, values: torch.Tensor, groups: int, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Window keys, values (B, H·G, S, D) of G groups and their mask (broadcastable to (B, H·G, Q, S), or None)
        → the global keys first in every group: (B, H·G, L + S, D) and a mask over L + S keys (or None)."""
        batch, heads, length, head_dim = self.k.shape
        spread = [t[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, heads * groups, length, head_dim)
                  for t in (self.k, self.v)]
        keys, values = torch.cat([spread[0], keys], dim=2), torch.cat([spread[1], values], dim=2)
        if mask is None and self.mask is None:
            return keys, values, None
        own = self._as_bool(self.mask, batch, length, keys.device)  # (B | 1, 1, 1, L)
        window = torch.ones(1, 1, 1, keys.shape[2] - length, dtype=torch.bool, device=keys.device) if mask is None else mask
        shape = torch.broadcast_shapes(own.shape[:-1], window.shape[:-1])
        return keys, values, torch.cat([own.expand(*shape, length), window.expand(*shape, window.shape[-1])], dim=-1)

    @staticmethod
    def _as_bool(mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
        if mask is None:
            return torch.ones(1, 1, 1, length, dtype=torch.bool, device=device)
        # an additive mask hides a key with -inf or the dtype's lowest value
        mask = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        return mask.reshape(mask.shape[0] if mask.ndim == 4 else 1, 1, 1, length)


def _banded_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int,
                             extra: GlobalKeys | None = None) -> torch.Tensor:
    """Queries in blocks of ``block``; each block attends to its span of ``block + 2w`` keys only (and the
    ``extra`` global keys), so the work is N·(block + 2w) pairs instead of N² (not a masked full attention)."""
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
    if extra is not None:
        kb, vb, mask = extra.prepend(kb, vb, blocks, mask)
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


@dataclass(frozen=True)
class WindowLayout:
    """Which keys each query of a window sees (see the module docstring for the shapes).

    band: query i sees keys |i − j| ≤ ``window``. blocks: ⌈tokens / block⌉ query blocks (the last one
    shorter when ``block`` does not divide N); each sees the keys of its own block widened by ``halo`` tokens
    on each side — ``block + 2·halo`` consecutive keys,
    the run shifted inwards at the ends so that every block sees as many (a halo of r blocks is "its own
    and its r neighbouring blocks"). tiles: the same on the √N × √N grid, ``block`` × ``block`` tiles
    seeing ``(block + 2·halo)²`` keys. A layout whose window covers every token is dense attention.
    """

    shape: str
    tokens: int
    window: int = 0
    block: int = 1
    halo: int = 0

    @property
    def side(self) -> int:
        """Tokens per axis the blocks tile: the sequence for blocks, the grid side for tiles."""
        return math.isqrt(self.tokens) if self.shape == "tiles" else self.tokens

    @property
    def span(self) -> int:
        """Keys per query along one axis."""
        return self.block + 2 * self.halo

    def covers_all(self) -> bool:
        if self.shape == "band":
            return self.window >= self.tokens - 1
        return self.span >= self.side

    @property
    def band_block(self) -> int:
        """Queries per block of the masked band kernel (:func:`_banded_window_attention`)."""
        return max(8, self.window // 2)

    def pairs(self, count: str = "executed") -> int:
        """(query, key) pairs of the window (N² when dense). ``count``: ``executed`` — what the kernel
        computes: the masked band runs each block of ``band_block`` queries (the last one padded) over its
        whole span of ``band_block + 2w`` keys, masked entries included; ``ideal`` — the band's own pairs,
        N(2w + 1) − w(w + 1). Blocks and tiles run unmasked, so both counts are the keys they see.
        NOTE: on CUDA the band runs through ``flex_attention``, which skips whole tiles outside the band;
        ``executed`` counts the masked SDPA kernel (CPU, and ``implementation="banded"``)."""
        if count not in WINDOW_COUNTS:
            raise ValueError(f"unknown pair count {count!r}; use one of {list(WINDOW_COUNTS)}")
        if self.covers_all():
            return self.tokens * self.tokens
        if self.shape == "band":
            if count == "ideal":
                return window_keys(self.tokens, self.window)
            block = self.band_block
            return -(-self.tokens // block) * block * (block + 2 * self.window)
        return self.tokens * (self.span if self.shape == "blocks" else self.span * self.span)

    def queries(self, count: str = "executed") -> int:
        """Query rows the kernel runs: the masked band pads its last query block (``executed``); else N."""
        if count == "executed" and self.shape == "band" and not self.covers_all():
            return -(-self.tokens // self.band_block) * self.band_block
        return self.tokens

    def starts(self) -> torch.Tensor:
        """Blocks and tiles: the first key of each block's run along the axis (the runs shifted inwards at
        the ends); 1-D blocks may leave a shorter last block when ``block`` does not divide N."""
        count = -(-self.side // self.block)
        return (torch.arange(count) * self.block - self.halo).clamp(0, self.side - self.span)

    def groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks and tiles of equal size: (query index (G, Q), key index (G, S)) — group g's queries see
        exactly its keys. Raises ``ValueError`` for blocks whose size does not divide N."""
        if self.side % self.block:
            raise ValueError(f"gathered blocks need a block size dividing the token count, not {self.block} of "
                             f"{self.side}; use implementation 'strided'")
        keys = self.starts()[:, None] + torch.arange(self.span)  # (count, span) key positions along the axis
        queries = torch.arange(self.side).view(-1, self.block)  # (count, block)
        if self.shape == "blocks":
            return queries, keys

        def grid(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # (n, R), (n, C) → (n², R·C)
            index = rows[:, None, :, None] * self.side + cols[None, :, None, :]
            return index.reshape(rows.shape[0] * cols.shape[0], -1)

        return grid(queries, queries), grid(keys, keys)

    def key_mask(self) -> torch.Tensor:
        """(N, N) bool: query i sees key j — the reference the kernels are tested against."""
        if self.covers_all():
            return torch.ones(self.tokens, self.tokens, dtype=torch.bool)
        i = torch.arange(self.tokens)
        if self.shape == "band":
            return (i[:, None] - i[None, :]).abs() <= self.window
        if self.shape == "blocks":
            first = self.starts()[i // self.block][:, None]
            return (i[None, :] >= first) & (i[None, :] < first + self.span)
        queries, keys = self.groups()
        mask = torch.zeros(self.tokens, self.tokens, dtype=torch.bool)
        mask[queries[:, :, None], keys[:, None, :]] = True
        return mask


def window_layout(shape: str, tokens: int, window: int, block: int | None = None) -> WindowLayout:
    """The layout of a ``shape`` window over ``tokens`` that sees about 2·``window`` + 1 keys per query.

    blocks / tiles: ``block`` is the block size (tile side): for blocks any size up to N (a shorter last
    block when it does not divide N), for tiles a divisor of √N; by default the largest divisor of N (of
    √N) that leaves a halo of at least half a block on each side — large blocks keep the fused kernels
    efficient. The halo then fills the key count: a blocks run of 2w + 1 keys, a tile of ⌊√(2w + 1)⌋²
    keys. Raises ``ValueError`` naming a bad value.
    """
    if shape not in WINDOW_SHAPES:
        raise ValueError(f"unknown window shape {shape!r}; use one of {list(WINDOW_SHAPES)}")
    if shape == "band":
        return WindowLayout("band", tokens, window=window)
    side = tokens
    if shape == "tiles":
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"window shape 'tiles' needs a square token grid, but {tokens} tokens are not one; use 'blocks'")
    span = 2 * window + 1 if shape == "blocks" else math.isqrt(2 * window + 1)  # keys per query along an axis
    if block is None:
        block = max(d for d in range(1, side + 1) if side % d == 0 and 2 * d <= max(span, 2))
    elif shape == "blocks" and not 1 <= block <= side:
        raise ValueError(f"blocks block_size {block} is not between 1 and the token count {side}; use one that is")
    elif shape == "tiles" and (block < 1 or side % block):
        raise ValueError(f"tiles block_size {block} does not divide the grid side {side}; use a divisor of {side}")
    return WindowLayout(shape, tokens, window=window, block=block, halo=max(0, (span - block) // 2))


def _strided_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """1-D blocks through strided views of K/V (no copies of the key runs), in at most three SDPA calls:
    the first blocks, whose runs are shifted to the start, as one query range over the first run; the
    inner blocks (block i's run starts at i·b − halo) as one batch of blocks; the rest, whose runs are
    shifted to the end (a shorter last block among them), as one query range over the last run."""
    batch, heads, tokens, head_dim = q.shape
    b, span, halo = layout.block, layout.span, layout.halo
    first = -(-halo // b)  # blocks before this one start their run at key 0
    inner = max(0, (tokens - halo) // b - first)  # blocks i ≥ first with (i + 1)·b + halo ≤ N: unshifted runs
    head, tail = first * b, (first + inner) * b  # query ranges [0, head) and [tail, N) share the end runs
    q, k, v = (t.reshape(batch * heads, tokens, head_dim) for t in (q, k, v))  # (BH, N, D)
    parts = []
    if head:
        parts.append(F.scaled_dot_product_attention(q[:, None, :head], k[:, None, :span], v[:, None, :span]))
    if inner:
        ks = k[:, head - halo :].unfold(1, span, b)[:, :inner].transpose(-1, -2)  # (BH, inner, span, D)
        vs = v[:, head - halo :].unfold(1, span, b)[:, :inner].transpose(-1, -2)
        parts.append(F.scaled_dot_product_attention(q[:, head:tail].reshape(-1, inner, b, head_dim), ks, vs))
    if tail < tokens:
        end = slice(tokens - span, tokens)
        parts.append(F.scaled_dot_product_attention(q[:, None, tail:], k[:, None, end], v[:, None, end]))
    return torch.cat([part.flatten(1, 2) for part in parts], dim=1).view(batch, heads, tokens, head_dim)


@lru_cache(maxsize=32)
def _gather_indices(layout: WindowLayout, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group count, flat query and key indices, and the permutation that puts the queries back."""
    queries, keys = layout.groups()
    flat = queries.flatten()
    return queries.shape[0], flat.to(device), keys.flatten().to(device), flat.argsort().to(device)


def _gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout,
                        extra: GlobalKeys | None = None) -> torch.Tensor:
    """Blocks or tiles through gathered copies: each group's queries and its span (or span²) keys copied
    side by side (after the ``extra`` global keys), one SDPA call over all groups (unmasked without a mask on the
    global keys), then the queries put back in order."""
    batch, heads, tokens, head_dim = q.shape
    groups, queries, keys, inverse = _gather_indices(layout, q.device)
    qg = q[:, :, queries].reshape(batch, heads * groups, -1, head_dim)  # (B, H·G, Q, D)
    kg = k[:, :, keys].reshape(batch, heads * groups, -1, head_dim)  # (B, H·G, S, D)
    vg = v[:, :, keys].reshape(batch, heads * groups, -1, head_dim)
    mask = None
    if extra is not None:
        kg, vg, mask = extra.prepend(kg, vg, groups, None)
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask).reshape(batch, heads, tokens, head_dim)
    return out[:, :, inverse]


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, implementation: str | None = None,
    extra: GlobalKeys | None = None,
) -> torch.Tensor:
    """Attention of each query over the keys ``layout`` gives it (and the ``extra`` global keys); (B, H, N, D)
    in and out.

    A window covering every token is dense attention (computed as such). ``implementation``: for the
    band ``banded`` (blocked band with a mask through SDPA, any device) or ``flex`` (torch
    ``flex_attention``, CUDA; the default there); for blocks ``strided`` (the default) or ``gather``;
    tiles are always gathered. With global keys the band is banded and blocks are gathered.
    """
    if extra is not None:
        return _with_global_keys(q, k, v, layout, extra)
    if layout.covers_all():
        return dense_attention(q, k, v)
    if layout.shape == "band":
        if (implementation or ("flex" if q.is_cuda else "banded")) == "flex":
            return _flex_window_attention(q, k, v, layout.window)
        return _banded_window_attention(q, k, v, layout.window, block=layout.band_block)
    if layout.shape == "blocks" and implementation in (None, "strided"):
        return _strided_block_attention(q, k, v, layout)
    return _gathered_attention(q, k, v, layout)


def _with_global_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, extra: GlobalKeys
                      ) -> torch.Tensor:
    """:func:`window_attention` where every query also sees ``extra``'s keys."""
    if layout.covers_all():
        keys, values, mask = extra.prepend(k, v, 1, None)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    if layout.shape == "band":
        return _banded_window_attention(q, k, v, layout.window, layout.band_block, extra)
    return _gathered_attention(q, k, v, layout, extra)
