"""Export rules: which plans of a run ``ditplan export`` (and the last stage of ``ditplan run``) writes.

Rules read the held-out record only, among the plans that meet the experiment's constraints (greedy
and learned; dense and baselines are no plan of this run's): ``fastest:METRIC<=X`` (lowest latency with
METRIC within X), ``best:COST<=X`` (best quality within a cost), ``knee`` (the held-out front point closest
to the ideal corner), ``top:K`` (K held-out front plans of best quality).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ditplan.comparison.report import (
    RunData,
    RunReport,
    SideRow,
    build_report,
    load_run_data,
)
from ditplan.errors import UserError
from ditplan.evaluators.cost import FLOPS_COUNT
from ditplan.plan import Plan, load_plan
from ditplan.plansearch.pareto import pareto_mask
from ditplan.registry import direction
from ditplan.rundir import SideResult

_RULE = re.compile(r"^(fastest|best):(\w+)(<=|>=)([0-9.eE+-]+)$|^knee$|^top:(\d+)$")
RULE_HELP = "fastest:rel_l1<=0.05 | best:latency_ratio<=0.8 | knee | top:3"
COST = "latency_ratio"


def _measured(candidates: list[SideRow], metrics: tuple[str, ...], rule: str) -> list[SideRow]:
    """The candidates with held-out values of ``metrics``; the others are left out with a note."""
    kept = [c for c in candidates if all(m in c.held_out for m in metrics)]
    if len(kept) < len(candidates):
        warnings.warn(f"{rule}: {len(candidates) - len(kept)} feasible plans have no held-out {', '.join(metrics)} "
                      "and are left out", stacklevel=3)
    return kept


def _front(rows: list[SideRow], quality: str) -> list[SideRow]:
    values = np.array([[r.value(quality), r.value(COST)] for r in rows])
    return [r for r, keep in zip(rows, pareto_mask(values, [direction(quality), "minimize"])) if keep]


def _knee(front: list[SideRow], quality: str) -> SideRow:
    """The front point closest to the ideal corner, both axes scaled to the front's range."""
    values = np.array([[r.value(quality), r.value(COST)] for r in front])
    lo, hi = values.min(0), values.max(0)
    scaled = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    scaled = np.where(np.array([direction(quality), "minimize"]) == "minimize", scaled, 1 - scaled)
    return front[int(np.argmin(np.linalg.norm(scaled, axis=1)))]


def _candidates(report: RunReport) -> list[SideRow]:
    """The plans a rule may select; none is a one-line error saying why."""
    if report.held_out is None:
        raise UserError("no plan of this run was measured on the held-out seeds; export rules read held-out "
                        "metrics: run it with search.refine set (or resume it, if it was interrupted before that stage)")
    feasible = [r for r in report.rows if r.kind in ("greedy", "learned") and r.feasible]
    if not feasible:
        raise UserError(f"no feasible plan: none meets the constraints ({', '.join(report.constraints)}); loosen "
                        "search.constraints, widen the search space or give the search more trials")
    return feasible


def select_plans(report: RunReport, rule: str) -> list[SideRow]:
    """The plans ``rule`` selects (see the module's docstring); quality is the report's quality metric."""
    match = _RULE.match(rule.replace(" ", ""))
    if not match:
        raise UserError(f"unknown selection rule {rule!r}; use {RULE_HELP}")
    quality, candidates = report.quality, _candidates(report)
    sign = 1.0 if direction(quality) == "minimize" else -1.0
    if rule == "knee" or match.group(5):
        front = _front(_measured(candidates, (quality, COST), rule), quality)
        if not front:
            raise UserError(f"{rule}: no feasible plan has held-out {quality} and {COST}")
        if match.group(5):
            return sorted(front, key=lambda r: sign * r.value(quality))[: int(match.group(5))]
        return [_knee(front, quality)]
    kind, metric, op, bound = match.group(1), match.group(2), match.group(3), float(match.group(4))
    ranked_by = COST if kind == "fastest" else quality
    pool = _measured(candidates, tuple(dict.fromkeys((metric, ranked_by))), rule)
    within = [r for r in pool if (r.value(metric) <= bound if op == "<=" else r.value(metric) >= bound)]
    if not within:
        raise UserError(f"no plan has held-out {metric} {op} {bound}; loosen the bound (see the run's report/comparison.md)")
    return [min(within, key=lambda r: r.value(COST) if kind == "fastest" else sign * r.value(quality))]


def safe_file_name(stem: str, suffix: str) -> str:
    """``stem + suffix`` as one file name that stays inside its folder: only letters, digits, ``.``, ``_``
    and ``-`` (others become ``_``), no leading dot (``../../x`` becomes ``_.._x``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    return f"{name[:200] or 'plan'}{suffix}"


def _side_plan(data: RunData, side: SideResult) -> Plan:
    """The plan file of ``side``; a greedy plan that warm-started the search gets its search-seed record too."""
    plan = load_plan(data.run.resolve(side.plan))  # type: ignore[arg-type]
    trial = next((t for t in data.trials if side.kind == "greedy" and t.warm == "greedy" and t.name == side.name), None)
    if trial is None:
        return plan
    scored = load_plan(trial.plan_path).provenance
    return plan.with_provenance(metrics=scored["metrics"], evaluated_on=scored["evaluated_on"])


def export_selected(data: RunData, report: RunReport, rule: str, out: Path) -> list[Path]:
    """Write the plans ``rule`` selects to ``out``, each with its held-out metrics in its provenance."""
    selected = select_plans(report, rule)  # refuses a run without a held-out record, in one line
    record = report.held_out
    assert record is not None
    sides = {s.name: s for s in record.sides}
    paths = []
    for row in selected:
        plan = _side_plan(data, sides[row.name])
        plan = plan.with_provenance(selected_by=rule, held_out_metrics=row.held_out,
                                    held_out={"first_seed": record.first_seed, "samples": record.samples},
                                    flops_count=FLOPS_COUNT, run=str(data.run.root.resolve()))
        paths.append(plan.save(Path(out) / safe_file_name(f"{report.name}-{row.name}", ".yaml")))
    return paths


def export_plans(run_dir: str | Path, rule: str, out: str | Path) -> list[Path]:
    """``ditplan export``: the plans of ``run_dir`` that ``rule`` selects, written to ``out``."""
    data = load_run_data(run_dir)
    return export_selected(data, build_report(data), rule, Path(out))
