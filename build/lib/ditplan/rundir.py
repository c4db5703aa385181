"""Every path of a run directory, with a typed load and save for each part. No other module builds a
path inside a run directory::

    <run>/
      experiment.yaml           the experiment, its relative paths made absolute (``ditplan run`` resumes on it)
      greedy/greedy-D1.yaml …   DiTFastAttn's greedy plans, one per threshold
      search/                   the study (:class:`SearchDir`): optuna.journal, mlflow.db + mlartifacts/,
                                trials/trial-0000.yaml …, proxy.json, pareto_front.md
      held_out.yaml             the held-out stage: every side measured in the same rounds (:class:`HeldOutRecord`)
      report/                   comparison.md, .png, .html
      exported/                 the plans the export rules select

``ditplan search --out DIR`` runs a study in a search folder of its own: a :class:`SearchDir` alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from ditplan.atomic import atomic_write_text
from ditplan.errors import UserError
from ditplan.files import read_yaml
from ditplan.plan import Plan, load_plan
from ditplan.spec import ExperimentSpec, load_spec

SideKind = Literal["dense", "greedy", "learned", "baseline"]
SIDE_KINDS: tuple[SideKind, ...] = ("dense", "greedy", "learned", "baseline")


class _Part:
    """A file or folder of a run (or search) folder, by its name there: ``folder.part`` is the path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, folder: Any, owner: type) -> Path:
        return folder.root / self.name


@dataclass(frozen=True)
class SearchDir:
    """A study's folder: its journal (when no RDB is given), MLflow store (when no server is given), the
    plan file of every trial, the proxy it measured and its front table."""

    root: Path
    journal: ClassVar[_Part] = _Part("optuna.journal")
    mlflow_db: ClassVar[_Part] = _Part("mlflow.db")  # NOTE: MLflow 3 refuses ./mlruns by default; the driver alone writes it
    artifacts: ClassVar[_Part] = _Part("mlartifacts")
    proxy: ClassVar[_Part] = _Part("proxy.json")
    front_table: ClassVar[_Part] = _Part("pareto_front.md")
    trials: ClassVar[_Part] = _Part("trials")

    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db.resolve()}"

    def trial_path(self, number: int) -> Path:
        return self.trials / f"trial-{number:04d}.yaml"

    def load_trial(self, number: int) -> Plan:
        return load_plan(self.trial_path(number))

    def save_trial(self, number: int, plan: Plan) -> Path:
        return plan.save(self.trial_path(number))


@dataclass(frozen=True)
class GreedyDir:
    """A folder of greedy plans, one per threshold: a run's ``greedy/``, or ``ditplan greedy --out DIR``."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / f"greedy-{name}.yaml"

    def plans(self) -> dict[str, Plan]:
        """The greedy plans written so far, by name (D1, D2 …), in threshold order."""
        paths = sorted(self.root.glob("greedy-*.yaml"), key=lambda p: (len(p.stem), p.stem))
        return {p.stem.removeprefix("greedy-"): load_plan(p) for p in paths}


@dataclass(frozen=True)
class SideResult:
    """One side of the held-out comparison: its ``metrics`` on the held-out seeds; ``plan``: its plan file,
    relative to the run directory (None for dense); ``trial``: the study trial a learned plan is; ``key``:
    what the plan runs, so that a resumed stage knows whether it measured this plan already."""

    name: str
    kind: SideKind
    metrics: Mapping[str, float]
    plan: str | None = None
    trial: int | None = None
    key: str = ""


@dataclass(frozen=True)
class HeldOutRecord:
    """The held-out stage: every side measured on the same held-out samples (``first_seed`` …, ``samples``
    of them) in the same ``rounds``, dense first; what it spent in ``seconds`` and sample-forwards."""

    first_seed: int
    samples: int
    rounds: int
    seconds: float
    sample_forwards: int
    sides: tuple[SideResult, ...] = field(default_factory=tuple)

    def of_kind(self, kind: SideKind) -> list[SideResult]:
        return [s for s in self.sides if s.kind == kind]

    def dense(self) -> SideResult:
        return self.of_kind("dense")[0]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sides": [{**asdict(s), "metrics": dict(s.metrics)} for s in self.sides]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeldOutRecord:
        sides = tuple(SideResult(**side) for side in data["sides"])
        return cls(**{**data, "sides": sides})


@dataclass(frozen=True)
class RunDir:
    """A run directory (``ditplan run``): its parts, each loaded and saved here."""

    root: Path
    experiment: ClassVar[_Part] = _Part("experiment.yaml")
    held_out: ClassVar[_Part] = _Part("held_out.yaml")
    report: ClassVar[_Part] = _Part("report")
    exported: ClassVar[_Part] = _Part("exported")

    @classmethod
    def of(cls, spec: ExperimentSpec) -> RunDir:
        return cls(spec.run_dir())

    def load_experiment(self) -> ExperimentSpec:
        """The run's experiment; a folder without one is refused in one line."""
        if not self.experiment.exists():
            raise UserError(f"{self.root} is not a ditplan run directory (no experiment.yaml); make one with `ditplan run`")
        return load_spec(self.experiment)

    def save_experiment(self, text: str) -> Path:
        return atomic_write_text(self.experiment, text)

    # --- the greedy plans, the search, the held-out record -----------------------------------------------
    @property
    def greedy(self) -> GreedyDir:
        return GreedyDir(self.root / "greedy")

    @property
    def search(self) -> SearchDir:
        return SearchDir(self.root / "search")

    def load_held_out(self) -> HeldOutRecord | None:
        """The held-out stage's record, or None before that stage ran."""
        if not self.held_out.exists():
            return None
        return HeldOutRecord.from_dict(read_yaml(self.held_out, "held-out record"))

    def save_held_out(self, record: HeldOutRecord) -> Path:
        return atomic_write_text(self.held_out, yaml.safe_dump(record.to_dict(), sort_keys=False, allow_unicode=True))

    def relative(self, path: Path) -> str:
        """``path`` as the run directory's records name it: relative to the run directory."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def resolve(self, relative: str) -> Path:
        return self.root / relative


def search_folder(spec: ExperimentSpec, out: str | Path | None = None) -> SearchDir:
    """Where ``ditplan search`` runs its study: ``out``, or the search folder of the experiment's run directory."""
    return SearchDir(Path(out)) if out else RunDir.of(spec).search
