"""The report of a run, as data: what :mod:`ditplan.comparison.render` turns into Markdown, PNG and HTML.

Every figure it states for a plan comes from the held-out record (``held_out.yaml``); the search-seed
metrics (what chose the plans) are shown beside them, never instead. Infeasible trials (a constraint
broken on the search seeds) are counted but are on no front, in no hypervolume and never exported.
Budgets are in transformer sample-forwards (rows × steps, CFG counted) and elapsed time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ditplan.errors import UserError
from ditplan.evaluators.cost import sample_forwards
from ditplan.models.adapters import model_folder
from ditplan.plan import Plan, load_plan
from ditplan.plansearch.pareto import hypervolume, pareto_mask
from ditplan.plansearch.proxy import read_proxy
from ditplan.plansearch.records import TrialRecord, reference_point, trial_records
from ditplan.plansearch.storage import load_finished_study
from ditplan.registry import direction
from ditplan.rundir import HeldOutRecord, RunDir, SideKind, SideResult
from ditplan.spec import ExperimentSpec
from ditplan.strategies.sparse_network import LAYOUT_FILE

HEADLINE_EXTRAS = ("kid", "kid_low", "class_agreement")  # shown beside the quality metric when measured


@dataclass
class RunData:
    """What a report reads of a run directory: its experiment, trials, greedy plans and held-out record."""

    run: RunDir
    spec: ExperimentSpec
    trials: list[TrialRecord]
    greedy: dict[str, Plan]
    held_out: HeldOutRecord | None


def load_run_data(run_dir: str | Path) -> RunData:
    """The parts of ``run_dir`` a report reads; a folder that is no run, or whose search has not run, is
    refused in one line."""
    run = RunDir(Path(run_dir))
    spec = run.load_experiment()
    study = load_finished_study(spec, run.search)
    if study is None:
        raise UserError(f"{run.root} has no finished search yet; run `ditplan run --experiment ...` first")
    trials = trial_records(study, spec.search, run.search, [o.metric for o in spec.search.objectives])
    return RunData(run, spec, trials, run.greedy.plans(), run.load_held_out())


def quality_metric(spec: ExperimentSpec) -> str:
    """The held-out quality a report leads with: domain FID when the experiment has a feature extractor,
    else its first objective."""
    return "fid" if spec.evaluation.feature_extractor else spec.search.objectives[0].metric


@dataclass(frozen=True)
class SideRow:
    """One side in the headline: its held-out metrics, its search-seed metrics ({} when it has none) and
    whether it meets the experiment's constraints (on the search seeds; a greedy plan that did not
    warm-start the search, on the held-out seeds); ``what``: what its plan does, in words."""

    name: str
    kind: SideKind
    held_out: dict[str, float]
    search: dict[str, float]
    feasible: bool
    what: str = ""

    def value(self, metric: str) -> float:
        return self.held_out.get(metric, math.nan)


@dataclass(frozen=True)
class FigurePoint:
    """One side on the comparison figure: its held-out quality × its held-out latency ratio (interleaved with
    dense); ``group``: its legend entry (its kind; each baseline its own; the run's name first when the figure
    shows several runs)."""

    group: str
    name: str
    kind: SideKind
    quality: float
    latency: float
    what: str


@dataclass(frozen=True)
class Verdict:
    """For a greedy plan or a baseline: the best feasible learned plan at ≤ its held-out latency, and whether
    it dominates (``None``: no learned plan is as fast); ``bands_overlap``: their latency bands overlap."""

    side: str
    quality: float
    latency: float
    best: str | None = None
    best_quality: float = math.nan
    best_latency: float = math.nan
    dominated: bool | None = None
    bands_overlap: bool = False

    @property
    def delta(self) -> float:
        return self.best_quality - self.quality


@dataclass(frozen=True)
class FrontRow:
    """One side's trials at one search fidelity: counts, the feasible front's size and hypervolume, and the
    trials as points (for figures)."""

    label: str
    plans: int
    infeasible: int
    front: int
    hypervolume: float
    points: list[dict]


@dataclass(frozen=True)
class Budget:
    """What one side spent, in transformer sample-forwards and elapsed seconds."""

    side: str
    plans: int
    calibration_forwards: int
    calibration_seconds: float
    evaluation_forwards: int
    evaluation_seconds: float
    calibration_peak_mb: float | None = None  # the largest peak memory of one calibration (None: not recorded)

    @property
    def forwards(self) -> int:
        return self.calibration_forwards + self.evaluation_forwards


@dataclass(frozen=True)
class NetworkCost:
    """The one-off fine-tuning of a SparseDiT network learned plans run on."""

    network: str
    steps: int
    batch: int
    minutes: float | None
    device: str

    @property
    def training_rows(self) -> int:
        return self.steps * self.batch


@dataclass(frozen=True)
class Shift:
    """How one side's rel. L1 to dense changes from the search seeds to the held-out seeds (median over plans)."""

    side: str
    change: float
    plans: int


