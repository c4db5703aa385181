"""Guidance on an interval: at chosen steps the unconditional branch of classifier-free guidance is not computed.

A plan's ``guidance`` names, per step, what the unconditional prediction is there (:data:`GUIDANCE_FILLS`):

- ``full``: computed (every step of a plan without ``guidance``);
- ``reuse``: the unconditional prediction of the last step that computed it;
- ``forecast``: extrapolated linearly, in step index, from the last two steps that computed it (``reuse`` while
  only one has);
- ``off``: the conditional prediction, so guidance is off at that step (every family's rule then gives the
  conditional prediction: guidance-interval methods).

The first step computes it. Where guidance runs as two transformer calls per step (FLUX.1's true CFG,
Qwen-Image), a skipped step's unconditional call returns its fill without running. Where it runs as one call on a
batch of both halves (DiT, PixArt, SD3), a plan with ``guidance`` makes each step two calls on the halves, the
conditional one first, and a skipped step computes the conditional rows only. Either way each branch keeps its
own caches (:class:`~ditplan.strategies.apply.CallState`) and the unconditional branch's cache planner sees only
the steps it computes, so its ``ast``/``reuse`` cells reuse its own last computed step across those it skips; ASC
gives the unconditional call the conditional call's attention output as with two calls.

A plan file holds it as one run-length line over the steps::

    guidance: "full:8 reuse:1 full:1 reuse:1 full:1 off:8"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ditplan.models.context import StepContext
from ditplan.plan import Plan, PlanError
from ditplan.registry import Registry, did_you_mean
from ditplan.strategies.base import rows_of

History = Sequence[tuple[int, torch.Tensor]]  # (step, unconditional prediction) of the last computed steps
# (history, this step's conditional prediction, step) → the unconditional prediction at a step that skips it
Fill = Callable[[History, torch.Tensor, int], torch.Tensor]
COMPUTED = "full"


def _reuse(history: History, cond: torch.Tensor, step: int) -> torch.Tensor:
    return history[-1][1]


def _forecast(history: History, cond: torch.Tensor, step: int) -> torch.Tensor:
    if len(history) < 2:
        return history[-1][1]
    (before, older), (last, newer) = history[-2], history[-1]
    return newer + (newer - older) * ((step - last) / (last - before))


def _off(history: History, cond: torch.Tensor, step: int) -> torch.Tensor:
    return cond


GUIDANCE_FILLS: Registry[Fill] = Registry("guidance fill", {"reuse": _reuse, "forecast": _forecast, "off": _off})


@dataclass(frozen=True)
class GuidanceSchedule:
    """A plan's ``guidance``: per step, ``full`` or the fill that stands in for the unconditional prediction."""

    fills: tuple[str, ...]

    @classmethod
    def from_plan(cls, plan: Plan) -> GuidanceSchedule | None:
        """The plan's schedule (None without one, or when every step computes); a bad name or a first step that
        does not compute is a one-line :class:`PlanError`, as is a run-time cache beside it (diffusers' or ditplan's)."""
        if plan.guidance is None or set(plan.guidance) == {COMPUTED}:
            return None
        for name in plan.guidance:
            if name != COMPUTED and name not in GUIDANCE_FILLS:
                choices = [COMPUTED, *GUIDANCE_FILLS.choices()]
                raise PlanError(f"plan guidance names {name!r}{did_you_mean(name, choices)}; use one of {choices}")
        if plan.guidance[0] != COMPUTED:
            raise PlanError(f"plan guidance starts with {plan.guidance[0]!r}, but the first step has no earlier "
                            "unconditional prediction to stand in; make step 0 'full'")
        if plan.cache:
            raise PlanError("plan guidance skips unconditional steps, which a run-time cache does not follow (it keeps "
                            "one state for both branches); drop the guidance part or the cache")
        return cls(tuple(plan.guidance))

    def computes(self, step: int) -> bool:
        return self.fills[step] == COMPUTED

    @property
    def computed_steps(self) -> tuple[int, ...]:
        """The steps that compute the unconditional prediction."""
        return tuple(s for s in range(len(self.fills)) if self.computes(s))


