"""ditplan: search, compare and export acceleration plans for Diffusion Transformers.

The Python API mirrors the CLI::

    import ditplan
    run_dir = ditplan.run("ditplan/experiments/quickstart.yaml")          # ditplan run
    ditplan.compare([run_dir], "report/")                         # ditplan compare
    paths = ditplan.export(run_dir, "knee", "plans/")             # ditplan export
    ditplan.apply_plan(pipe, paths[0])                            # a stock diffusers DiT/PixArt pipeline
    images = pipe(class_labels=[3, 7], num_inference_steps=20, guidance_scale=4.0).images
    ditplan.remove_plan(pipe)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "apply_plan",
    "compare",
    "denoising_step",
    "export",
    "load_for_plan",
    "load_plan",
    "load_spec",
    "remove_plan",
    "run",
    "sample",
]


def apply_plan(model: Any, plan: Any, model_folder: Any = None) -> Any:
    """Install ``plan`` (a Plan or a plan file) on a stock diffusers ``DiTPipeline`` /
    ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` — then ``pipe(...)`` runs it — or on a bare
    transformer, whose loop tells the step with :func:`denoising_step`. A SparseDiT plan swaps in its
    fine-tuned network from ``model_folder`` (default: where the transformer was loaded from). Checks the
    weights here and the scheduler, steps and guidance at each pipeline call (see strategies.pipeline)."""
    from ditplan.strategies.pipeline import apply_plan_to

    return apply_plan_to(model, plan, model_folder)


def load_for_plan(adapter: Any, plan: Any) -> Any:
    """The model adapter a plan runs on (a fine-tuned SparseDiT network the plan names, or ``adapter``)."""
    from ditplan.models.adapters import load_for_plan as _load

    return _load(adapter, plan)


def remove_plan(model: Any) -> None:
    """Undo :func:`apply_plan` exactly (processors, hooks, swapped weights, the pipeline's call)."""
    from ditplan.strategies.pipeline import remove_plan_from

    remove_plan_from(model)


def denoising_step(step: int, num_steps: int, cfg: str | None = "cond-uncond") -> Any:
    """Context manager telling an applied plan the step of a transformer call in your own loop
    (see ditplan.models.context.denoising_step)."""
    from ditplan.models.context import denoising_step as _step

    return _step(step, num_steps, cfg)


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
    from ditplan.comparison.runs import compare_runs

    return compare_runs(list(run_dirs), out)


def export(run_dir: Any, rule: str, out: Any) -> Any:
    from ditplan.comparison.export import export_plans

    return export_plans(run_dir, rule, out)


def sample(*args: Any, **kwargs: Any) -> Any:
    from ditplan.models.sampling import sample as _sample

    return _sample(*args, **kwargs)
