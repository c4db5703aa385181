"""Time-wise pruning curves: the SDTM pruning rate r = 1 − M/N as a function of the denoising step.

SparseDiT keeps few tokens at the noisy start (global structure) and more at the end (detail). Each
curve is a small frozen dataclass with ``rate(step, num_steps)`` (step 0 = pure noise) and a search
space; curves are registered by name so plans, search spaces and the CLI share one list.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ditplan.registry import Registry

# Rates a search may choose; 0.9375 keeps 1/16 of the tokens (a 4×4 grid of a 16×16 one).
RATE_CHOICES = [0.0, 0.25, 0.4375, 0.5, 0.75, 0.859375, 0.9375]


@dataclass(frozen=True)
class PruningCurve:
    """Base of the curves; subclasses set ``name`` and implement :meth:`rate`."""

    name: ClassVar[str]

    def rate(self, step: int, num_steps: int) -> float:
        raise NotImplementedError

    @staticmethod
    def progress(step: int, num_steps: int) -> float:
        """0 at the first (noisiest) step, 1 at the last."""
        return step / max(num_steps - 1, 1)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("r") and not 0.0 <= value < 1.0:
                raise ValueError(f"pruning curve {self.name!r}: {f.name}={value} is outside [0, 1); a rate r keeps (1−r)·N tokens")

    @classmethod
    def search_space(cls) -> dict[str, list[Any]]:
        return {f.name: RATE_CHOICES for f in dataclasses.fields(cls) if f.name.startswith("r")}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


CURVES: Registry[type[PruningCurve]] = Registry("pruning curve")


def register_curve(name: str) -> Callable[[type[PruningCurve]], type[PruningCurve]]:
    """Class decorator: the curve becomes a frozen dataclass named ``name`` and registered under it, for
    plans, search spaces and the CLI."""
    def register(cls: type[PruningCurve]) -> type[PruningCurve]:
        cls.name = name
        return CURVES.register(name, dataclass(frozen=True)(cls))
    return register


@register_curve("constant")
class Constant(PruningCurve):
    """The same rate at every step."""

    r: float = 0.75

    def rate(self, step: int, num_steps: int) -> float:
        return self.r


@register_curve("paper")
class PaperSchedule(PruningCurve):
    """SparseDiT's schedule: ``r_min`` for the last quarter of denoising, rising linearly to ``r_max``
    at pure noise."""

    r_min: float = 0.5
    r_max: float = 0.875

    def rate(self, step: int, num_steps: int) -> float:
        remaining = 1.0 - self.progress(step, num_steps)  # 1 at pure noise, 0 at the last step
        if remaining <= 0.25:
            return self.r_min
        return self.r_min + (self.r_max - self.r_min) * (remaining - 0.25) / 0.75


@register_curve("linear")
class Linear(PruningCurve):
    """From ``r_start`` at the first step to ``r_end`` at the last, linearly."""

    r_start: float = 0.875
    r_end: float = 0.5

    def rate(self, step: int, num_steps: int) -> float:
        return self.r_start + (self.r_end - self.r_start) * self.ease(self.progress(step, num_steps))

    @staticmethod
    def ease(progress: float) -> float:
        """How far from ``r_start`` to ``r_end`` the curve is at ``progress`` ∈ [0, 1]."""
        return progress


@register_curve("cosine")
class Cosine(Linear):
    """From ``r_start`` to ``r_end`` on a half cosine: flat at both ends, steepest mid-way."""

    @staticmethod
    def ease(progress: float) -> float:
        return 0.5 * (1 - math.cos(math.pi * progress))


@register_curve("step")
class Step(PruningCurve):
    """``r_high`` until the fraction ``switch`` of the steps is done, then ``r_low``."""

    r_high: float = 0.875
    r_low: float = 0.5
    switch: float = 0.5

    def rate(self, step: int, num_steps: int) -> float:
        return self.r_high if step < self.switch * num_steps else self.r_low

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.switch <= 1.0:
            raise ValueError(f"pruning curve 'step': switch={self.switch} must be a fraction of the steps in [0, 1]")

    @classmethod
    def search_space(cls) -> dict[str, list[Any]]:
        return {**super().search_space(), "switch": [0.25, 0.5, 0.75]}


def curve_from_dict(data: Mapping[str, Any]) -> PruningCurve:
    """``{"name": "paper", "r_min": 0.5, "r_max": 0.875}`` → the curve; bad names and keys are named."""
    params = dict(data)
    name = params.pop("name", None)
    cls = CURVES.get_entry(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"pruning curve {name!r} has no parameter {unknown[0]!r}; its parameters are {sorted(fields)}")
    curve = cls(**{k: float(v) for k, v in params.items()})
    curve.validate()
    return curve