def prediction(out: Any) -> torch.Tensor:
    """The prediction in what a transformer returns: a tuple (``return_dict=False``) or an output with ``sample``."""
    return out[0] if isinstance(out, tuple) else out.sample


def with_prediction(out: Any, value: torch.Tensor) -> Any:
    """``out`` with its prediction replaced by ``value``."""
    if isinstance(out, tuple):
        return (value, *out[1:])
    return replace(out, sample=value)


Call = Callable[[StepContext, tuple, dict], Any]  # the transformer's forward under a step context


@dataclass
class GuidanceRunner:
    """Runs a plan's guidance schedule around each transformer call (:meth:`forward`) and keeps, per stream of
    calls (greedy's micro-batch ``chunk``), the last two computed unconditional predictions and this step's
    conditional one."""

    schedule: GuidanceSchedule
    uncond: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    cond: dict[int, tuple[int, Any]] = field(default_factory=dict)

    def reset(self) -> None:
        self.uncond.clear()
        self.cond.clear()

    def forward(self, call: Call, context: StepContext, args: tuple, kwargs: dict, chunk: int = 0,
                skipped: Callable[[], None] = lambda: None) -> Any:
        """One transformer call of a step: a branch of two calls, or a batch of both halves run as two calls;
        ``skipped()`` is called where the unconditional call does not run."""
        if not context.cfg:
            return call(context, args, kwargs)
        if context.branch is not None:
            return self._branch(call, context, args, kwargs, chunk, skipped)
        batch = _batch_rows(args, kwargs)
        half = batch // 2
        cond_rows, uncond_rows = (slice(0, half), slice(half, None)) if context.cond_first else (slice(half, None), slice(0, half))
        outs = {branch: self._branch(call, replace(context, branch=branch), rows_of(args, rows, batch),
                                     rows_of(kwargs, rows, batch), chunk, skipped)
                for branch, rows in (("cond", cond_rows), ("uncond", uncond_rows))}
        first, second = ("cond", "uncond") if context.cond_first else ("uncond", "cond")
        return with_prediction(outs["cond"], torch.cat([prediction(outs[first]), prediction(outs[second])]))

    def _branch(self, call: Call, context: StepContext, args: tuple, kwargs: dict, chunk: int,
                skipped: Callable[[], None]) -> Any:
        step = context.step
        if context.branch == "cond":
            out = call(context, args, kwargs)
            self.cond[chunk] = (step, out)
            return out
        if self.schedule.computes(step):
            out = call(context, args, kwargs)
            history = self.uncond.setdefault(chunk, [])
            history[:] = [*history[-1:], (step, prediction(out))]
            return out
        cond_step, cond_out = self.cond.get(chunk, (None, None))
        if cond_step != step or chunk not in self.uncond:
            raise PlanError("plan guidance fills the unconditional call of a step from the conditional call of that step "
                            "and earlier unconditional ones, but this run has neither (the unconditional call came "
                            "first, or the run did not start at step 0); make the conditional call first from step 0")
        skipped()
        fill = GUIDANCE_FILLS[self.schedule.fills[step]](self.uncond[chunk], prediction(cond_out), step)
        return with_prediction(cond_out, fill)


def _batch_rows(args: tuple, kwargs: dict) -> int:
    """The rows of the latent batch a transformer call gets (its first argument, or ``hidden_states``)."""
    latents = args[0] if args else kwargs["hidden_states"]
    if latents.shape[0] % 2:
        raise PlanError(f"plan guidance splits a guided batch into its two halves, but it has {latents.shape[0]} rows; "
                        "give the transformer both halves of each sample (conditional and unconditional) in one batch")
    return latents.shape[0]
