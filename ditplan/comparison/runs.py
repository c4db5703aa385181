"""``ditplan compare``: the reports of one or more runs, side by side, written and attached to MLflow."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ditplan.atomic import atomic_write
from ditplan.comparison.export import safe_file_name
from ditplan.comparison.plan_grid import GRID
from ditplan.comparison.render import FIGURE, write_report
from ditplan.comparison.report import RunData, build_report, load_run_data
from ditplan.errors import UserError
from ditplan.plansearch.tracking import attach_to_study


def _plan_grids(data: Sequence[RunData], out: Path) -> dict[str, Path]:
    """Each run's picture of its plans (made by ``ditplan run``), in ``out``: ``plans.png`` for one run,
    ``plans-<run>.png`` for several; a run without one is left out."""
    grids = {}
    for d in data:
        source = d.run.report / GRID
        if not source.exists():
            continue
        dest = out / (GRID if len(data) == 1 else safe_file_name(f"plans-{d.spec.name}", ".png"))
        if source.resolve() != dest.resolve():
            atomic_write(dest, lambda tmp, source=source: shutil.copyfile(source, tmp))
        grids[d.spec.name] = dest
    return grids


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Greedy vs learned plans (and baselines) of every run: held-out quality × latency, dominance, the
    search-seed fronts beside, and the budgets. Writes ``comparison.md``, ``.png`` and ``.html`` into ``out``."""
    data = [load_run_data(r) for r in run_dirs]
    reports = [build_report(d) for d in data]
    for other in reports[1:]:
        if other.objectives[0] != reports[0].objectives[0]:
            raise UserError(f"runs {reports[0].name} and {other.name} optimise different objectives; compare like with like")
    out = Path(out)
    grids = _plan_grids(data, out)
    report = write_report(reports, out, grids)
    files = [p for p in (report, out / FIGURE, out / "comparison.html", *grids.values()) if p.exists()]
    for d in data:
        attach_to_study(d.spec, d.run.search, files, "comparison")
    return report
