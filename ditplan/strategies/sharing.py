"""Helpers shared by the strategies that reuse work across CFG halves."""

from __future__ import annotations

from collections.abc import Callable

import torch


def conditional_half_only(x: torch.Tensor, cfg: bool, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """ASC: run ``compute`` on the conditional half of a ``[cond; uncond]`` batch and use the result
    for both halves. Without CFG there is nothing to share and ``compute`` sees the whole batch."""
    if not cfg:
        return compute(x)
    half = compute(x[: x.shape[0] // 2])  # (B/2, N, C)
    return torch.cat([half, half])
