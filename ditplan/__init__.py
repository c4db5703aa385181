"""ditplan: search, compare and export acceleration plans for Diffusion Transformers.

The Python API mirrors the CLI::

    import ditplan
    run_dir = ditplan.run("quickstart")                           # ditplan run quickstart
    ditplan.compare([run_dir], "report/")                         # ditplan compare
    paths = ditplan.export(run_dir, "knee", "plans/")             # ditplan export
    ditplan.generate("quickstart", paths[0], classes=[3, 7])      # ditplan generate --plan … --class 3 --class 7
    ditplan.apply_plan(pipe, paths[0])                            # a stock diffusers pipeline (DiT, PixArt, FLUX, SD3, Qwen-Image)
    images = pipe(class_labels=[3, 7], num_inference_steps=20, guidance_scale=4.0).images
    ditplan.remove_plan(pipe)

An experiment is a YAML file, the name of a shipped one (``quickstart``, ``digits-1024`` …), its data as a
dict, or an :class:`~ditplan.spec.ExperimentSpec`; none is changed. ``import ditplan`` stays light: each
function imports what it needs (:func:`run`, :func:`search` and :func:`evaluate` need ``ditplan[search]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ditplan.models.family import ModelAdapter
    from ditplan.plan import Plan
    from ditplan.plansearch.driver import SearchResult
    from ditplan.spec import Experiment, ExperimentSpec, SamplerSettings

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "apply_plan",
    "calibrated_config",
    "compare",
    "denoising_step",
    "embedded_pipeline",
    "evaluate",
    "export",
    "generate",
    "load_for_plan",
    "load_plan",
    "load_spec",
    "remove_plan",
    "run",
    "sample",
    "search",
    "shipped_plan",
    "summary",
]


def apply_plan(model: Any, plan: Plan | str | Path, model_folder: str | Path | None = None) -> Any:
    """Install ``plan`` (a Plan or a plan file) on a stock diffusers pipeline of a family ditplan knows (DiT,
    PixArt-α/Σ, FLUX.1, SD3: :mod:`ditplan.models.families`) — then ``pipe(...)`` runs it — or on a bare
    transformer, whose loop tells the step with :func:`denoising_step`. A SparseDiT plan swaps in its
    fine-tuned network from ``model_folder`` (default: where the transformer was loaded from). Checks the
    weights here and the scheduler, steps and guidance at each pipeline call (see strategies.pipeline)."""
    from ditplan.strategies.pipeline import apply_plan_to

    return apply_plan_to(model, plan, model_folder)


def calibrated_config(method: str, adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any],
                      seeds: Sequence[int]) -> dict[str, Any]:
    """The config fields of diffusers' cache ``method`` measured on the model (MagCache's ``mag_ratios``, one per
    step), by diffusers' own calibration on a dense run of ``(conditions, seeds)`` at ``settings``: put them in a
    plan's ``cache.config`` (see ditplan.strategies.diffusers_cache)."""
    from ditplan.strategies.diffusers_cache import calibrated_config as _calibrated

    return _calibrated(method, adapter, settings, conditions, seeds)


def load_for_plan(adapter: ModelAdapter, plan: Plan) -> ModelAdapter:
    """The model adapter a plan runs on (a fine-tuned SparseDiT network the plan names, or ``adapter``)."""
    from ditplan.strategies.sparse_network import load_for_plan as _load

    return _load(adapter, plan)


def remove_plan(model: Any) -> None:
    """Undo :func:`apply_plan` exactly (processors, hooks, swapped weights, the pipeline's call)."""
    from ditplan.strategies.pipeline import remove_plan_from

    remove_plan_from(model)


def denoising_step(step: int, num_steps: int, cfg: str | None = "cond-uncond", branch: str | None = None) -> Any:
    """Context manager telling an applied plan the step of a transformer call in your own loop, and with guidance
    as two calls per step which call (``branch``: "cond", then "uncond"; see ditplan.models.context.denoising_step)."""
    from ditplan.models.context import denoising_step as _step

    return _step(step, num_steps, cfg, branch)


def load_plan(path: str | Path) -> Plan:
    """The plan in the YAML file ``path`` (checked against its schema; one-line error if not)."""
    from ditplan.plan import load_plan as _load

    return _load(path)


def shipped_plan(name: str) -> Plan:
    """A plan shipped with ditplan (``quickstart-knee``: the quickstart's knee plan for the embedded model)."""
    from ditplan.plan import shipped_plan as _shipped_plan

    return _shipped_plan(name)


def embedded_pipeline(source: str = "embedded", scheduler: str = "dpmsolver++") -> Any:
    """The embedded digit DiT (``embedded`` or ``embedded-1024``) as a stock diffusers ``DiTPipeline`` with the
    sampler ``scheduler``; call it like any DiTPipeline: ``pipe(class_labels=[3, 7], num_inference_steps=20,
    guidance_scale=4.0, output_type="np")``."""
    from ditplan.models.pipelines import embedded_pipeline as _embedded_pipeline

    return _embedded_pipeline(scheduler=scheduler, source=source)


def load_spec(experiment: Experiment) -> ExperimentSpec:
    """The experiment: a file, a shipped experiment's name, its data (a dict) or a spec, validated."""
    from ditplan.spec import load_spec as _load

    return _load(experiment)


