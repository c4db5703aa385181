"""Helpers shared by the strategies that reuse work across CFG halves."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ditplan.plan import PlanError

if TYPE_CHECKING:
    from ditplan.strategies.base import AttentionCall


def conditional_half_only(call: AttentionCall, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """ASC inside attention: run ``compute`` on the conditional rows of the call's input and use the result for
    the unconditional ones (the first half of ``[cond; uncond]``, the second of ``[uncond; cond]``, as the call's
    context says; with two calls per step, the conditional call's result for the unconditional call). Without
    CFG there is nothing to share and ``compute`` sees the whole batch."""
    return _shared(call, lambda rows: compute(call.hidden_states if rows is None else call.hidden_states[rows]))


def share_conditional_half(call: AttentionCall) -> Any:
    """ASC on the attention module as a whole: run it on the conditional rows (its input and every argument with
    the batch's rows, e.g. joint attention's text stream; with two calls per step, in the conditional call) and
    use what it returns, a tensor or a tuple of them, for the unconditional ones too. Without CFG the module sees
    the whole batch."""
    return _shared(call, lambda rows: call.original() if rows is None else call.original_on_rows(rows))


def _shared(call: AttentionCall, compute: Callable[[slice | None], Any]) -> Any:
    """``compute(rows)`` on the conditional rows (None: all rows), used for the unconditional ones as well."""
    context = call.context
    if context.branch is not None:  # two calls per step: the conditional one computes, the unconditional one reuses
        if context.branch == "cond":
            call.between["asc"] = (call.token_counts(), compute(None))
            return call.between["asc"][1]
        if "asc" not in call.between:
            raise PlanError("ASC gives the unconditional call of a step the conditional call's attention output, but "
                            "the unconditional call came first; make the conditional call first in each step")
        counts, shared = call.between.pop("asc")
        if counts != call.token_counts():
            raise PlanError(f"ASC gives the unconditional call the conditional call's attention output, but their token "
                            f"counts differ ({counts} and {call.token_counts()}: image, text); give the prompt and the "
                            "negative prompt embeddings of one length (as ditplan's loop does), or use a plan without asc")
        return shared
    if not context.cfg:
        return compute(None)
    half = call.hidden_states.shape[0] // 2
    shared = compute(slice(0, half) if context.cond_first else slice(half, None))  # (B/2, N, C), or a tuple
    if isinstance(shared, tuple):
        return tuple(torch.cat([part, part]) for part in shared)
    return torch.cat([shared, shared])
