"""Compare studies and export their best plans: ``ditplan compare`` and ``ditplan export``.

A run directory holds ``experiment.yaml`` (a copy of the experiment), the Optuna study (greedy plans
enter it as known trials with ``source = greedy``; learned trials have no source), the plan file of
every trial under ``trials/`` and, after multi-fidelity re-evaluation, the ``<name>-refined`` study.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from ditplan.errors import UserError
from ditplan.plan import Plan, load_plan
from ditplan.search.driver import reference_point, study_storage
from ditplan.search.figures import front_html, front_png
from ditplan.search.pareto import hypervolume, pareto_mask
from ditplan.search.refine import refined_study_name
from ditplan.spec import ExperimentSpec, load_spec


@dataclass
class Candidate:
    """One evaluated plan of a run: its cheap metrics, refined metrics (if any) and where it came from."""

    run: str
    trial: int
    name: str
    source: str  # "greedy" or "search"
    metrics: dict[str, float]
    refined: dict[str, float]
    seconds: float
    plan_path: Path

    def value(self, metric: str) -> float:
        return self.refined.get(metric, self.metrics.get(metric, float("nan")))


def load_run(run_dir: str | Path) -> tuple[ExperimentSpec, list[Candidate]]:
    run_dir = Path(run_dir)
    if not (run_dir / "experiment.yaml").exists():
        raise UserError(f"{run_dir} is not a ditplan run directory (no experiment.yaml); make one with `ditplan run`")
    spec = load_spec(run_dir / "experiment.yaml")
    storage = study_storage(spec, run_dir / "search")
    names = optuna.get_all_study_names(storage)
    if spec.name not in names:
        raise UserError(f"{run_dir} has no finished search yet; run `ditplan run --experiment ...` first")
    refined: dict[int, dict[str, float]] = {}
    if refined_study_name(spec.name) in names:
        for t in optuna.load_study(study_name=refined_study_name(spec.name), storage=storage).get_trials(deepcopy=False):
            refined[t.user_attrs["source_trial"]] = dict(t.user_attrs["metrics"])
    study = optuna.load_study(study_name=spec.name, storage=storage)
    candidates = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        path = run_dir / "search" / "trials" / f"trial-{t.number:04d}.yaml"
        plan = load_plan(path)
        seconds = float(plan.provenance.get("search_seconds", 0.0))
        if t.datetime_start and t.datetime_complete and "source" not in t.user_attrs:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        candidates.append(Candidate(
            run=run_dir.name, trial=t.number, name=t.user_attrs.get("name", f"trial-{t.number}"),
            source=t.user_attrs.get("source", "search"), metrics=dict(plan.provenance.get("metrics", {})),
            refined=refined.get(t.number, {}), seconds=seconds, plan_path=path,
        ))
    return spec, candidates


def _front(cands: list[Candidate], objectives: list[str], directions: list[str]) -> list[Candidate]:
    if not cands:
        return []
    mask = pareto_mask(np.array([[c.metrics[o] for o in objectives] for c in cands]), directions)
    return [c for c, keep in zip(cands, mask) if keep]


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Fronts of greedy and learned plans of every run on one plot with one hypervolume reference, a
    dominance table and what each side spent. Writes ``comparison.md``, ``.png`` and ``.html``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(r) for r in run_dirs]
    spec = runs[0][0]
    objectives = [o.metric for o in spec.search.objectives]
    directions = [o.resolved_direction() for o in spec.search.objectives]
    for other, _ in runs[1:]:
        if [o.metric for o in other.search.objectives] != objectives:
            raise UserError(f"runs {spec.name} and {other.name} optimise different objectives; compare like with like")
    ref = reference_point(spec)
    groups: dict[str, list[dict[str, Any]]] = {}
    lines = [f"# Greedy vs learned plans ({', '.join(s.name for s, _ in runs)})", "",
             f"Objectives: {objectives[0]} ({directions[0]}) × {objectives[1]} ({directions[1]}); "
             f"hypervolume reference point {ref}.", "",
             "| run | side | plans | front | hypervolume | full evaluations | transformer forwards | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    settings = spec.sampler.settings()
    for run_spec, cands in runs:
        for side in ("greedy", "search"):
            mine = [c for c in cands if c.source == side]
            if not mine:
                continue
            front = _front(mine, objectives, directions)
            hv = hypervolume(np.array([[c.metrics[o] for o in objectives] for c in mine]), directions, ref)
            samples = run_spec.search.samples
            batches = -(-samples // run_spec.sampler.batch_size)
            if side == "greedy":
                forwards = sum(int(load_plan(c.plan_path).provenance.get("transformer_forwards", 0)) for c in mine)
                forwards += len(mine) * settings.num_steps * batches  # their evaluations
            else:
                forwards = len(mine) * settings.num_steps * batches
            label = f"{run_spec.name} {'greedy' if side == 'greedy' else 'learned'}"
            lines.append(f"| {run_spec.name} | {label.split()[-1]} | {len(mine)} | {len(front)} | {hv:.4f} | {len(mine)} | "
                         f"{forwards} | {sum(c.seconds for c in mine):.0f} |")
            front_ids = {id(c) for c in front}
            groups[label] = [{"name": c.name, "on_front": id(c) in front_ids, **{o: c.metrics[o] for o in objectives}}
                             for c in mine]
    cost = next((m for m in ("latency_ratio", "flops_ratio") if any(m in c.refined or m in c.metrics for _, cs in runs for c in cs)), objectives[1])
    quality = objectives[0]
    lines += ["", f"For each greedy plan, the best learned plan at ≤ its {cost} (refined metrics where measured):", "",
              f"| greedy | {quality} | {cost} | best learned | {quality} | {cost} | Δ {quality} |", "|---|---|---|---|---|---|---|"]
    for _, cands in runs:
        learned = [c for c in cands if c.source == "search"]
        for g in sorted((c for c in cands if c.source == "greedy"), key=lambda c: c.name):
            ok = [c for c in learned if c.value(cost) <= g.value(cost)]
            if ok:
                best = min(ok, key=lambda c: c.value(quality))
                lines.append(f"| {g.name} | {g.value(quality):.4g} | {g.value(cost):.3g} | {best.name} | "
                             f"{best.value(quality):.4g} | {best.value(cost):.3g} | {best.value(quality) - g.value(quality):+.4g} |")
            else:
                lines.append(f"| {g.name} | {g.value(quality):.4g} | {g.value(cost):.3g} | none at ≤ this cost | | | |")
    png, html = front_png(groups, objectives), front_html(groups, objectives)
    png.savefig(out / "comparison.png", dpi=120)
    html.write_html(str(out / "comparison.html"))
    lines += ["", "![fronts](comparison.png)", ""]
    report = out / "comparison.md"
    report.write_text("\n".join(lines))
    for (run_spec, _), run_dir in zip(runs, run_dirs):
        _log_report(run_spec, Path(run_dir), [report, out / "comparison.png", out / "comparison.html"])
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


def select_plans(spec: ExperimentSpec, candidates: list[Candidate], rule: str) -> list[Candidate]:
    """Rules: ``fastest:METRIC<=X`` (lowest cost with quality metric within X), ``best:COST<=X``
    (best quality within a cost), ``knee`` (front point closest to the ideal corner), ``top:K``
    (K front plans of best quality)."""
    match = _RULE.match(rule.replace(" ", ""))
    if not match:
        raise UserError(f"unknown selection rule {rule!r}; use fastest:rel_l1<=0.05, best:latency_ratio<=0.8, knee or top:3")
    objectives = [o.metric for o in spec.search.objectives]
    directions = [o.resolved_direction() for o in spec.search.objectives]
    quality, cost = objectives[0], objectives[1]
    cost = "latency_ratio" if any("latency_ratio" in c.refined for c in candidates) else cost
    front = _front(candidates, objectives, directions)
    sign = 1.0 if directions[0] == "minimize" else -1.0
    if rule == "knee":
        values = np.array([[c.metrics[o] for o in objectives] for c in front])
        lo, hi = values.min(0), values.max(0)
        scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
        scaled = np.where(np.array(directions) == "minimize", scaled, 1 - scaled)
        return [front[int(np.argmin(np.linalg.norm(scaled, axis=1)))]]
    if match.group(5):
        return sorted(front, key=lambda c: sign * c.value(quality))[: int(match.group(5))]
    kind, metric, op, bound = match.group(1), match.group(2), match.group(3), float(match.group(4))
    within = [c for c in candidates if (c.value(metric) <= bound if op == "<=" else c.value(metric) >= bound)]
    if not within:
        raise UserError(f"no plan has {metric} {op} {bound}; loosen the bound (see the run's pareto_front.md)")
    if kind == "fastest":
        return [min(within, key=lambda c: c.value(cost))]
    return [min(within, key=lambda c: sign * c.value(quality))]


def export_plans(run_dir: str | Path, rule: str, out: str | Path) -> list[Path]:
    spec, candidates = load_run(run_dir)
    paths = []
    for c in select_plans(spec, candidates, rule):
        plan: Plan = load_plan(c.plan_path)
        plan = plan.with_provenance(selected_by=rule, refined_metrics=c.refined or None, run=str(Path(run_dir).resolve()))
        paths.append(plan.save(Path(out) / f"{spec.name}-{c.name}.yaml"))
    return paths