def run(experiment: Experiment, *, trials: int | None = None, workers: int | None = None,
        ray_address: str | None = None, plugins: Sequence[str] = (), show_progress: bool = True) -> Path:
    """``ditplan run``: dense reference, greedy plans, learned search, held-out stage, report and export of
    ``experiment``, resumed where its run directory stopped; returns the run directory. ``trials`` /
    ``workers`` override ``search.trials`` / ``search.workers``; ``plugins``: modules that register
    strategies or feature extractors (imported here and in every search worker)."""
    from ditplan.workflow import run_experiment

    return run_experiment(experiment, trials=trials, workers=workers, ray_address=ray_address, plugins=plugins,
                          show_progress=show_progress)


def search(experiment: Experiment, out: str | Path | None = None, *, trials: int | None = None,
           workers: int | None = None, ray_address: str | None = None, resume: bool = False,
           warm_start: str | Path | Mapping[str, Plan] | None = None, plugins: Sequence[str] = (),
           show_progress: bool = True) -> SearchResult:
    """``ditplan search``: the learned multi-objective search alone, in ``out`` (default: the run directory's
    ``search/``). ``resume`` continues a study already in the storage; ``warm_start``: plans by name, or a
    folder of plan files, run first as known trials. Returns the front, its hypervolume and the counts."""
    from ditplan.workflow import search_experiment

    return search_experiment(experiment, out, trials=trials, workers=workers, ray_address=ray_address,
                             resume=resume, warm_start=warm_start, plugins=plugins, show_progress=show_progress)


def evaluate(experiment: Experiment, plan: Plan | str | Path | None = None, *, samples: int | None = None,
             repeats: int | None = None, plugins: Sequence[str] = (), show_progress: bool = False
             ) -> dict[str, tuple[Any, Any]]:
    """``ditplan evaluate``: every metric of ``plan`` (default: dense) and of dense on the first ``samples``
    held-out samples, as ``{metric: (plan value, dense value)}``; ``repeats``: interleaved timing rounds
    (default ``evaluation.latency_repeats``)."""
    from ditplan.evaluators.evaluate import evaluate_plan
    from ditplan.workflow import checked_plan, prepare

    spec, adapter = prepare(experiment, plugins, evaluates=True)
    checked = checked_plan(plan, adapter, spec) if plan is not None else None
    if repeats is not None:
        spec = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"latency_repeats": repeats})})
    return evaluate_plan(spec, adapter, checked, show_progress=show_progress, samples=samples)


def generate(experiment: Experiment, plan: Plan | str | Path | None = None, out: str | Path | None = None, *,
             classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None, seed: int | None = None,
             num: int | None = None, plugins: Sequence[str] = ()) -> Path:
    """``ditplan generate``: sample ``classes`` (class-conditional models) or ``prompts`` (text models),
    ``num`` per condition from seed ``seed`` (defaults: the experiment's workload), under ``plan`` (default:
    dense), into ``out`` (default ``samples/<experiment name>``): ``grid.png`` and ``samples.safetensors``.
    ``plugins``: modules that register strategies or model families, imported first."""
    from ditplan.plugins import import_plugins
    from ditplan.samples import generate as _generate
    from ditplan.samples import with_workload
    from ditplan.workflow import checked_plan, prepare

    import_plugins(plugins)  # a plugin's family decides what the workload's conditions are
    spec, adapter = prepare(with_workload(load_spec(experiment), classes, prompts, seed, num))
    checked = checked_plan(plan, adapter, spec) if plan is not None else None
    return _generate(spec, adapter, out if out is not None else Path("samples") / spec.name, checked)


def compare(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """``ditplan compare``: the report of ``run_dirs`` side by side in ``out``; returns its Markdown file."""
    from ditplan.comparison.runs import compare_runs

    return compare_runs(list(run_dirs), out)


def export(run_dir: str | Path, rule: str, out: str | Path) -> list[Path]:
    """``ditplan export``: write the plans ``rule`` selects from ``run_dir`` (``knee``, ``top:3``,
    ``fastest:rel_l1<=0.05``, ``best:latency_ratio<=0.8``) into ``out``; returns their files."""
    from ditplan.comparison.export import export_plans

    return export_plans(run_dir, rule, out)


def sample(adapter: ModelAdapter, conditions: Sequence[Any], seeds: Sequence[int], settings: SamplerSettings,
           show_progress: bool = False, decode: bool = True) -> torch.Tensor:
    """Sample ``conditions`` (class labels or prompts), one seed each, with ``adapter``'s model under
    ``settings`` (scheduler, steps, guidance, batch size) in ditplan's own loop, with whatever plan is
    applied to it; images (N, C, H, W) in [-1, 1] (latents when ``decode`` is False)."""
    from ditplan.models.sampling import sample as _sample

    return _sample(adapter, conditions, seeds, settings, show_progress=show_progress, decode=decode)


def summary(plan_or_pipe: Any) -> str:
    """What a plan does in a few words: of a Plan, a plan file, or the plan applied to a pipeline or
    transformer (see :func:`ditplan.strategies.summary.describe`)."""
    from pathlib import Path

    from ditplan.plan import Plan, PlanError, load_plan
    from ditplan.strategies.apply import get_runtime
    from ditplan.strategies.pipeline import transformer_of
    from ditplan.strategies.summary import describe

    if isinstance(plan_or_pipe, (str, Path)):
        return describe(load_plan(plan_or_pipe))
    if isinstance(plan_or_pipe, Plan):
        return describe(plan_or_pipe)
    runtime = get_runtime(transformer_of(plan_or_pipe))
    if runtime is None:
        raise PlanError(f"no plan is applied to this {type(plan_or_pipe).__name__}; apply one with ditplan.apply_plan")
    return describe(runtime.plan)
