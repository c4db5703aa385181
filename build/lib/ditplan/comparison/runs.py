"""``ditplan compare``: the reports of one or more runs, side by side, written and attached to MLflow."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ditplan.comparison.render import FIGURE, write_report
from ditplan.comparison.report import build_report, load_run_data
from ditplan.errors import UserError
from ditplan.plansearch.tracking import attach_to_study


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Greedy vs learned plans (and baselines) of every run: held-out quality × latency, dominance, the
    search-seed fronts beside, and the budgets. Writes ``comparison.md``, ``.png`` and ``.html`` into ``out``."""
    data = [load_run_data(r) for r in run_dirs]
    reports = [build_report(d) for d in data]
    for other in reports[1:]:
        if other.objectives[0] != reports[0].objectives[0]:
            raise UserError(f"runs {reports[0].name} and {other.name} optimise different objectives; compare like with like")
    out = Path(out)
    report = write_report(reports, out)
    files = [p for p in (report, out / FIGURE, out / "comparison.html") if p.exists()]
    for d in data:
        attach_to_study(d.spec, d.run.search, files, "comparison")
    return report
