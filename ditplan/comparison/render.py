"""Rendering a report (:class:`~ditplan.comparison.report.RunReport`) as Markdown, a PNG and an interactive
HTML figure; and a search's front table (``pareto_front.md``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ditplan.atomic import atomic_write, atomic_write_text
from ditplan.comparison.report import FigurePoint, RunReport, Verdict, figure_points
from ditplan.plansearch.figures import Axes, scatter_html, scatter_png
from ditplan.registry import direction, label

FLOPS_SENTENCE = ("FLOPs ratio (here, in objectives and in plan files: `flops_ratio`) counts window attention as its "
                  "kernel executes it (the masked `band` window computes its query blocks' whole key spans); `ideal` "
                  "(`ideal_flops_ratio`) counts the ideal band. For `blocks` and `tiles` windows the two are equal.")
FIGURE = "comparison.png"


def _fmt(value: float, digits: str = ".4g") -> str:
    return "" if value is None or value != value else format(value, digits)


def _latency(values: dict[str, float]) -> str:
    if "latency_ratio" not in values:
        return ""
    return f"{values['latency_ratio']:.3f} ({values['latency_ratio_min']:.2f}–{values['latency_ratio_max']:.2f})"


def _headline(report: RunReport) -> list[str]:
    """Held-out quality × latency of every side, the search-seed rel. L1 beside."""
    record = report.held_out
    assert record is not None
    dense = record.dense().metrics
    columns = list(dict.fromkeys([report.quality, *(m for m in ("kid", "kid_low", "class_agreement") if m in dense),
                                  "rel_l1"]))
    lines = [f"## Held-out {report.quality} × latency ({record.samples} held-out samples, seeds {record.first_seed}…; "
             f"latency ratio to dense: median over {record.rounds} rounds interleaved with dense in one process, "
             "min–max band)", "",
             "| plan | side | what it does | " + " | ".join(f"{m} (held-out)" for m in columns) + " | rel_l1 (search seeds) | "
             "latency ratio (band) | FLOPs ratio (executed) | ideal |", "|---|---|---|" + "---|" * len(columns) + "---|---|---|---|"]
    order = {"dense": 0, "greedy": 1, "learned": 2, "baseline": 3}
    for row in sorted(report.rows, key=lambda r: (order[r.kind], r.value("latency_ratio") if r.kind != "greedy" else 0)):
        lines.append(f"| {row.name} | {row.kind if row.kind != 'dense' else ''} | {row.what} | "
                     + " | ".join(_fmt(row.value(m)) for m in columns)
                     + f" | {_fmt(row.search.get('rel_l1', math.nan))} | {_latency(row.held_out)} | "
                     f"{_fmt(row.value('flops_ratio'), '.3f')} | {_fmt(row.value('ideal_flops_ratio'), '.3f')} |")
    return lines + ["", FLOPS_SENTENCE, "", _fid_sentence(report), "", _shift_sentence(report)]


def _fid_sentence(report: RunReport) -> str:
    """How many samples the held-out FID rests on, and what that count allows."""
    from ditplan.evaluators.distribution import FID_FEATURE_DIMS

    dims = FID_FEATURE_DIMS.get(report.feature_extractor or "")
    if dims is None or report.held_out is None:
        return ""
    samples = report.held_out.samples
    enough = ("enough for a full-rank covariance" if samples > dims else
              "too few for a full-rank covariance: FID is biased upward, so compare plans with dense's FID at the "
              "same count, and read KID (unbiased at any count) beside it")
    return (f"FID and KID use {samples} held-out samples against the reference on the {dims}-d features of "
            f"{report.feature_extractor}: {enough}. kid_low is KID on the extractor's low-level layer (strokes and texture).")


def _shift_sentence(report: RunReport) -> str:
    parts = [f"{s.side} plans' rel. L1 to dense changes by a median {s.change:+.1%} from the search seeds to the "
             f"held-out seeds ({s.plans} plans not dense on the search seeds)" for s in report.shifts]
    return ("Held-out vs selection seeds: " + "; ".join(parts) + ".") if parts else ""


def _verdict_text(v: Verdict) -> str:
    if v.dominated is None:
        return "no learned plan is as fast"
    text = "dominated" if v.dominated else "**no learned plan dominates**"
    return text + (" (latency bands overlap: not faster beyond noise)" if v.bands_overlap else "")


def _dominance(report: RunReport) -> list[str]:
    q = report.quality
    baselines = bool(report.of_kind("baseline"))
    lines = [f"## Dominance on held-out seeds: for every greedy plan{' and baseline' if baselines else ''}, the best "
             "learned plan at ≤ its latency", "",
             f"| {'greedy / baseline' if baselines else 'greedy'} | what it does | {q} | latency | best learned at ≤ its "
             f"latency | what it does | {q} | latency | Δ {q} | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v in report.dominance:
        best = (f"{v.best} | {report.row(v.best).what} | {_fmt(v.best_quality)} | {_fmt(v.best_latency, '.3f')} | "
                f"{v.delta:+.4g}" if v.best is not None else "none | | | |")
        lines.append(f"| {v.side} | {report.row(v.side).what} | {_fmt(v.quality)} | {_fmt(v.latency, '.3f')} | {best} | "
                     f"{_verdict_text(v)} |")
    return lines


def _infeasible(report: RunReport) -> list[str]:
    """What the report says when no plan the search found meets the constraints."""
    if report.feasible_learned:
        return []
    return [f"**No feasible plan:** no learned plan meets the constraints ({', '.join(report.constraints) or 'none'}) "
            "on the search seeds, so none was measured on the held-out seeds or can be exported. Loosen "
            "`search.constraints`, widen the search space or give the search more trials.", ""]


def _search_seeds(report: RunReport) -> list[str]:
    lines = [f"## Search seeds (what chose the plans): {report.objectives[0]} × {report.objectives[1]}, feasible trials "
             f"only, hypervolume reference {report.reference}", "", "| side | plans | infeasible | front | hypervolume |",
             "|---|---|---|---|---|"]
    return lines + [f"| {f.label} | {f.plans} | {f.infeasible} | {f.front} | {f.hypervolume:.4f} |" for f in report.fronts]


def _budgets(report: RunReport) -> list[str]:
    lines = ["## Budgets (transformer sample-forwards = rows × steps, CFG counted; wall time elapsed)", "",
             "| side | plans | one-off: calibration (sample-forwards, s, largest peak memory) | "
             "search-seed evaluations (sample-forwards) | total sample-forwards | evaluation wall time (s, elapsed) |",
             "|---|---|---|---|---|---|"]
    for b in report.budgets:
        peak = f", peak {b.calibration_peak_mb:g} MiB" if b.calibration_peak_mb is not None else ""
        lines.append(f"| {b.side} | {b.plans} | {b.calibration_forwards:,} ({b.calibration_seconds:.0f} s{peak}) | "
                     f"{b.evaluation_forwards:,} | {b.forwards:,} | {b.evaluation_seconds:.0f} |")
    if report.held_out is not None:
        lines.append(f"| held-out stage (dense + every side) | | | | {report.held_out.sample_forwards:,} | "
                     f"{report.held_out.seconds:.0f} |")
    if report.networks:
        lines += ["", "One-off fine-tuning of the SparseDiT networks learned plans run on (made once, shared by every "
                  "search; training rows = steps × batch, each a forward and a backward pass):", "",
                  "| network | steps | batch | training rows | minutes | device |", "|---|---|---|---|---|---|"]
        lines += [f"| {n.network} | {n.steps:,} | {n.batch} | {n.training_rows:,} | {n.minutes} | {n.device} |"
                  for n in report.networks]
    return lines


def run_markdown(report: RunReport) -> list[str]:
    """The Markdown of one run's report."""
    if report.held_out is None:
        held = ["No held-out evaluation in this run (search.refine is off): nothing below is measured on "
                "seeds the search did not see.", ""]
    else:
        held = _infeasible(report) + _headline(report) + [""] + _dominance(report) + [""]
    return held + _search_seeds(report) + [""] + _budgets(report) + [""]