@dataclass
class RunReport:
    """Everything the report of one run says."""

    name: str
    quality: str
    objectives: list[str]
    reference: list[float]
    held_out: HeldOutRecord | None
    rows: list[SideRow] = field(default_factory=list)
    dominance: list[Verdict] = field(default_factory=list)
    fronts: list[FrontRow] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)
    networks: list[NetworkCost] = field(default_factory=list)
    shifts: list[Shift] = field(default_factory=list)
    feature_extractor: str | None = None
    constraints: list[str] = field(default_factory=list)

    def row(self, name: str) -> SideRow:
        return next(r for r in self.rows if r.name == name)

    def of_kind(self, kind: SideKind) -> list[SideRow]:
        return [r for r in self.rows if r.kind == kind]

    @property
    def feasible_learned(self) -> list[SideRow]:
        """The learned plans measured on the held-out seeds (the feasible front's): none when no plan the
        search found meets the constraints."""
        return [r for r in self.of_kind("learned") if r.feasible]


def figure_points(reports: Sequence[RunReport]) -> list[FigurePoint]:
    """Every side with a held-out quality and latency, of every report, for the comparison figure."""
    points = []
    for report in reports:
        for row in report.rows:
            quality, latency = row.value(report.quality), row.value("latency_ratio")
            if math.isnan(quality) or math.isnan(latency):
                continue
            group = f"baseline {row.name}" if row.kind == "baseline" else row.kind
            group = group if len(reports) == 1 else f"{report.name}: {group}"
            points.append(FigurePoint(group, row.name, row.kind, quality, latency, row.what))
    return points


def _sign(metric: str) -> float:
    return 1.0 if direction(metric) == "minimize" else -1.0


def _side_rows(data: RunData) -> list[SideRow]:
    """Every side of the held-out record, with its search-seed metrics and feasibility."""
    record = data.held_out
    if record is None:
        return []
    by_trial = {t.number: t for t in data.trials}
    greedy_trials = {t.name: t for t in data.trials if t.warm == "greedy"}
    dense = record.dense().metrics

    def row(side: SideResult) -> SideRow:
        trial = by_trial.get(side.trial) if side.kind == "learned" else greedy_trials.get(side.name) if side.kind == "greedy" else None
        if trial is not None:
            return SideRow(side.name, side.kind, dict(side.metrics), trial.metrics, trial.feasible, side.what)
        feasible = side.kind == "dense" or data.spec.search.meets_constraints(side.metrics, dense)
        return SideRow(side.name, side.kind, dict(side.metrics), {}, feasible, side.what)
    return [row(side) for side in record.sides]


def _verdict(quality: str, side: SideRow, learned: list[SideRow]) -> Verdict:
    latency = side.value("latency_ratio")
    head = Verdict(side.name, side.value(quality), latency)
    ok = [c for c in learned if c.value("latency_ratio") <= latency]
    if not ok:
        return head
    best = min(ok, key=lambda c: _sign(quality) * c.value(quality))
    dominated = _sign(quality) * (best.value(quality) - side.value(quality)) <= 0
    overlap = best.held_out.get("latency_ratio_max", 0.0) >= side.held_out.get("latency_ratio_min", math.inf)
    return Verdict(side.name, head.quality, latency, best.name, best.value(quality), best.value("latency_ratio"),
                   dominated, overlap)


def _search_fronts(data: RunData) -> list[FrontRow]:
    """Per side (greedy warm starts, learned) and search fidelity: the trials on the search seeds."""
    spec = data.spec
    objectives = [o.metric for o in spec.search.objectives]
    directions = [o.resolved_direction() for o in spec.search.objectives]
    rows = []
    for label, mine in (("greedy", [t for t in data.trials if t.warm == "greedy"]),
                        ("learned", [t for t in data.trials if t.warm is None])):
        fidelities = sorted({t.samples for t in mine})
        for samples in fidelities:
            at = [t for t in mine if t.samples == samples]
            name = label if len(fidelities) == 1 else f"{label}, {samples} search samples"
            rows.append(_front_row(name, at, objectives, directions, reference_point(spec)))
    return rows


def _front_row(label: str, trials: list[TrialRecord], objectives: list[str], directions: list[str],
               reference: list[float]) -> FrontRow:
    feasible = [t for t in trials if t.feasible]
    values = np.array([[t.metrics[o] for o in objectives] for t in feasible])
    mask = pareto_mask(values, directions) if feasible else []
    on_front = {t.number for t, keep in zip(feasible, mask) if keep}
    points = [{"name": t.name, "on_front": t.number in on_front, **{o: t.metrics[o] for o in objectives}} for t in trials]
    hv = hypervolume(values, directions, reference) if feasible else 0.0
    return FrontRow(label, len(trials), len(trials) - len(feasible), len(on_front), hv, points)


