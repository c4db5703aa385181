"""What the benchmark scripts share: provenance headers, the ``--experiment`` arguments, the held-out
measurement, ratios to dense, and the fixed plans of each strategy family.

Every script runs as ``python benchmarks/<study>/<script>.py …`` and finds this module by putting
``benchmarks/`` on ``sys.path`` first (two lines at its top). A script prints
:func:`provenance_header` before anything else, so a result file made from its output
(``… > benchmarks/<study>/results/<name>.txt``) starts with it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the repository
PACKAGES = ("torch", "diffusers", "optuna", "ray", "mlflow", "ditplan")


# --- provenance ------------------------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpu() -> str:
    try:
        import torch
    except ImportError:
        return "none (no torch)"
    if not torch.cuda.is_available():
        return "none"
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def provenance(argv: Sequence[str]) -> dict[str, str]:
    """Where a result comes from: command line, git commit (short hash, ``dirty`` when the tree has
    uncommitted changes), UTC date, machine (platform, CPU count, GPU), Python and package versions."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is not None and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (dirty)"
    script = Path(argv[0]) if argv else Path("?")
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return {
        "command": " ".join(["python", str(script), *map(shlex.quote, argv[1:])]),
        "commit": commit or "unknown (not a git checkout)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"{platform.platform()}; {os.cpu_count()} CPUs; GPU: {_gpu()}",
        "python": platform.python_version(),
        "packages": ", ".join(f"{p} {_version(p)}" for p in PACKAGES),
    }


def provenance_header(argv: Sequence[str]) -> str:
    """:func:`provenance` as an HTML comment: invisible in rendered Markdown, plain in a text file."""
    lines = "\n".join(f"{key}: {value}" for key, value in provenance(argv).items())
    return f"<!-- provenance\n{lines}\n-->"


def print_provenance(argv: Sequence[str] | None = None) -> None:
    """Print :func:`provenance_header` of this process's command line (the top of the result file)."""
    print(provenance_header(sys.argv if argv is None else argv), flush=True)


# --- the experiment on the command line ------------------------------------------------------------------

def add_experiment_arguments(parser: argparse.ArgumentParser, default: str | None = None, device: bool = False) -> None:
    """``--experiment`` (required unless ``default``) and, with ``device``, ``--device`` / ``--dtype``, which
    run the experiment's model elsewhere (e.g. a CPU preview of a GPU experiment)."""
    if default is None:
        parser.add_argument("--experiment", required=True, help="experiment file")
    else:
        parser.add_argument("--experiment", default=default, help=f"experiment file (default {default})")
    if device:
        parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="run the model here instead of model.device")
        parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                            help="and in this dtype instead of model.dtype")


def load_experiment(args: argparse.Namespace):  # noqa: ANN201
    """The experiment of ``args.experiment``, its model moved by ``--device`` / ``--dtype`` when given."""
    from ditplan.spec import load_spec

    spec = load_spec(args.experiment)
    moved = {key: value for key in ("device", "dtype") if (value := getattr(args, key, None))}
    if moved:
        model = type(spec.model).model_validate({**spec.model.model_dump(), **moved})
        spec = spec.model_copy(update={"model": model})
    return spec


def measure_held_out(adapter, spec, plans: Mapping[str, Any]):  # noqa: ANN001, ANN201
    """``plans`` (name → plan, None for dense) on the experiment's held-out seeds, timed: dense and every plan
    take turns in each of ``search.refine.latency_repeats`` rounds (what ``ditplan run`` reports from)."""
    from ditplan.evaluators.measure import measure

    return measure(adapter, spec, dict(plans), spec.seed_set("held_out"), timed=True,
                   rounds_count=spec.search.refine.latency_repeats)


def print_row(name: str, side: str, v: dict[str, float]) -> None:
    """One held-out row: | name | side | latency ratio (band) | FID | KID | kid_low | rel. L1 | FLOPs ratio |."""
    nan = float("nan")
    print(f"| {name} | {side} | {v['latency_ratio']:.3f} ({v['latency_ratio_min']:.2f}–{v['latency_ratio_max']:.2f}) "
          f"| {v.get('fid', nan):.3f} | {v.get('kid', nan):.4f} | {v.get('kid_low', nan):.4f} | {v['rel_l1']:.4f} "
          f"| {v['flops_ratio']:.3f} |", flush=True)


