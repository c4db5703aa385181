"""Which denoising step and which CFG layout the transformer is being called for.

A loop that knows the step publishes it here and an installed plan reads it through
:func:`current_step`: ditplan's own loop does, a user's own loop does with :func:`denoising_step`, and
for a stock diffusers pipeline the plan derives it from the pipeline's call
(:mod:`ditplan.strategies.pipeline`). Nothing here knows a strategy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ditplan.errors import UserError

# how a classifier-free-guidance batch is laid out → whether the conditional half comes first
CFG_ORDERS: dict[str, bool] = {"cond-uncond": True, "uncond-cond": False}
BRANCHES = ("cond", "uncond")  # the two transformer calls of a step, in order, when guidance runs as two calls


@dataclass(frozen=True)
class StepContext:
    """step: index of the denoising step (0 = pure noise) out of ``num_steps``.

    cfg: the batch is two halves of equal size (classifier-free guidance); ``cond_first``: the
    conditional half comes first (``[cond; uncond]``, as diffusers' DiTPipeline and ditplan's loop batch
    it) or second (``[uncond; cond]``, PixArt's pipelines).
    run: an id of the sampling run the step belongs to (a plan's caches start empty in a new run), or
    None when the loop does not say: then a step index lower than the last one starts a new run.
    branch: ``"cond"`` or ``"uncond"`` when guidance runs as two transformer calls per step (Qwen-Image's
    pipeline), the conditional one first, and this call is that branch (then ``cfg`` says guidance is on, but
    the batch holds one branch only); None when one call makes the step.
    """

    step: int
    num_steps: int
    cfg: bool
    cond_first: bool = True
    run: int | None = None
    branch: str | None = None


_CURRENT: ContextVar[StepContext | None] = ContextVar("ditplan_step", default=None)
_RUN_IDS = itertools.count()


def current_step() -> StepContext | None:
    return _CURRENT.get()


def new_run_id() -> int:
    """A fresh sampling-run id (for :attr:`StepContext.run`)."""
    return next(_RUN_IDS)


@contextmanager
def step_context(context: StepContext) -> Iterator[StepContext]:
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def denoising_step(step: int, num_steps: int, cfg: str | None = "cond-uncond", branch: str | None = None
                   ) -> AbstractContextManager[StepContext]:
    """Tell an applied plan which step a transformer call in your own denoising loop is for::

        ditplan.apply_plan(transformer, plan)
        for i, t in enumerate(scheduler.timesteps):
            with ditplan.denoising_step(i, len(scheduler.timesteps), cfg="cond-uncond"):
                out = transformer(torch.cat([x, x]), timestep=t, class_labels=labels_and_nulls).sample
            ...

    ``cfg``: how the batch holds classifier-free guidance — ``"cond-uncond"`` (conditional half first),
    ``"uncond-cond"``, or None (no guidance: every row is conditional). ``branch``: a loop that runs guidance
    as two calls per step says ``"cond"`` for the first call and ``"uncond"`` for the second (``cfg`` is then
    not used). Steps must come in order; a step lower than the previous one starts a new sampling run.
    """
    if branch is not None and branch not in BRANCHES:
        raise UserError(f"branch={branch!r} is not a guidance call; use one of {list(BRANCHES)} or None")
    if branch is None and cfg is not None and cfg not in CFG_ORDERS:
        raise UserError(f"cfg={cfg!r} is not a CFG batch layout; use one of {sorted(CFG_ORDERS)} or None")
    if not 0 <= step < num_steps:
        raise UserError(f"step {step} is outside 0 … {num_steps - 1}; give the index of the step in the schedule")
    if branch is not None:
        return step_context(StepContext(step=step, num_steps=num_steps, cfg=True, branch=branch))
    return step_context(StepContext(step=step, num_steps=num_steps, cfg=cfg is not None,
                                    cond_first=CFG_ORDERS.get(cfg or "cond-uncond", True)))