def figure_groups(points: Sequence[FigurePoint]) -> dict[str, list[dict[str, Any]]]:
    """The figure's points by legend entry, as the scatter functions take them."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault(p.group, []).append({"name": p.name, "what": p.what, "quality": p.quality,
                                               "latency_ratio": p.latency, "on_front": p.kind == "learned"})
    return groups


def figure_axes(reports: Sequence[RunReport]) -> Axes:
    quality = reports[0].quality
    better = "lower" if direction(quality) == "minimize" else "higher"
    return Axes("latency_ratio", "quality", f"{label('latency_ratio')}, interleaved with dense on held-out seeds",
                f"{label(quality)}\non held-out seeds ({better} is better)",
                f"{', '.join(r.name for r in reports)}: held-out quality × held-out latency")


def write_report(reports: Sequence[RunReport], out: Path, grids: Mapping[str, Path] | None = None) -> Path:
    """``comparison.md`` with ``comparison.png`` and ``comparison.html`` (held-out quality × latency of every
    side, each point named) into ``out``; ``grids``: by run name, the image in ``out`` of its plans' samples
    (:mod:`ditplan.comparison.plan_grid`). Returns the Markdown file."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Greedy vs learned plans ({', '.join(r.name for r in reports)})", ""]
    for report in reports:
        lines += ([f"# {report.name}", ""] if len(reports) > 1 else []) + run_markdown(report)
    groups, axes = figure_groups(figure_points(reports)), figure_axes(reports)
    if groups:
        png = scatter_png(groups, axes, annotate=True)
        atomic_write(out / FIGURE, lambda tmp: png.savefig(tmp, dpi=120, format="png"))
        html = scatter_html(groups, axes)
        atomic_write(out / "comparison.html", lambda tmp: html.write_html(str(tmp)))
        lines += [f"![held-out quality × latency]({FIGURE})", ""]
    for name, grid in (grids or {}).items():
        lines += [f"## {name}: dense and the exported plans on the same held-out seeds", "",
                  f"![{name}: samples of each plan]({grid.name})", ""]
    return atomic_write_text(out / "comparison.md", "\n".join(lines))


def front_table(rows: Sequence[dict[str, Any]], objectives: Sequence[str], dense: dict[str, float], samples: int) -> str:
    """A search's trials at the final fidelity (``rows``: name, source, objective values, feasible, on_front and
    optionally ``what`` its plan does) after dense's own objectives on the same ``samples`` search samples."""
    return "\n".join([f"dense on the same {samples} search samples: " + ", ".join(f"{o} {dense[o]:.4g}" for o in objectives),
                      "", "| trial | name | what it does | " + " | ".join(objectives) + " | feasible | front |",
                      "|---|---|---|" + "---|" * len(objectives) + "---|---|"] +
                     [f"| {r['trial']} | {r['name']} | {r.get('what', '')} | " + " | ".join(f"{r[o]:.4g}" for o in objectives) +
                      f" | {'yes' if r['feasible'] else 'no'} | {'yes' if r['on_front'] else ''} |" for r in rows]) + "\n"