# --- timings ---------------------------------------------------------------------------------------------

def ratio_stats(times: Mapping[str, list[float]], name: str, dense: str = "dense") -> tuple[float, float, float]:
    """Median, min and max over rounds of ``name``'s time / ``dense``'s time in the same round."""
    ratios = [t / d for t, d in zip(times[name], times[dense])]
    return statistics.median(ratios), min(ratios), max(ratios)


# --- fixed plans of each strategy family -----------------------------------------------------------------

DENSE_STEPS = 2  # every family plan computes the first steps densely
FAMILIES = ("DiTFastAttn", "SparseDiT", "block caching")


def _every_layer(adapter, spec, cell_of_step, **kwargs):  # noqa: ANN001, ANN202
    from ditplan.models.sampling import plan_target
    from ditplan.plan import Plan

    steps = spec.sampler.num_steps
    grid = tuple((cell_of_step(step),) * adapter.num_layers for step in range(steps))
    return Plan(plan_target(adapter, spec.sampler.settings()), grid, **kwargs)


def family_plans(adapter, spec, cache_periods: tuple[int, ...] = (2,)) -> dict[str, tuple[str, Any]]:  # noqa: ANN001
    """name → (family, plan): fixed plans (no calibration; every layer alike, the first two steps dense).
    DiTFastAttn: ``wars`` (block window ±N/8, dense every 5th step), ``asc``, ``wars+asc``, ``ast`` every
    other step; block caching: ``reuse`` and ``forecast`` computing every k-th step for each k of
    ``cache_periods``; SparseDiT: each fine-tuned network beside the model, at the paper's curve and at
    constant rates."""
    from ditplan.models.adapters import model_folder
    from ditplan.plansearch.space import interval_skips
    from ditplan.strategies.finetune_sparse import layout_plan
    from ditplan.strategies.sdtm import SparseLayout
    from ditplan.strategies.sparse_network import sparse_networks

    def alternate(cell: str, period: int = 2):  # noqa: ANN202
        steps = spec.sampler.num_steps
        return lambda step: cell if interval_skips(step, period, steps, warmup=DENSE_STEPS) else "full"

    out: dict[str, tuple[str, Any]] = {
        "wars ±N/8, dense every 5th step": ("DiTFastAttn", _every_layer(adapter, spec, alternate("wars", 5))),
        "asc every step": ("DiTFastAttn", _every_layer(adapter, spec, lambda s: "full" if s < DENSE_STEPS else "asc")),
        "wars+asc, dense every 5th step": ("DiTFastAttn", _every_layer(adapter, spec, alternate("wars+asc", 5))),
        "ast every other step": ("DiTFastAttn", _every_layer(adapter, spec, alternate("ast"))),
    }
    for period in cache_periods:
        every = {2: "every other step", 3: "every 3rd step"}.get(period, f"every {period}th step")
        out[f"reuse {every}"] = ("block caching", _every_layer(adapter, spec, alternate("reuse", period)))
        out[f"forecast (order 1) {every}"] = ("block caching", _every_layer(adapter, spec, alternate("forecast", period)))
    settings = spec.sampler.settings()
    for weights, info in sparse_networks(model_folder(spec.model.source)).items():  # type: ignore[arg-type]
        for curve in ({"name": "paper", **dict(zip(("r_min", "r_max"), info["rate_range"]))},
                      {"name": "constant", "r": 0.5}, {"name": "constant", "r": 0.75}):
            layout = SparseLayout.from_dict({**info["layout"], "curve": curve, "weights": weights})
            label = ", ".join(f"{k}={v}" for k, v in curve.items() if k != "name")
            out[f"{layout.name} {curve['name']} ({label})"] = ("SparseDiT", layout_plan(adapter, layout, settings))
    return out
