"""Compare studies and export their best plans: ``ditplan compare`` and ``ditplan export``.

A run directory holds ``experiment.yaml`` (a copy of the experiment), the Optuna study (greedy plans
enter it as known trials with ``source = greedy``; learned trials have no source), the plan file of
every trial under ``trials/`` and, after the held-out evaluation, the ``<name>-refined`` study.

Every figure the report states for a plan, and every export rule, reads the held-out metrics; the
search-seed metrics (what chose the plans) are shown beside them, never instead. Infeasible trials
(a constraint broken on the search seeds) are listed but are on no front, in no hypervolume and never
exported. Budgets are in transformer sample-forwards (rows × steps, CFG counted) and elapsed time.
"""

from __future__ import annotations

import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

import yaml

from ditplan.atomic import atomic_write, atomic_write_text
from ditplan.errors import UserError
from ditplan.evaluators.base import METRIC_DIRECTIONS
from ditplan.evaluators.cost import FLOPS_COUNT, sample_forwards
from ditplan.evaluators.held_out import DENSE
from ditplan.models.adapters import LAYOUT_FILE, model_folder
from ditplan.plan import Plan, load_plan
from ditplan.search.baselines import load_baselines
from ditplan.search.driver import REPEAT, is_feasible_trial, reference_point, study_storage
from ditplan.search.storage import JOURNAL_FILE
from ditplan.search.figures import front_html, front_png
from ditplan.search.pareto import hypervolume, pareto_mask
from ditplan.search.proxy import PROXY_FILE, read_proxy
from ditplan.search.refine import refined_study_name
from ditplan.spec import ExperimentSpec, load_spec


@dataclass
class Candidate:
    """One evaluated plan of a run: its search-seed metrics (what chose it), held-out metrics (when
    measured), whether it met the experiment's constraints, and where it came from."""

    run: str
    trial: int
    name: str
    source: str  # "greedy" or "search"
    metrics: dict[str, float]  # on the search seeds
    held_out: dict[str, float]  # on the held-out seeds; empty when not measured
    feasible: bool
    started: datetime | None
    completed: datetime | None
    plan_path: Path
    samples: int | None = None  # the search samples ``metrics`` are on (None: the experiment's search.samples)

    def search_samples(self, spec: ExperimentSpec) -> int:
        """The search samples ``metrics`` are on: its own fidelity, or the experiment's."""
        return self.samples or spec.search.samples

    def value(self, metric: str) -> float:
        """The held-out value of ``metric`` (NaN when not measured on held-out seeds)."""
        return self.held_out.get(metric, float("nan"))


@dataclass
class Run:
    """A loaded run directory: its experiment, candidates and held-out evaluation (dense's metrics,
    the seed set and what it spent), and the held-out metrics of its baselines (by name)."""

    spec: ExperimentSpec
    candidates: list[Candidate]
    dense: dict[str, float] = field(default_factory=dict)
    held_out: dict[str, int] = field(default_factory=dict)
    held_out_spent: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)


def _plan_path(run_dir: Path, number: int) -> Path:
    return run_dir / "search" / "trials" / f"trial-{number:04d}.yaml"


def _candidate(run_dir: Path, trial: FrozenTrial, held_out: dict[int, dict[str, float]]) -> Candidate:
    path = _plan_path(run_dir, trial.number)
    provenance = load_plan(path).provenance
    return Candidate(
        run=run_dir.name, trial=trial.number, name=trial.user_attrs.get("name", f"trial-{trial.number}"),
        source=trial.user_attrs.get("source", "search"), metrics=dict(provenance.get("metrics", {})),
        held_out=held_out.get(trial.number, {}), feasible=is_feasible_trial(trial),
        started=trial.datetime_start, completed=trial.datetime_complete, plan_path=path,
        samples=provenance.get("evaluated_on", {}).get("samples"),
    )


