"""Which denoising step and which CFG layout the transformer is being called for.

diffusers' DiT and PixArt pipelines expose neither, so ditplan owns the loop and publishes them here;
strategies read them through :func:`current_step`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class StepContext:
    """step: index of the denoising step (0 = pure noise) out of ``num_steps``.

    cfg: the batch is ``[conditional; unconditional]`` halves of equal size (classifier-free guidance).
    """

    step: int
    num_steps: int
    cfg: bool


_CURRENT: ContextVar[StepContext | None] = ContextVar("ditplan_step", default=None)


def current_step() -> StepContext | None:
    return _CURRENT.get()


@contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)
