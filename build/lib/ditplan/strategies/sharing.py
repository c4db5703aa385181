"""Helpers shared by the strategies that reuse work across CFG halves."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditplan.models.context import StepContext


def conditional_half_only(
    x: torch.Tensor, context: StepContext, compute: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """ASC: run ``compute`` on the conditional half of a CFG batch (the first half of ``[cond; uncond]``,
    the second of ``[uncond; cond]``, as ``context`` says) and use the result for both halves. Without
    CFG there is nothing to share and ``compute`` sees the whole batch."""
    if not context.cfg:
        return compute(x)
    half = x.shape[0] // 2
    shared = compute(x[:half] if context.cond_first else x[half:])  # (B/2, N, C)
    return torch.cat([shared, shared])
