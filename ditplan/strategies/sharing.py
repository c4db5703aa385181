"""Helpers shared by the strategies that reuse work across CFG halves."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ditplan.models.context import StepContext

if TYPE_CHECKING:
    from ditplan.strategies.base import AttentionCall


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


def share_conditional_half(call: AttentionCall) -> Any:
    """ASC on the attention module as a whole: run it on the conditional half of the CFG batch (its input and
    every argument with the batch's rows, e.g. joint attention's text stream) and use what it returns, a
    tensor or a tuple of them, for both halves. Without CFG the module sees the whole batch."""
    if not call.context.cfg:
        return call.original()
    half = call.hidden_states.shape[0] // 2
    shared = call.original_on_rows(slice(0, half) if call.context.cond_first else slice(half, None))
    if isinstance(shared, tuple):
        return tuple(torch.cat([part, part]) for part in shared)
    return torch.cat([shared, shared])
