"""``ditplan run``: stages over one resumable run directory (:class:`~ditplan.rundir.RunDir`):

1. dense reference on the search seeds;
2. greedy D1 … D6 on the calibration seeds;
3. learned search on the search seeds (warm-started from greedy with ``search.warm_start: greedy``);
4. the held-out stage: dense, greedy, the learned front and the baselines in the same interleaved rounds;
5. the plans the export rules select, and the report (with dense and those plans on the same held-out seeds).

Stages already done in the run directory are skipped. Everything an experiment file names is checked
(:func:`prepare`) before the first stage computes anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console

from ditplan.atomic import atomic_write_text
from ditplan.comparison.baselines import baseline_plan, check_baselines
from ditplan.comparison.export import export_selected, safe_file_name
from ditplan.comparison.held_out import held_out_stage
from ditplan.comparison.plan_grid import write_plan_grid
from ditplan.comparison.render import front_table, write_report
from ditplan.comparison.report import build_report, load_run_data
from ditplan.comparison.sides import run_sides
from ditplan.errors import UserError
from ditplan.evaluators.domain import check_evaluation_files, check_extractor
from ditplan.evaluators.reference import dense_reference
from ditplan.files import check_folder, naming
from ditplan.models.adapters import experiment_adapter
from ditplan.models.families import FAMILIES
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan, load_plan
from ditplan.plansearch.driver import SearchResult, run_search
from ditplan.plansearch.greedy_cli import greedy_summary, write_greedy_plans
from ditplan.plansearch.ray_tasks import resolve_ray_address
from ditplan.plansearch.records import reference_point
from ditplan.plansearch.space import check_space, experiment_space
from ditplan.plansearch.storage import (
    load_finished_study,
    refuse_existing_study,
    study_exists,
    study_storage,
)
from ditplan.plansearch.tracking import attach_to_study
from ditplan.plugins import import_plugins
from ditplan.rundir import RunDir, search_folder
from ditplan.spec import (
    Experiment,
    ExperimentSpec,
    experiment_label,
    load_spec,
    resolved_experiment_text,
)
from ditplan.strategies.summary import describe

DEFAULT_EXPORT_RULES = ("knee", "top:3")


def check_names(spec: ExperimentSpec) -> None:
    """Every name the experiment uses beyond the file's own schema, checked without loading the model or
    reading a file: the model family and the workload it needs, strategies and their parameters, pruning curves and diffusers' caches of the search
    space, the baselines, the feature extractor, a hypervolume reference for every objective."""
    family = FAMILIES.get_entry(spec.model.kind, "model.kind")
    family.check_spec(spec)
    check_space(spec.search.space, family)
    check_baselines(spec)
    check_extractor(spec)
    reference_point(spec)


def prepare(experiment: Experiment, plugins: Sequence[str] = (), evaluates: bool = False, searches: bool = False
            ) -> tuple[ExperimentSpec, ModelAdapter]:
    """The experiment in ``experiment`` and its model, once everything the command needs is known to exist:
    a bad name or file is a one-line :class:`UserError` naming the experiment file, before any work.
    ``evaluates``: also the files the evaluation reads (extractor weights, reference, CLIP and LPIPS weights);
    ``searches``: those, the search space and the baselines' plans (they need the model: its tokens, its
    fine-tuned networks)."""
    import_plugins(plugins)
    spec = load_spec(experiment)
    with naming(experiment_label(experiment)):
        check_names(spec)
        adapter = experiment_adapter(spec)
        if evaluates or searches:
            check_evaluation_files(spec)
        if searches:
            experiment_space(adapter, spec)
            for baseline in spec.baselines:
                baseline_plan(adapter, spec, baseline)
    return spec, adapter


def checked_plan(plan: str | Path | Plan, adapter: ModelAdapter, spec: ExperimentSpec) -> Plan:
    """The plan (a Plan or a plan file), once it is known to fit the experiment's model and sampler (one line if not)."""
    from ditplan.strategies.apply import check_plan

    loaded = plan if isinstance(plan, Plan) else load_plan(plan)
    with naming("plan" if isinstance(plan, Plan) else plan):
        check_plan(loaded, adapter, spec.sampler.settings())
    return loaded


def warm_start_plans(folder: str | Path, adapter: ModelAdapter, spec: ExperimentSpec) -> dict[str, Plan]:
    """The plan files in ``folder`` by name (a plan's own name, else its file's), each checked against the model."""
    plans = {}
    for path in sorted(check_folder(folder, "--warm-start folder").glob("*.yaml")):
        plan = checked_plan(path, adapter, spec)
        plans[str(plan.provenance.get("name") or path.stem)] = plan
    if not plans:
        raise UserError(f"--warm-start folder {folder} holds no plan file (*.yaml); give the folder `ditplan export` "
                        "or `ditplan greedy` wrote")
    return plans


def search_experiment(
    experiment: Experiment, out: str | Path | None = None, trials: int | None = None, workers: int | None = None,
    ray_address: str | None = None, resume: bool = False, warm_start: str | Path | Mapping[str, Plan] | None = None,
    plugins: Sequence[str] = (), promote_best: bool = True, show_progress: bool = True,
) -> SearchResult:
    """The learned search alone (``ditplan search``) in ``out`` (default: the run directory's ``search/``);
    ``warm_start``: plans (or a folder of plan files) run first as known trials; writes the front table."""
    spec = load_spec(experiment)
    search_dir = search_folder(spec, out)
    if not resume:
        refuse_existing_study(spec, search_dir)  # NOTE: before the model loads
    spec, adapter = prepare(experiment, plugins, searches=True)  # NOTE: before the study writes anything
    warm = warm_start_plans(warm_start, adapter, spec) if isinstance(warm_start, (str, Path)) else warm_start or {}
    result = run_search(spec, search_dir, trials=trials, workers=workers, ray_address=ray_address, resume=resume,
                        warm_start=warm, plugins=plugins, show_progress=show_progress, promote_best=promote_best)
    write_front_table(spec, result)
    return result


