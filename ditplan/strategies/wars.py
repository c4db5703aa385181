"""``wars`` and ``wars+asc``: window attention with residual sharing (DiTFastAttn).

At a dense step r the layer also computes window attention W_r and keeps the residual
R_r = O_r − W_r; at a later step k it computes only W_k and returns W_k + R_r. The window is a 1-D
band over the flattened tokens: query i sees keys j with |i − j| ≤ ``window_size`` (a span of
2w + 1 tokens), as in DiTFastAttn's public code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditplan.strategies.attention import (
    merge_heads,
    project_out,
    project_qkv,
    window_attention,
    window_keys,
)
from ditplan.strategies.base import AttentionCall, AttentionShape, Strategy, register
from ditplan.strategies.sharing import conditional_half_only


@dataclass(frozen=True)
class WindowConfig:
    """window_size: half-width w of the band (span 2w + 1). None: N // 8, DiTFastAttn's choice
    (N = 1024 → 128). A smaller window is cheaper but leans harder on the residual, which ages as
    the steps since the last dense step grow. Must satisfy 1 ≤ w ≤ N − 1 (N − 1 is dense)."""

    window_size: int | None = None


@register
class WindowResidual(Strategy):
    """WA-RS: window attention plus the residual cached at the layer's last dense step."""

    name = "wars"
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
        self.window = w if w is not None else max(1, num_tokens // 8)

    @classmethod
    def search_space(cls, num_tokens: int) -> dict[str, list[int]]:
        """Windows of N/16, N/8 (DiTFastAttn's choice) and N/4 tokens."""
        return {"window_size": sorted({max(1, num_tokens // d) for d in (16, 8, 4)})}

    def make_residual(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Called at a dense step whose residual a later step of this strategy reads: O − W, (B, N, C)."""
        return dense - merge_heads(window_attention(q, k, v, self.window))

    def attention(self, call: AttentionCall) -> torch.Tensor:
        def windowed(x: torch.Tensor) -> torch.Tensor:
            q, k, v = project_qkv(call.attn, x)
            return merge_heads(window_attention(q, k, v, self.window))  # (B', N, C)

        if self.share_cfg:
            merged = conditional_half_only(call.hidden_states, call.context, windowed)
        else:
            merged = windowed(call.hidden_states)
        merged = merged + call.cache["residual"]
        return project_out(call.attn, merged)

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        rows = shape.batch // 2 if (self.share_cfg and cfg) else shape.batch  # rows the window pass sees
        linear = 2 * shape.tokens * shape.dim * shape.dim
        core = 2 * 2 * window_keys(shape.tokens, self.window) * shape.dim
        return float(rows * (3 * linear + core) + shape.batch * linear)  # q, k, v + core on rows; out on all

    def production_flops(self, entry: str, shape: AttentionShape) -> float:
        """The extra window pass a dense step spends to make this strategy's residual."""
        if entry != "residual":
            return 0.0
        return float(shape.batch * 2 * 2 * window_keys(shape.tokens, self.window) * shape.dim)


@register
class WindowResidualShareCFG(WindowResidual):
    """WA-RS+ASC: the window pass on the conditional half only, shared by both halves, plus the residual."""

    name = "wars+asc"
    share_cfg = True