def _calibration(plan: Plan, spec: ExperimentSpec) -> int:
    """Sample-forwards greedy spent calibrating ``plan`` (plans made before they were recorded:
    transformer calls × the calibration batch's rows)."""
    if "sample_forwards" in plan.provenance:
        return int(plan.provenance["sample_forwards"])
    rows = len(plan.provenance["calibration"]["seeds"]) * (2 if spec.sampler.settings().cfg else 1)
    return int(plan.provenance["transformer_forwards"]) * rows


def _elapsed(trials: list[TrialRecord]) -> float:
    """Wall time from the first start to the last completion (trials in parallel count once)."""
    spans = [(t.started, t.completed) for t in trials if t.started and t.completed]
    if not spans:
        return 0.0
    return (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()


def side_budgets(data: RunData) -> list[Budget]:
    """Greedy's calibration (one-off) plus its plans' evaluations on the search seeds, and the learned
    side's proxy plus its trials: in the same unit whatever their batch sizes."""
    spec, settings = data.spec, data.spec.sampler.settings()
    greedy_trials = [t for t in data.trials if t.warm == "greedy"]
    learned = [t for t in data.trials if t.warm is None]
    plans = list(data.greedy.values())
    out = []
    if plans:
        peaks = [float(p.provenance["peak_memory_mb"]) for p in plans if "peak_memory_mb" in p.provenance]
        out.append(Budget("greedy", len(plans), sum(_calibration(p, spec) for p in plans),
                          sum(float(p.provenance.get("search_seconds", 0.0)) for p in plans),
                          sum(sample_forwards(t.samples, settings) for t in greedy_trials), _elapsed(greedy_trials),
                          max(peaks, default=None)))
    if learned:
        proxy = read_proxy(data.run.search.proxy)[0] if data.run.search.proxy.exists() else None
        out.append(Budget("learned", len(learned), proxy.sample_forwards if proxy else 0, proxy.seconds if proxy else 0.0,
                          sum(sample_forwards(t.samples, settings) for t in learned), _elapsed(learned)))
    return out


def network_costs(data: RunData) -> list[NetworkCost]:
    """One-off fine-tuning of every SparseDiT network a learned plan runs on, from its ``sparse_layout.yaml``."""
    used = sorted({w for t in data.trials if t.warm is None
                   for w in [(load_plan(t.plan_path).sparse or {}).get("weights")] if w})
    out = []
    for weights in used:
        folder = Path(weights) if Path(weights).is_absolute() else model_folder(data.spec.model.source or "") / weights
        tuning = yaml.safe_load((folder / LAYOUT_FILE).read_text()).get("fine_tuning", {})
        out.append(NetworkCost(weights, int(tuning.get("steps_done", tuning.get("steps", 0))),
                               int(tuning.get("batch_size", 0)), tuning.get("minutes"), tuning.get("device", "?")))
    return out


def _shifts(rows: list[SideRow]) -> list[Shift]:
    """What the held-out seeds change against the seeds that chose the plans (a plan dense on the search
    seeds, rel. L1 0, has no relative change)."""
    out = []
    for kind in ("greedy", "learned"):
        pairs = [(r.search["rel_l1"], r.held_out["rel_l1"]) for r in rows
                 if r.kind == kind and r.search.get("rel_l1", 0.0) > 0 and "rel_l1" in r.held_out]
        if pairs:
            out.append(Shift(kind, statistics.median(h / s - 1 for s, h in pairs), len(pairs)))
    return out


def _constraint_text(spec: ExperimentSpec) -> list[str]:
    return [f"{c.metric} {'≤' if c.max is not None else '≥'} {c.max if c.max is not None else c.min}"
            + (" relative to dense" if c.relative_to else "") for c in spec.search.constraints]


def build_report(data: RunData) -> RunReport:
    """The report of one run."""
    spec = data.spec
    quality = quality_metric(spec)
    rows = _side_rows(data)
    learned = [r for r in rows if r.kind == "learned" and r.feasible]
    judged = [r for r in rows if r.kind in ("greedy", "baseline")]
    return RunReport(
        name=spec.name, quality=quality, objectives=[o.metric for o in spec.search.objectives],
        reference=reference_point(spec), held_out=data.held_out, rows=rows,
        dominance=[_verdict(quality, r, learned) for r in judged], fronts=_search_fronts(data),
        budgets=side_budgets(data), networks=network_costs(data), shifts=_shifts(rows),
        feature_extractor=spec.evaluation.feature_extractor, constraints=_constraint_text(spec))
