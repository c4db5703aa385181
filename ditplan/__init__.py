"""ditplan: search, compare and export acceleration plans for Diffusion Transformers.

The Python API mirrors the CLI::

    import ditplan
    run_dir = ditplan.run("experiments/quickstart.yaml")          # ditplan run
    ditplan.compare([run_dir], "report/")                         # ditplan compare
    paths = ditplan.export(run_dir, "knee", "plans/")             # ditplan export
    plan = ditplan.load_plan(paths[0])
    ditplan.apply_plan(pipe_or_transformer, plan)                 # then sample with ditplan.sample
"""

from __future__ import annotations

from typing import Any

__all__ = ["apply_plan", "compare", "export", "load_for_plan", "load_plan", "load_spec", "remove_plan", "run", "sample"]


def _transformer(model: Any) -> Any:
    """A diffusers pipeline or a bare transformer → the transformer."""
    return getattr(model, "transformer", model)


def apply_plan(model: Any, plan: Any, target: Any = None) -> Any:
    """Install ``plan`` on a diffusers DiT/PixArt pipeline or transformer (see strategies.apply_plan)."""
    from ditplan.strategies import apply_plan as _apply

    return _apply(_transformer(model), plan, target)


def load_for_plan(adapter: Any, plan: Any) -> Any:
    """The model adapter a plan runs on (a fine-tuned SparseDiT network the plan names, or ``adapter``)."""
    from ditplan.models.adapters import load_for_plan as _load

    return _load(adapter, plan)


def remove_plan(model: Any) -> None:
    from ditplan.strategies import remove_plan as _remove

    _remove(_transformer(model))


def load_plan(path: Any) -> Any:
    from ditplan.plan import load_plan as _load

    return _load(path)


def load_spec(path: Any) -> Any:
    from ditplan.spec import load_spec as _load

    return _load(path)


def run(experiment: Any, **kwargs: Any) -> Any:
    from ditplan.workflow import run_experiment

    return run_experiment(experiment, **kwargs)


def compare(run_dirs: Any, out: Any) -> Any:
    from ditplan.report import compare_runs

    return compare_runs(list(run_dirs), out)


def export(run_dir: Any, rule: str, out: Any) -> Any:
    from ditplan.report import export_plans

    return export_plans(run_dir, rule, out)


def sample(*args: Any, **kwargs: Any) -> Any:
    from ditplan.models.sampling import sample as _sample

    return _sample(*args, **kwargs)