def _keep_experiment(run: RunDir, spec: ExperimentSpec, experiment: Experiment) -> None:
    """The run directory keeps the experiment with its relative paths made absolute (resolved once, against
    ``experiment``), so running again on either file resumes the run; another experiment's run is refused."""
    if run.experiment.exists() and run.load_experiment() != spec:
        raise UserError(f"{run.root} holds a run of a different experiment file; set another output_dir or remove it")
    run.save_experiment(resolved_experiment_text(experiment))


def _search(run: RunDir, spec: ExperimentSpec, trials: int | None, workers: int | None, ray_address: str | None,
            plugins: Sequence[str], show_progress: bool) -> SearchResult:
    """The learned search, resumed when its study exists (a journal file or an RDB, whatever holds it)."""
    resume = study_exists(study_storage(spec, run.search), spec.name)
    warm = run.greedy.plans() if spec.search.warm_start == "greedy" else {}
    result = run_search(spec, run.search, trials=trials, workers=workers, ray_address=ray_address, resume=resume,
                        warm_start=warm, plugins=plugins, show_progress=show_progress)
    write_front_table(spec, result)
    return result


def write_front_table(spec: ExperimentSpec, result: SearchResult) -> Path:
    """The search's ``pareto_front.md``: every trial of the final fidelity (with what its plan does), dense's
    objectives above."""
    trials = result.search_dir
    rows = [{**row, "what": describe(trials.load_trial(row["trial"])) if trials.trial_path(row["trial"]).exists() else ""}
            for row in result.rows]
    table = front_table(rows, result.objectives, result.dense, spec.search.samples)
    return atomic_write_text(result.search_dir.front_table, table)


def _export(run: RunDir, rules: Sequence[str], console: Console) -> list[Path]:
    """The plans each rule selects, once each; no feasible plan is said in one line, and nothing is exported."""
    data = load_run_data(run.root)
    report = build_report(data)
    try:
        return list(dict.fromkeys(p for rule in rules for p in export_selected(data, report, rule, run.exported)))
    except UserError as err:
        console.print(f"nothing exported: {err}", soft_wrap=True)
        return []


def _exported_plans(spec: ExperimentSpec, paths: Sequence[Path]) -> dict[str, Plan]:
    """The exported plans by their side's name (the file's name without the experiment's)."""
    prefix = safe_file_name(spec.name, "-")
    return {p.stem.removeprefix(prefix): load_plan(p) for p in paths}


def run_experiment(
    experiment: Experiment, trials: int | None = None, workers: int | None = None, ray_address: str | None = None,
    export_rules: Sequence[str] = DEFAULT_EXPORT_RULES, show_progress: bool = True, plugins: Sequence[str] = (),
) -> Path:
    """Run every stage (module docstring) of ``experiment`` (a file, a shipped experiment's name, its data or
    a spec); returns the run directory. ``plugins``: modules imported here and in
    every search worker that register strategies or feature extractors the experiment names."""
    console = Console(quiet=not show_progress)
    resolve_ray_address(ray_address)  # NOTE: a cluster that does not answer fails here, not after greedy's minutes
    spec, adapter = prepare(experiment, plugins, searches=True)  # NOTE: a bad file leaves no run directory
    run = RunDir.of(spec)
    _keep_experiment(run, spec, experiment)
    settings = spec.sampler.settings()

    console.rule("[bold]1/5 dense reference (search seeds)")
    search_set = spec.seed_set("search")
    dense_reference(adapter, settings, search_set.conditions, search_set.seeds, spec.evaluation.cache_dir, show_progress)

    console.rule("[bold]2/5 greedy DiTFastAttn plans (calibration seeds)")
    write_greedy_plans(adapter, spec, run.greedy, skip_existing=True, show_progress=show_progress)
    for plan in run.greedy.plans().values():
        console.print(greedy_summary(plan))

    console.rule("[bold]3/5 learned search (search seeds)")
    result = _search(run, spec, trials, workers, ray_address, plugins, show_progress)
    promoted = f", {result.promoted} scored again on every search sample" if result.promoted else ""
    console.print(f"{result.completed} trials complete ({result.repeats} repeats, {result.failed} failed){promoted}, "
                  f"feasible learned front of {len(result.front)}, hypervolume {result.hypervolume:.4g} (search seeds)")

    if spec.search.refine is not None:
        console.rule("[bold]4/5 held-out stage: dense, greedy, learned front and baselines, interleaved")
        sides = run_sides(run, spec, adapter, load_finished_study(spec, run.search))
        held_out_stage(run, spec, adapter, sides, show_progress)
        attach_to_study(spec, run.search, [run.held_out], "held_out")

    console.rule("[bold]5/5 comparison and export")
    exported = _export(run, export_rules, console)
    grid = write_plan_grid(adapter, spec, _exported_plans(spec, exported), run.report)
    report = write_report([build_report(load_run_data(run.root))], run.report, {spec.name: grid})
    attach_to_study(spec, run.search, [p for p in run.report.iterdir() if p.is_file()], "comparison")
    if show_progress:
        print(report.read_text())  # NOTE: plain print: rich would wrap the table and eat [markup]
    console.print(f"report: {report}; exported plans: {', '.join(str(p) for p in exported) or 'none'}", soft_wrap=True)
    return run.root
