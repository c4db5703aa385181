"""Name → entry registries of the data layer: the names an experiment or plan file may use.

The data layer (``spec``, ``plan``) checks names against these without importing the layers that give
them meaning: ``models.sampling`` builds schedulers from :data:`SCHEDULERS`, ``evaluators`` compute the
metrics of :data:`METRICS`. Adding a scheduler or a metric adds one entry here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from ditplan.errors import UserError

T = TypeVar("T")
Direction = Literal["minimize", "maximize"]


def did_you_mean(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a mistyped ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(what: str, name: Any, choices: list[str], where: str = "") -> UserError:
    """The one-line error for a ``name`` that is none of ``choices``: it names the value, the closest
    choice and every valid one. ``where``: the field that holds it, e.g. ``search.space.methods``."""
    prefix = f"{where}: " if where else ""
    return UserError(f"{prefix}unknown {what} {name!r}{did_you_mean(name, sorted(choices))}; "
                     f"choose one of {sorted(choices)}")


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name, read like a dict; :meth:`get_entry` refuses an unknown name in one line."""

    def __init__(self, what: str, entries: Mapping[str, T] | None = None) -> None:
        self.what = what
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a name already taken by another entry is refused."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.what} {name!r} is already registered; choose another name")
        self._entries[name] = entry
        return entry

    def get_entry(self, name: str, where: str = "") -> T:
        if name not in self._entries:
            raise unknown_name(self.what, name, list(self._entries), where)
        return self._entries[name]

    def choices(self) -> list[str]:
        return sorted(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class SchedulerEntry:
    """A diffusers scheduler class (by its name in ``diffusers``) and the settings it takes over the
    model's own noise schedule."""

    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    flow_matching: bool = False  # samples flow-matching models (FLUX, SD3, …) rather than diffusion ones


SCHEDULERS: Registry[SchedulerEntry] = Registry("scheduler", {
    "dpmsolver++": SchedulerEntry("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": SchedulerEntry("DDIMScheduler"),
    "euler": SchedulerEntry("EulerDiscreteScheduler"),
    # flow matching (FLUX, SD3, Qwen-Image): the model's own shift and dynamic shifting stay as configured
    "flow-euler": SchedulerEntry("FlowMatchEulerDiscreteScheduler", flow_matching=True),
})


@dataclass(frozen=True)
class MetricInfo:
    """direction: which way is better; reference: the hypervolume reference used when an experiment
    gives none (dense cost for cost ratios, a clearly bad quality for fidelity metrics; None: the
    experiment must give one), fixed so that hypervolumes compare across studies; label: the metric in
    words, for axes and tables."""

    direction: Direction
    reference: float | None = None
    label: str = ""


METRICS: Registry[MetricInfo] = Registry("metric", {
    "rel_l1": MetricInfo("minimize", 0.5, "relative L1 to dense (same seeds)"),
    "mse": MetricInfo("minimize", 1.0, "mean squared error to dense"),
    "psnr": MetricInfo("maximize", 10.0, "PSNR to dense (dB)"),
    "ssim": MetricInfo("maximize", 0.0, "SSIM to dense"),
    "lpips": MetricInfo("minimize", 1.0, "LPIPS to dense (VGG16)"),
    # window attention as its kernel executes it (evaluators.cost.FLOPS_COUNT)
    "flops_ratio": MetricInfo("minimize", 1.0, "FLOPs ratio to dense"),
    "ideal_flops_ratio": MetricInfo("minimize", 1.0, "FLOPs ratio to dense (ideal windows)"),
    "attention_flops_ratio": MetricInfo("minimize", 1.0, "self-attention FLOPs ratio to dense"),
    "latency_ratio": MetricInfo("minimize", 1.0, "latency ratio to dense (lower is faster)"),
    "fid": MetricInfo("minimize", None, "FID to the real images"),
    "kid": MetricInfo("minimize", None, "KID to the real images"),
    "kid_low": MetricInfo("minimize", None, "KID on low-level features"),
    "class_agreement": MetricInfo("maximize", 0.0, "class agreement (digit classifier)"),
})


def label(metric: str) -> str:
    """``metric`` in words (its id when it has none)."""
    info = METRICS.get(metric)
    return info.label if info is not None and info.label else metric


# Metrics reports show that no objective may name (torch-fidelity's IS, precision and recall), by direction.
REPORTED: dict[str, Direction] = {"is": "maximize", "precision": "maximize", "recall": "maximize",
                                  "clip_score": "maximize"}


def direction(metric: str) -> Direction:
    """Which way ``metric`` is better (a metric ditplan does not know, e.g. a plugin's: lower)."""
    info = METRICS.get(metric)
    return info.direction if info is not None else REPORTED.get(metric, "minimize")