def load_run_data(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "experiment.yaml").exists():
        raise UserError(f"{run_dir} is not a ditplan run directory (no experiment.yaml); make one with `ditplan run`")
    spec = load_spec(run_dir / "experiment.yaml")
    if not spec.search.storage and not (run_dir / "search" / JOURNAL_FILE).exists():
        raise UserError(f"{run_dir} has no finished search yet; run `ditplan run --experiment ...` first")
    storage = study_storage(spec, run_dir / "search")  # NOTE: opening a journal creates it: checked above
    names = optuna.get_all_study_names(storage)
    if spec.name not in names:
        raise UserError(f"{run_dir} has no finished search yet; run `ditplan run --experiment ...` first")
    held_out: dict[int, dict[str, float]] = {}
    run = Run(spec, [])
    if refined_study_name(spec.name) in names:
        refined = optuna.load_study(study_name=refined_study_name(spec.name), storage=storage)
        for t in refined.get_trials(deepcopy=False):
            held_out[t.user_attrs["source_trial"]] = dict(t.user_attrs["metrics"])
        run.dense = dict(refined.user_attrs.get(DENSE, {}))
        run.held_out = dict(refined.user_attrs.get("held_out", {}))
        run.held_out_spent = dict(refined.user_attrs.get("spent", {}))
    study = optuna.load_study(study_name=spec.name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    missing = [t.number for t in complete if not _plan_path(run_dir, t.number).exists()]
    if missing:
        warnings.warn(f"{run_dir}: {len(missing)} complete trials have no plan file here (trial {missing[0]}, …), left "
                      "out; resume the run (or its search) to write them")
    run.candidates = [_candidate(run_dir, t, held_out) for t in complete if t.number not in missing and REPEAT not in t.user_attrs]
    run.baselines = {name: values for name, values in load_baselines(run_dir).items() if name != DENSE}
    return run


def load_run(run_dir: str | Path) -> tuple[ExperimentSpec, list[Candidate]]:
    run = load_run_data(run_dir)
    return run.spec, run.candidates


def _objectives(spec: ExperimentSpec) -> tuple[list[str], list[str]]:
    return [o.metric for o in spec.search.objectives], [o.resolved_direction() for o in spec.search.objectives]


def quality_metric(spec: ExperimentSpec) -> str:
    """The held-out quality a report leads with: domain FID when the experiment has a feature
    extractor, else its first objective."""
    return "fid" if spec.evaluation.feature_extractor else spec.search.objectives[0].metric


def _front(cands: list[Candidate], metrics: list[str], directions: list[str], held_out: bool = False) -> list[Candidate]:
    """The Pareto front of the feasible ``cands`` on their search-seed (or held-out) ``metrics``."""
    feasible = [c for c in cands if c.feasible]
    if not feasible:
        return []
    values = np.array([[c.value(m) if held_out else c.metrics[m] for m in metrics] for c in feasible])
    mask = pareto_mask(values, directions)
    return [c for c, keep in zip(feasible, mask) if keep]


def _elapsed(cands: list[Candidate]) -> float:
    """Wall time from the first start to the last completion (trials in parallel count once)."""
    spans = [(c.started, c.completed) for c in cands if c.started and c.completed]
    if not spans:
        return 0.0
    return (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()


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


def _calibration_plan(c: Candidate) -> Plan:
    """The plan file greedy wrote (``<run>/greedy/greedy-Dk.yaml``, with its calibration record); an
    enqueued greedy trial's own file holds the plan as the search space expressed it."""
    written = c.plan_path.parent.parent.parent / "greedy" / f"greedy-{c.name}.yaml"
    return load_plan(written if written.exists() else c.plan_path)


def _calibration(plan: Plan, spec: ExperimentSpec) -> int:
    """Sample-forwards greedy spent calibrating ``plan`` (plans made before they were recorded:
    transformer calls × the calibration batch's rows)."""
    if "sample_forwards" in plan.provenance:
        return int(plan.provenance["sample_forwards"])
    rows = len(plan.provenance["calibration"]["seeds"]) * (2 if spec.sampler.settings().cfg else 1)
    return int(plan.provenance["transformer_forwards"]) * rows


def side_budget(spec: ExperimentSpec, side: str, cands: list[Candidate]) -> Budget:
    """A side's search budget: greedy's calibration (one-off) plus the evaluation of every plan on the
    search seeds, in the same unit for both sides whatever their batch sizes."""
    mine = [c for c in cands if c.source == side]
    plans = [_calibration_plan(c) for c in mine] if side == "greedy" else []
    settings = spec.sampler.settings()
    proxies = {c.plan_path.parent.parent / PROXY_FILE for c in mine} if side != "greedy" else set()
    proxies = [read_proxy(path)[0] for path in proxies if path.exists()]  # the learned side's calibration
    return Budget(
        side="greedy" if side == "greedy" else "learned", plans=len(mine),
        calibration_forwards=sum(_calibration(p, spec) for p in plans) + sum(x.sample_forwards for x in proxies),
        calibration_seconds=sum(float(p.provenance.get("search_seconds", 0.0)) for p in plans)
        + sum(x.seconds for x in proxies),
        evaluation_forwards=sum(sample_forwards(c.search_samples(spec), settings) for c in mine),
        evaluation_seconds=_elapsed(mine),
        calibration_peak_mb=max((float(p.provenance["peak_memory_mb"]) for p in plans if "peak_memory_mb" in p.provenance),
                                default=None),
    )


def network_costs(spec: ExperimentSpec, cands: list[Candidate]) -> list[dict[str, object]]:
    """One-off fine-tuning of every SparseDiT network a learned plan runs on, from its ``sparse_layout.yaml``."""
    used = sorted({w for c in cands if c.source == "search" for w in [(load_plan(c.plan_path).sparse or {}).get("weights")] if w})
    rows = []
    for weights in used:
        folder = Path(weights) if Path(weights).is_absolute() else model_folder(spec.model.source or "") / weights
        tuning = yaml.safe_load((folder / LAYOUT_FILE).read_text()).get("fine_tuning", {})
        steps, batch = int(tuning.get("steps_done", tuning.get("steps", 0))), int(tuning.get("batch_size", 0))
        rows.append({"network": weights, "steps": steps, "batch": batch, "training_rows": steps * batch,
                     "minutes": tuning.get("minutes"), "device": tuning.get("device", "?")})
    return rows


def _budget_lines(run: Run) -> list[str]:
    spec, cands = run.spec, run.candidates
    lines = ["## Budgets (transformer sample-forwards = rows × steps, CFG counted; wall time elapsed)", "",
             "| side | plans | one-off: calibration (sample-forwards, s, largest peak memory) | "
             "search-seed evaluations (sample-forwards) | total sample-forwards | evaluation wall time (s, elapsed) |",
             "|---|---|---|---|---|---|"]
    for side in ("greedy", "search"):
        b = side_budget(spec, side, cands)
        if b.plans:
            peak = f", peak {b.calibration_peak_mb:g} MiB" if b.calibration_peak_mb is not None else ""
            lines.append(f"| {b.side} | {b.plans} | {b.calibration_forwards:,} ({b.calibration_seconds:.0f} s{peak}) | "
                         f"{b.evaluation_forwards:,} | {b.forwards:,} | {b.evaluation_seconds:.0f} |")
    spent = run.held_out_spent
    if spent:
        lines.append(f"| held-out evaluation (dense + every reported plan) | | | | {int(spent['sample_forwards']):,} | "
                     f"{spent['seconds']:.0f} |")
    networks = network_costs(spec, cands)
    if networks:
        lines += ["", "One-off fine-tuning of the SparseDiT networks learned plans run on (made once, shared by every "
                  "search; training rows = steps × batch, each a forward and a backward pass):", "",
                  "| network | steps | batch | training rows | minutes | device |", "|---|---|---|---|---|---|"]
        lines += [f"| {n['network']} | {n['steps']:,} | {n['batch']} | {n['training_rows']:,} | {n['minutes']} | "
                  f"{n['device']} |" for n in networks]
    return lines


def _fmt(value: float, digits: str = ".4g") -> str:
    return "" if value != value else format(value, digits)


def _latency(c_values: dict[str, float]) -> str:
    if "latency_ratio" not in c_values:
        return ""
    return f"{c_values['latency_ratio']:.3f} ({c_values['latency_ratio_min']:.2f}–{c_values['latency_ratio_max']:.2f})"


def _headline_lines(run: Run) -> list[str]:
    """Held-out quality × latency of dense and of every measured plan, with the search-seed rel. L1 beside."""
    quality = quality_metric(run.spec)
    held_columns = list(dict.fromkeys([quality, *(m for m in ("kid", "kid_low", "class_agreement") if m in run.dense),
                                       "rel_l1"]))
    measured = sorted((c for c in run.candidates if c.held_out), key=lambda c: (c.source != "greedy", c.value("latency_ratio")))
    samples, first = run.held_out.get("samples", 0), run.held_out.get("first_seed", "?")
    lines = [f"## Held-out {quality} × latency ({samples} held-out samples, seeds {first}…; latency ratio to dense: "
             "median over rounds interleaved with dense in one process, min–max band)", "",
             "| plan | side | " + " | ".join(f"{m} (held-out)" for m in held_columns) + " | rel_l1 (search seeds) | "
             "latency ratio (band) | FLOPs ratio (executed) | ideal |", "|---|---|" + "---|" * len(held_columns) + "---|---|---|---|"]
    rows = [("dense", "", run.dense, {})] + [(c.name, "greedy" if c.source == "greedy" else "learned", c.held_out, c.metrics)
                                             for c in measured]
    rows += [(name, "baseline", values, {}) for name, values in run.baselines.items()]
    for name, side, held, search in rows:
        lines.append(f"| {name} | {side} | " + " | ".join(_fmt(held.get(m, float("nan"))) for m in held_columns)
                     + f" | {_fmt(search.get('rel_l1', float('nan')))} | {_latency(held)} | "
                     f"{_fmt(held.get('flops_ratio', float('nan')), '.3f')} | "
                     f"{_fmt(held.get('ideal_flops_ratio', float('nan')), '.3f')} |")
    return lines + ["", FLOPS_SENTENCE, "", _fid_sentence(run.spec, samples), "", _shift_sentence(measured)]


FLOPS_SENTENCE = ("FLOPs ratio (here, in objectives and in plan files: `flops_ratio`) counts window attention as its "
                  "kernel executes it (the masked `band` window computes its query blocks' whole key spans); `ideal` "
                  "(`ideal_flops_ratio`) counts the ideal band. For `blocks` and `tiles` windows the two are equal.")


def _fid_sentence(spec: ExperimentSpec, samples: int) -> str:
    """How many samples the held-out FID rests on, and what that count allows."""
    from ditplan.evaluators.distribution import FID_FEATURE_DIMS

    extractor = spec.evaluation.feature_extractor
    dims = FID_FEATURE_DIMS.get(extractor or "")
    if dims is None:
        return ""
    enough = ("enough for a full-rank covariance" if samples > dims else
              "too few for a full-rank covariance: FID is biased upward, so compare plans with dense's FID at the "
              "same count, and read KID (unbiased at any count) beside it")
    return (f"FID and KID use {samples} held-out samples against the reference on the {dims}-d features of "
            f"{extractor}: {enough}. kid_low is KID on the extractor's low-level layer (strokes and texture).")


def _shift_sentence(measured: list[Candidate]) -> str:
    """What the held-out seeds change against the seeds that chose the plans (measured, both; a plan
    that is dense on the search seeds — rel. L1 0, e.g. the first proxy proposal — has no relative change)."""
    parts = []
    for side, label in (("greedy", "greedy"), ("search", "learned")):
        pairs = [(c.metrics["rel_l1"], c.held_out["rel_l1"]) for c in measured
                 if c.source == side and c.metrics.get("rel_l1", 0.0) > 0 and "rel_l1" in c.held_out]
        if pairs:
            change = statistics.median(h / s - 1 for s, h in pairs)
            parts.append(f"{label} plans' rel. L1 to dense changes by a median {change:+.1%} from the search seeds "
                         f"to the held-out seeds ({len(pairs)} plans not dense on the search seeds)")
    return ("Held-out vs selection seeds: " + "; ".join(parts) + ".") if parts else ""


def _dominance_lines(run: Run) -> list[str]:
    """For every greedy plan and every baseline, the best feasible learned plan at ≤ its held-out
    latency, and whether it dominates. Baselines are measured in their own interleaved rounds
    (``ditplan.search.baselines``): their latency ratios are to the dense run beside them."""
    quality = quality_metric(run.spec)
    sign = 1.0 if METRIC_DIRECTIONS.get(quality, "minimize") == "minimize" else -1.0
    learned = [c for c in run.candidates if c.source == "search" and c.feasible and c.held_out]
    title = "every greedy plan and baseline" if run.baselines else "every greedy plan"
    lines = [f"## Dominance on held-out seeds: for {title}, the best learned plan at ≤ its latency", "",
             f"| {'greedy / baseline' if run.baselines else 'greedy'} | {quality} | latency | best learned at ≤ its "
             f"latency | {quality} | latency | Δ {quality} | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    greedy = sorted((c for c in run.candidates if c.source == "greedy" and c.held_out), key=lambda c: c.name)
    for name, values in [(g.name, g.held_out) for g in greedy] + list(run.baselines.items()):
        latency = values.get("latency_ratio", math.nan)
        ok = [c for c in learned if c.value("latency_ratio") <= latency]
        head = f"| {name} | {_fmt(values.get(quality, math.nan))} | {_fmt(latency, '.3f')} |"
        if not ok:
            lines.append(head + " none | | | | no learned plan is as fast |")
            continue
        best = min(ok, key=lambda c: sign * c.value(quality))
        delta = best.value(quality) - values.get(quality, math.nan)
        verdict = "dominated" if sign * delta <= 0 else "**no learned plan dominates**"
        if best.held_out.get("latency_ratio_max", 0.0) >= values.get("latency_ratio_min", math.inf):
            verdict += " (latency bands overlap: not faster beyond noise)"
        lines.append(head + f" {best.name} | {_fmt(best.value(quality))} | {_fmt(best.value('latency_ratio'), '.3f')} | "
                     f"{delta:+.4g} | {verdict} |")
    return lines


def _search_seed_lines(run: Run, groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The fronts on the search seeds (what chose the plans): hypervolume of the feasible trials, one row per
    side and fidelity (with ``search.screening``: the screened trials, then the promoted ones)."""
    spec, cands = run.spec, run.candidates
    objectives, _ = _objectives(spec)
    lines = [f"## Search seeds (what chose the plans): {objectives[0]} × {objectives[1]}, feasible trials only, "
             f"hypervolume reference {reference_point(spec)}", "", "| side | plans | infeasible | front | hypervolume |",
             "|---|---|---|---|---|"]
    for side, name in (("greedy", "greedy"), ("search", "learned")):
        fidelities = sorted({c.search_samples(spec) for c in cands if c.source == side})
        for samples in fidelities:
            label = name if len(fidelities) == 1 else f"{name}, {samples} search samples"
            mine = [c for c in cands if c.source == side and c.search_samples(spec) == samples]
            lines.append(_search_seed_row(spec, label, mine, groups))
    return lines


def _search_seed_row(spec: ExperimentSpec, label: str, mine: list[Candidate], groups: dict[str, list[dict[str, Any]]]) -> str:
    """One side's row at one fidelity; its points join ``groups`` (the figure)."""
    objectives, directions = _objectives(spec)
    front = _front(mine, objectives, directions)
    feasible = [c for c in mine if c.feasible]
    values = np.array([[c.metrics[o] for o in objectives] for c in feasible])
    hv = hypervolume(values, directions, reference_point(spec)) if feasible else 0.0
    on_front = {id(c) for c in front}
    groups[f"{spec.name} {label}"] = [{"name": c.name, "on_front": id(c) in on_front,
                                       **{o: c.metrics[o] for o in objectives}} for c in mine]
    return f"| {label} | {len(mine)} | {len(mine) - len(feasible)} | {len(front)} | {hv:.4f} |"


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Greedy vs learned plans of every run: held-out quality × latency (the headline), the dominance
    table, the search-seed fronts beside, and the budgets. Writes ``comparison.md``, ``.png`` and ``.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run_data(r) for r in run_dirs]
    objectives, _ = _objectives(runs[0].spec)
    for other in runs[1:]:
        if _objectives(other.spec)[0] != objectives:
            raise UserError(f"runs {runs[0].spec.name} and {other.spec.name} optimise different objectives; compare like with like")
    lines = [f"# Greedy vs learned plans ({', '.join(r.spec.name for r in runs)})", ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if len(runs) > 1:
            lines += [f"# {run.spec.name}", ""]
        if run.held_out:
            lines += _headline_lines(run) + [""] + _dominance_lines(run) + [""]
        else:
            lines += ["No held-out evaluation in this run (search.refine is off): nothing below is measured on "
                      "seeds the search did not see.", ""]
        lines += _search_seed_lines(run, groups) + [""] + _budget_lines(run) + [""]
    png, html = front_png(groups, objectives), front_html(groups, objectives)
    atomic_write(out / "comparison.png", lambda tmp: png.savefig(tmp, dpi=120, format="png"))
    atomic_write(out / "comparison.html", lambda tmp: html.write_html(str(tmp)))
    lines += ["![search-seed fronts](comparison.png)", ""]
    report = atomic_write_text(out / "comparison.md", "\n".join(lines))
    for run, run_dir in zip(runs, run_dirs):
        _log_report(run.spec, Path(run_dir), [report, out / "comparison.png", out / "comparison.html"])
    return report


def _log_report(spec: ExperimentSpec, run_dir: Path, files: list[Path]) -> None:
    """Attach the report to the study's parent run in MLflow (driver-side, like all tracking)."""
    from mlflow.tracking import MlflowClient

    from ditplan.search.tracking import STUDY_TAG, default_tracking_uri

    client = MlflowClient(spec.search.tracking_uri or default_tracking_uri(run_dir / "search"))
    experiment = client.get_experiment_by_name("ditplan")
    if experiment is None:
        return
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{spec.name}'")
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags:
            for path in files:
                client.log_artifact(run.info.run_id, str(path), artifact_path="comparison")


_RULE = re.compile(r"^(fastest|best):(\w+)(<=|>=)([0-9.eE+-]+)$|^knee$|^top:(\d+)$")


def _measured(candidates: list[Candidate], metrics: tuple[str, ...], rule: str) -> list[Candidate]:
    """The feasible candidates with held-out values of ``metrics``; the others are left out with a note."""
    feasible = [c for c in candidates if c.feasible]
    kept = [c for c in feasible if all(m in c.held_out for m in metrics)]
    if len(kept) < len(feasible):
        warnings.warn(f"{rule}: {len(feasible) - len(kept)} feasible plans were not measured on the held-out seeds "
                      f"({', '.join(metrics)}) and are left out", stacklevel=3)
    return kept


def select_plans(spec: ExperimentSpec, candidates: list[Candidate], rule: str) -> list[Candidate]:
    """Rules, on held-out metrics of feasible plans: ``fastest:METRIC<=X`` (lowest latency with
    METRIC within X), ``best:COST<=X`` (best quality within a cost), ``knee`` (held-out front point
    closest to the ideal corner), ``top:K`` (K held-out front plans of best quality). Quality is the
    experiment's :func:`quality_metric`; plans without the held-out values a rule reads are left out
    with a warning, never ranked as NaN."""
    match = _RULE.match(rule.replace(" ", ""))
    if not match:
        raise UserError(f"unknown selection rule {rule!r}; use fastest:rel_l1<=0.05, best:latency_ratio<=0.8, knee or top:3")
    quality, cost = quality_metric(spec), "latency_ratio"
    if not any(c.held_out for c in candidates):
        raise UserError("no plan of this run was measured on the held-out seeds; export rules read held-out "
                        "metrics: run it with search.refine set (or resume it, if it was interrupted before that stage)")
    sign = 1.0 if METRIC_DIRECTIONS.get(quality, "minimize") == "minimize" else -1.0
    directions = [METRIC_DIRECTIONS.get(quality, "minimize"), "minimize"]
    if rule == "knee" or match.group(5):
        front = _front(_measured(candidates, (quality, cost), rule), [quality, cost], directions, held_out=True)
        if match.group(5):
            return sorted(front, key=lambda c: sign * c.value(quality))[: int(match.group(5))]
        values = np.array([[c.value(quality), c.value(cost)] for c in front])
        lo, hi = values.min(0), values.max(0)
        scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
        scaled = np.where(np.array(directions) == "minimize", scaled, 1 - scaled)
        return [front[int(np.argmin(np.linalg.norm(scaled, axis=1)))]]
    kind, metric, op, bound = match.group(1), match.group(2), match.group(3), float(match.group(4))
    ranked_by = cost if kind == "fastest" else quality
    pool = _measured(candidates, tuple(dict.fromkeys((metric, ranked_by))), rule)
    within = [c for c in pool if (c.value(metric) <= bound if op == "<=" else c.value(metric) >= bound)]
    if not within:
        raise UserError(f"no plan has held-out {metric} {op} {bound}; loosen the bound (see the run's report/comparison.md)")
    if kind == "fastest":
        return [min(within, key=lambda c: c.value(cost))]
    return [min(within, key=lambda c: sign * c.value(quality))]


def safe_file_name(stem: str, suffix: str) -> str:
    """``stem + suffix`` as one file name that stays inside its folder: only letters, digits, ``.``, ``_``
    and ``-`` (others become ``_``), no leading dot (``../../x`` becomes ``_.._x``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    return f"{name[:200] or 'plan'}{suffix}"


def export_plans(run_dir: str | Path, rule: str, out: str | Path) -> list[Path]:
    run = load_run_data(run_dir)
    paths = []
    for c in select_plans(run.spec, run.candidates, rule):
        plan: Plan = load_plan(c.plan_path)
        plan = plan.with_provenance(selected_by=rule, held_out_metrics=c.held_out, held_out=run.held_out,
                                    flops_count=FLOPS_COUNT, run=str(Path(run_dir).resolve()))
        paths.append(plan.save(Path(out) / safe_file_name(f"{run.spec.name}-{c.name}", ".yaml")))
    return paths
