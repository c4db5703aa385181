"""``wars`` and ``wars+asc``: window attention with residual sharing (DiTFastAttn).

At a dense step r the layer also computes window attention W_r and keeps the residual
R_r = O_r − W_r; at a later step k it computes only W_k and returns W_k + R_r. The window's shape is
a parameter (:class:`ditplan.strategies.attention.WindowLayout`): the exact 1-D band of DiTFastAttn's
public code (query i sees keys |i − j| ≤ w), dense 1-D blocks, or dense 2-D tiles of the token grid.
A residual is only valid with the window it was made for, so the plan runtime refuses a plan in which
one residual would be read through two different windows (``wars`` and ``wars+asc`` with different
window parameters in one run of a layer's steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ditplan.strategies.attention import (
    WINDOW_SHAPES,
    GlobalKeys,
    WindowLayout,
    merge_heads,
    project_out,
    project_qkv,
    window_attention,
    window_layout,
)
from ditplan.strategies.base import AttentionCall, AttentionShape, Strategy, register
from ditplan.strategies.joint import JointTokens, run_with_kernel
from ditplan.strategies.sharing import conditional_half_only


def default_window(num_tokens: int) -> int:
    """DiTFastAttn's window: N // 8 tokens."""
    return max(1, num_tokens // 8)


@dataclass(frozen=True)
class WindowConfig:
    """window_size: half-width w of the band (span 2w + 1); blocks and tiles see about as many keys
    (2w + 1) per query. None: N // 8, DiTFastAttn's choice (N = 1024 → 128). A smaller window is
    cheaper but leans harder on the residual, which ages as the steps since the last dense step grow.
    Must satisfy 1 ≤ w ≤ N − 1 (N − 1 is dense).

    window_shape: ``blocks`` (default) — query blocks each seeing their own block's keys and a halo of
    the neighbouring ones, dense pieces the fused attention kernels run unmasked; ``tiles`` — the same
    with square tiles of the token grid (needs a square grid); ``band`` — the exact sliding band, which
    needs a mask: 1.7–2.4× slower than blocks of the same size on CPU at 1,024–4,096 tokens.

    block_size: block size (tile side) for ``blocks`` / ``tiles``: for blocks any size up to N (the last
    block shorter when it does not divide N), for tiles a divisor of √N; None picks the largest divisor
    that leaves a halo of half a block each side. Larger blocks run more efficiently; smaller ones give
    each query a more centred window."""

    window_size: int | None = None
    window_shape: str = "blocks"
    block_size: int | None = None


@register
class WindowResidual(Strategy):
    """WA-RS: window attention plus the residual cached at the layer's last dense step. On joint attention the
    window covers the image tokens only: text tokens attend and are attended in full."""

    name = "wars"
    joint_kernel = True
    config_class = WindowConfig
    reads = frozenset({"residual"})
    writes = frozenset({"output"})
    share_cfg = False  # WA-RS+ASC computes the window on the conditional half only

    def validate(self, num_tokens: int) -> None:
        w = self.config.window_size
        if w is not None and not 1 <= w <= num_tokens - 1:
            raise ValueError(
                f"{self.name} window_size {w} does not fit {num_tokens} tokens; use 1 … {num_tokens - 1} "
                f"({num_tokens - 1} already covers every token)"
            )
        if self.config.block_size is not None and self.config.window_shape == "band":
            raise ValueError(f"{self.name} block_size {self.config.block_size} needs window_shape 'blocks' or 'tiles'; "
                             "drop block_size for the band")
        window = w if w is not None else default_window(num_tokens)
        try:
            self.layout = window_layout(self.config.window_shape, num_tokens, window, self.config.block_size)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None

    @classmethod
    def search_space(cls, num_tokens: int) -> dict[str, list]:
        """Windows of N/16, N/8 (DiTFastAttn's choice) and N/4 tokens, in every shape the tokens allow."""
        square = math.isqrt(num_tokens) ** 2 == num_tokens
        return {
            "window_size": sorted({max(1, num_tokens // d) for d in (16, 8, 4)}),
            "window_shape": [s for s in WINDOW_SHAPES if square or s != "tiles"],
        }

    @classmethod
    def resolved_params(cls, params: dict | None, num_tokens: int) -> dict:
        """The default window (None) is N // 8 tokens."""
        resolved = super().resolved_params(params, num_tokens)
        if resolved["window_size"] is None:
            resolved["window_size"] = default_window(num_tokens)
        return resolved

    def cache_format(self, entry: str) -> WindowLayout | None:
        """A residual is made for one window: its layout."""
        return self.layout if entry == "residual" else None

    def make_residual(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Called at a dense step whose residual a later step of this strategy reads: O − W, (B, N, C)."""
        return dense - merge_heads(window_attention(q, k, v, self.layout))

    def attention(self, call: AttentionCall) -> torch.Tensor:
        if call.joint is not None:
            return self.joint_attention(call)

        def windowed(x: torch.Tensor) -> torch.Tensor:
            q, k, v = project_qkv(call.attn, x)
            return merge_heads(window_attention(q, k, v, self.layout))  # (B', N, C)

        if self.share_cfg:
            merged = conditional_half_only(call, windowed)
        else:
            merged = windowed(call.hidden_states)
        merged = merged + call.cache["residual"]
        return project_out(call.attn, merged)

    # --- joint attention: the window over the image tokens; text queries and keys stay dense -------------
    def image_window(self, tokens: JointTokens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
        """The image queries' window attention over the image keys, plus every text key: (B, H, N, D)."""
        qi = tokens.split(q)[1]
        (kt, ki), (vt, vi) = tokens.split(k), tokens.split(v)
        return window_attention(qi, ki, vi, self.layout, extra=GlobalKeys(kt, vt, tokens.text_mask(mask)))

    def make_joint_residual(self, tokens: JointTokens, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None, dense: torch.Tensor) -> torch.Tensor:
        """Called in the kernel of a dense step whose residual a later step reads: the image rows' O − W."""
        return tokens.split(dense)[1] - self.image_window(tokens, q, k, v, mask)

    def joint_attention(self, call: AttentionCall) -> Any:
        """The family's own processor with a kernel that windows the image queries over the image keys (the text
        keys all seen) and adds the residual; the text queries attend densely."""
        tokens, residual = call.joint, call.cache["residual"]

        def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            text = F.scaled_dot_product_attention(tokens.split(q)[0], k, v, attn_mask=mask)
            return tokens.join(text, self.image_window(tokens, q, k, v, mask) + residual)

        return run_with_kernel(call.original, kernel)

    def joint_pairs(self, tokens: int, text_tokens: int, count: str) -> int:
        """Text queries see every key; image queries the text keys and their window."""
        return text_tokens * (text_tokens + tokens) + self.image_pairs(text_tokens, count)

    def joint_production_pairs(self, entry: str, tokens: int, text_tokens: int, count: str) -> int:
        """The image queries' window pass a dense step adds to make the residual."""
        return self.image_pairs(text_tokens, count) if entry == "residual" else 0

    def image_pairs(self, text_tokens: int, count: str) -> int:
        """The image queries' pairs on joint attention: their window and every text key."""
        return self.layout.queries(count) * text_tokens + self.layout.pairs(count)

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        rows = shape.batch // 2 if (self.share_cfg and cfg) else shape.batch  # rows the window pass sees
        linear = 2 * shape.tokens * shape.dim * shape.dim
        core = 2 * 2 * self.layout.pairs(shape.window_count) * shape.dim
        return float(rows * (3 * linear + core) + shape.batch * linear)  # q, k, v + core on rows; out on all

    def production_flops(self, entry: str, shape: AttentionShape) -> float:
        """The extra window pass a dense step spends to make this strategy's residual."""
        if entry != "residual":
            return 0.0
        return float(shape.batch * 2 * 2 * self.layout.pairs(shape.window_count) * shape.dim)


@register
class WindowResidualShareCFG(WindowResidual):
    """WA-RS+ASC: the window pass on the conditional half only, shared by both halves, plus the residual."""

    name = "wars+asc"
    joint_kernel = False  # its conditional-half window pass is built for plain self-attention only
    share_cfg = True
    shares_params_with = "wars"  # one window for both, so that a residual serves either
