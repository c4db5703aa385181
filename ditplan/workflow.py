"""``ditplan run``: dense reference → greedy D1 … D6 (calibration seeds) → learned search, warm-started
from greedy (search seeds) → held-out evaluation of the front and the greedy plans (held-out seeds) →
comparison → export, in one resumable run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ditplan.atomic import atomic_write_text
from ditplan.errors import UserError
from ditplan.evaluators.evaluate import check_evaluation
from ditplan.files import naming
from ditplan.evaluators.reference import dense_reference
from ditplan.plan import load_plan
from ditplan.plugins import import_plugins
from ditplan.report import compare_runs, export_plans
from ditplan.search.baselines import measure_baselines
from ditplan.search.driver import resolve_ray_address, run_search
from ditplan.search.greedy_cli import greedy_summary, write_greedy_plans
from ditplan.search.storage import study_exists, study_storage
from ditplan.search.trial_eval import worker_adapter
from ditplan.spec import load_spec, resolved_experiment_text

DEFAULT_EXPORT_RULES = ("knee", "top:3")


def run_experiment(
    experiment: str | Path, trials: int | None = None, workers: int | None = None, ray_address: str | None = None,
    export_rules: tuple[str, ...] = DEFAULT_EXPORT_RULES, show_progress: bool = True, plugins: Sequence[str] = (),
) -> Path:
    """Run every stage; stages already done in the run directory are skipped. Returns the run directory.

    The run directory keeps the experiment as ``experiment.yaml`` with its relative paths made absolute
    (resolved once, against ``experiment``), so running again on either file resumes the run.
    ``plugins``: modules imported here and in every search worker that register strategies or feature
    extractors the experiment names."""
    console = Console(quiet=not show_progress)
    import_plugins(plugins)
    spec = load_spec(experiment)
    resolve_ray_address(ray_address)  # NOTE: a cluster that does not answer fails here, not after greedy's minutes
    with naming(experiment):
        check_evaluation(spec)
        adapter = worker_adapter(spec)  # NOTE: loaded before anything is written: a bad model leaves no run directory
    run_dir = spec.run_dir()
    copy = run_dir / "experiment.yaml"
    if copy.exists() and load_spec(copy) != spec:
        raise UserError(f"{run_dir} holds a run of a different experiment file; set another output_dir or remove it")
    atomic_write_text(copy, resolved_experiment_text(experiment))
    settings = spec.sampler.settings()

    console.rule("[bold]1/5 dense reference (search seeds)")
    _, conditions, seeds = spec.seed_set("search")
    dense_reference(adapter, settings, conditions, seeds, spec.evaluation.cache_dir, show_progress)

    console.rule("[bold]2/5 greedy DiTFastAttn plans (calibration seeds)")
    plans = [load_plan(p) for p in write_greedy_plans(adapter, spec, run_dir / "greedy", skip_existing=True,
                                                       show_progress=show_progress)]
    for plan in plans:
        console.print(greedy_summary(plan))

    console.rule("[bold]3/5 learned search (search seeds) + 4/5 held-out evaluation of the front and greedy")
    search_dir = run_dir / "search"
    resume = study_exists(study_storage(spec, search_dir), spec.name)  # a journal file or an RDB, whatever holds it
    result = run_search(spec, search_dir, trials=trials, workers=workers, ray_address=ray_address, resume=resume,
                        warm_start=plans if spec.search.warm_start == "greedy" else (), plugins=plugins,
                        show_progress=show_progress)
    promoted = f", {result.promoted} scored again on every search sample" if result.promoted else ""
    console.print(f"{result.completed} trials complete ({result.repeats} repeats, {result.failed} failed){promoted}, feasible front of {len(result.front)}, "
                  f"hypervolume {result.hypervolume:.4g} (search seeds)")

    if spec.baselines:
        console.rule("[bold]baselines (held-out seeds, interleaved with dense)")
        measure_baselines(adapter, spec, run_dir)

    console.rule("[bold]5/5 comparison and export")
    report = compare_runs([run_dir], run_dir / "report")
    exported = dict.fromkeys(p for rule in export_rules for p in export_plans(run_dir, rule, run_dir / "exported"))  # a plan two rules select: once
    if show_progress:
        print(report.read_text())  # NOTE: plain print: rich would wrap the table and eat [markup]
    console.print(f"report: {report}; exported plans: {', '.join(str(p) for p in exported)}", soft_wrap=True)
    return run_dir
