"""Run a plan in a stock diffusers pipeline's own ``__call__``, or in a user's own loop.

``apply_plan_to(pipe, plan)`` installs the plan on ``pipe.transformer`` and gives the transformer's
step hook a :class:`PipelineClock`, which maps the timestep each transformer call receives onto the
pipeline scheduler's ``timesteps`` (the step index) and knows the pipeline's guidance as its model family
declares it (DiT batches ``[cond; uncond]``, PixArt and SD3 ``[uncond; cond]``, Qwen-Image makes two calls per
step, FLUX.1 is distilled and makes two calls with its true CFG). The pipeline's ``__call__`` checks the
plan's sampler (scheduler family, guidance) before it runs and starts a new run; a call at another step count runs
the plan re-targeted (:mod:`ditplan.strategies.retarget`) and the applied plan is back after it.
A plan made for a fine-tuned SparseDiT network swaps that network's weights (and SDTM merges) into
the transformer; :func:`remove_plan_from` puts everything back exactly.

On a bare transformer the plan is installed the same way, and the user's loop says the step with
:func:`ditplan.models.context.denoising_step`.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

import torch

from ditplan.models.context import BRANCHES, CFG_ORDERS, StepContext, new_run_id
from ditplan.models.family import TWO_CALL_MODES, CfgMode, ModelAdapter, family_of, pipeline_family
from ditplan.models.identity import Binding, NetworkIdentity, binding, warn_cast
from ditplan.models.sampling import normalised_schedule, reset_stateful_hooks, scheduler_class
from ditplan.plan import Plan, PlanError, load_plan
from ditplan.registry import SCHEDULERS
from ditplan.strategies.apply import (
    CachePlanner,
    PlanRuntime,
    apply_plan,
    build_strategies,
    get_runtime,
    remove_plan,
    step_hook,
)
from ditplan.strategies.retarget import retarget, retarget_refusal
from ditplan.strategies.sparse_network import load_sparse_folder

_ORIGINAL_CLASS = "_ditplan_original_class"


def is_pipeline(model: Any) -> bool:
    return hasattr(model, "transformer") and hasattr(model, "scheduler")


def transformer_of(model: Any) -> torch.nn.Module:
    """The transformer a plan goes on: a pipeline's, or ``model`` itself; under ``torch.compile``'s wrapper
    the module it wraps."""
    transformer = model.transformer if is_pipeline(model) else model
    return getattr(transformer, "_orig_mod", transformer)


def scheduler_family(scheduler: Any) -> str | None:
    """The ditplan sampler name (:data:`~ditplan.registry.SCHEDULERS`) a diffusers scheduler object runs, or None."""
    for name, entry in SCHEDULERS.items():
        if type(scheduler) is scheduler_class(name) and all(scheduler.config.get(k) == v for k, v in entry.overrides.items()):
            return name
    return None


def sampler_description(name: str) -> str:
    entry = SCHEDULERS.get_entry(name)
    settings = ", ".join(f"{k}={v!r}" for k, v in entry.overrides.items())
    return f"{entry.class_name}({settings})"


class PipelineClock:
    """Derives each transformer call's step from the timestep it receives, against the pipeline
    scheduler's ``timesteps`` (as the family's pipeline passes them, e.g. FLUX's t / 1000, in the
    transformer's dtype: the nearest one); one transformer call per step, in order, within one pipeline call, or
    with guidance as two calls per step (Qwen-Image) the conditional then the unconditional call of each step."""

    def __init__(self, pipe: Any, cfg_mode: CfgMode, family: type[ModelAdapter], runtime: PlanRuntime) -> None:
        self.pipe = pipe
        self.runtime = runtime
        self.applied = runtime.planner  # the plan as applied; a call at another step count runs it re-targeted
        self.cfg_mode = cfg_mode
        self.cond_first = CFG_ORDERS.get(cfg_mode, True)
        self.two_calls = cfg_mode in TWO_CALL_MODES  # with guidance on: a conditional then an unconditional call
        self.family = family
        self.cfg = False
        self.run: int | None = None  # the pipeline call under way
        self.last_step = -1
        self.last_branch: str | None = None  # with two calls per step: the branch of the last call
        self.timesteps: list[float] | None = None  # the scheduler's, read at the call's first step
        self.tolerance = 0.0  # how far (relative) a call's timestep may lie from them, set with them

    def start(self, cfg: bool) -> None:
        """Called as the pipeline's ``__call__`` begins; ``cfg``: the call runs classifier-free guidance."""
        self.cfg = cfg
        self.run = new_run_id()
        self.last_step = -1
        self.last_branch = None
        self.timesteps = None

    def stop(self) -> None:
        self.run = None
        if self.runtime.planner is not self.applied:  # the call ran re-targeted: the applied plan back
            self.runtime.use(self.applied)

    def _retarget(self) -> None:
        """Run the applied plan re-targeted to the pipeline's step count for this call (with a warning)."""
        plan = retarget(self.applied.plan, normalised_schedule(self.pipe.scheduler))
        warnings.warn(f"plan made for {self.applied.plan.num_steps} steps runs re-targeted to {plan.num_steps} steps (its "
                      "rows mapped by normalised time); its quality and speed were measured at "
                      f"{self.applied.plan.num_steps}: `ditplan retarget` writes the re-targeted plan to evaluate",
                      UserWarning, stacklevel=1)
        self.runtime.use(CachePlanner(plan, build_strategies(plan)))

    def context_for(self, args: tuple, kwargs: dict) -> StepContext:
        if self.run is None:
            raise PlanError("the plan was applied to the pipeline, so call the pipeline (pipe(...)), not its transformer; "
                            "in your own loop wrap each transformer call in `with ditplan.denoising_step(i, num_steps):`")
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is None:
            raise PlanError("the transformer was called without a timestep, so the plan cannot tell the step")
        t = torch.as_tensor(timestep).flatten()[0].item()
        if self.timesteps is None:  # the pipeline sets its schedule before the first transformer call
            self.timesteps = [self.family.pipeline_timestep(float(v)) for v in self.pipe.scheduler.timesteps]
            # a pipeline may round the timestep to the transformer's dtype and scale it there (FLUX: t / 1000)
            self.tolerance = 2 * torch.finfo(next(transformer_of(self.pipe).parameters()).dtype).eps
            if len(self.timesteps) != self.applied.plan.num_steps:
                self._retarget()
        branch = None
        if self.cfg and self.two_calls:
            branch = BRANCHES[1] if self.last_branch == BRANCHES[0] else BRANCHES[0]
        step = self._step_of(t, again=branch == BRANCHES[1])
        self.last_step, self.last_branch = step, branch
        return StepContext(step=step, num_steps=len(self.timesteps), cfg=self.cfg, cond_first=self.cond_first,
                           run=self.run, branch=branch)

    def _step_of(self, t: float, again: bool) -> int:
        """The step of a call at timestep ``t``: the next one, or (``again``: the second call of a step) the last."""
        timesteps, tolerance = self.timesteps, self.tolerance
        expected = self.last_step if again else self.last_step + 1
        distance = [abs(v - t) for v in timesteps]
        nearest = min(range(len(timesteps)), key=distance.__getitem__)
        if distance[nearest] > tolerance * abs(t):
            raise PlanError(f"the transformer got timestep {t:g}, which the scheduler's {len(timesteps)} timesteps do not "
                            "hold; a ditplan plan runs on the pipeline's own schedule")
        if not 0 <= expected < len(timesteps) or distance[expected] > distance[nearest]:
            calls = "two transformer calls per step (conditional, then unconditional)" if self.cfg and self.two_calls \
                else "exactly one transformer call per step"
            raise PlanError(f"the transformer was called for step {nearest} (timestep {t:g}) after step {self.last_step} "
                            f"of this pipeline call; a ditplan plan needs {calls}, in order")
        return expected


def check_pipeline_call(pipe: Any, plan: Plan, arguments: dict[str, Any], family: type[ModelAdapter],
                        cfg_mode: CfgMode) -> None:
    """Refuse a pipeline call whose scheduler family or guidance the plan was not made for, or whose step count it
    cannot be re-targeted to."""
    target = plan.target
    scheduler = scheduler_family(pipe.scheduler)
    differences = []
    if scheduler != target.scheduler:
        differences.append(f"scheduler: plan has {target.scheduler!r}, pipeline has {type(pipe.scheduler).__name__}")
    steps = arguments.get("num_inference_steps")
    custom = arguments.get("timesteps") is not None or arguments.get("sigmas") is not None
    refusal = retarget_refusal(plan)
    if not custom and steps != target.num_steps and refusal:  # else the call runs it re-targeted
        differences.append(f"steps: plan has {target.num_steps}, call has num_inference_steps={steps}, and {refusal}")
    guidance, cfg, true_cfg = family.pipeline_guidance(arguments, cfg_mode)
    argument = family.guidance_argument
    if guidance is not None and float(guidance) != target.guidance_scale:
        differences.append(f"guidance scale: plan has {target.guidance_scale}, call has {argument}={guidance}")
    elif cfg_mode != "distilled" and target.guidance_scale > 1.0 and not cfg:
        differences.append("guidance: the plan runs classifier-free guidance, this call does not (give its negative "
                           "prompt or negative prompt embeddings)")
    if true_cfg != target.true_cfg_scale:
        differences.append(f"true CFG scale: plan has {target.true_cfg_scale}, call runs {true_cfg} (true_cfg_scale > 1 "
                           "with a negative prompt turns it on)")
    if differences:
        raise PlanError(
            f"plan made for {target.model} does not fit this pipeline call: " + "; ".join(differences)
            + f" — call with num_inference_steps={target.num_steps}, {argument}={target.guidance_scale} and "
            f"pipe.scheduler = {sampler_description(target.scheduler)}, or make a plan for these settings"
        )


def _planned_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``__call__`` of a pipeline with a plan: check the call, run it as one sampling run."""
    original = getattr(self, _ORIGINAL_CLASS)
    transformer = transformer_of(self)
    runtime = get_runtime(transformer)
    if runtime is None:  # the plan was removed from the transformer itself: the pipeline is stock again
        remove_plan_from(self)
        return original.__call__(self, *args, **kwargs)
    bound = inspect.signature(original.__call__).bind(self, *args, **kwargs)
    bound.apply_defaults()
    clock = step_hook(transformer).clock
    check_pipeline_call(self, runtime.plan, bound.arguments, clock.family, clock.cfg_mode)
    clock.start(clock.family.pipeline_guidance(bound.arguments, clock.cfg_mode)[1])
    try:
        return original.__call__(self, *args, **kwargs)
    finally:
        clock.stop()
        # NOTE: caches of a failed call must not leak into the next one.
        reset_stateful_hooks(transformer)


_PLANNED_CLASSES: dict[type, type] = {}


def _planned_class(cls: type) -> type:
    """``cls`` with :func:`_planned_call` as ``__call__``, under the same name (``save_pretrained`` writes it)."""
    if cls not in _PLANNED_CLASSES:
        _PLANNED_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": _planned_call, "__module__": cls.__module__,
                                                             "__qualname__": cls.__qualname__})
    return _PLANNED_CLASSES[cls]


def _network_for(transformer: torch.nn.Module, plan: Plan, model_folder: str | Path | None
                 ) -> tuple[dict[str, torch.Tensor], torch.nn.ModuleList] | None:
    """The fine-tuned SparseDiT network the plan names, as (transformer state dict, merges), or None."""
    weights = (plan.sparse or {}).get("weights")
    if not weights:
        return None
    base = model_folder or transformer.config.get("_name_or_path")
    if not base or not Path(base).is_dir():
        raise PlanError(f"plan runs on the fine-tuned SparseDiT network {weights!r}, found next to the base model's "
                        "weights, but this transformer was not loaded from a local folder; pass model_folder=")
    _, tuned, merges = load_sparse_folder(type(transformer), Path(base), weights)
    weight = next(transformer.parameters())
    return tuned.state_dict(), (merges.to(weight.device, weight.dtype) if merges is not None else None)


def apply_plan_to(model: Any, plan: Plan | str | Path, model_folder: str | Path | None = None) -> PlanRuntime:
    """Install ``plan`` (a Plan or a plan file) on a stock diffusers pipeline of a known family, so that
    ``pipe(...)`` runs it, or on a bare transformer (your loop tells the step with ``denoising_step``).

    Checked here: the plan's layer count and weights (after swapping in the fine-tuned SparseDiT network a
    plan names, from ``model_folder``, default the folder the transformer was loaded from; the same weights
    in another dtype or on another device take the plan, with a warning in another dtype);
    at each pipeline call: scheduler family, step count, guidance scale. Undo with :func:`remove_plan_from`.
    """
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    pipeline = is_pipeline(model)
    transformer = transformer_of(model)
    if get_runtime(transformer) is not None:
        raise PlanError("a plan is already applied here; call ditplan.remove_plan first")
    cfg_order = pipeline_family(model)[1] if pipeline else None
    network = _network_for(transformer, plan, model_folder)
    # NOTE: kept on the CPU, so a swapped-in network does not double the weights' device memory
    original = {k: v.detach().to("cpu", copy=True) for k, v in transformer.state_dict().items()} if network else None
    try:
        if network is not None:
            transformer.load_state_dict(network[0])
        merges = network[1] if network else None
        layers = len(family_of(transformer).blocks(transformer))
        if layers != plan.num_layers:
            raise PlanError(f"plan is for {plan.num_layers} layers but this model has {layers}")
        found = NetworkIdentity(transformer, merges)
        bound = binding(plan.target, found)
        if bound is Binding.OTHER:
            raise PlanError(f"plan was made for weights {plan.target.weights_hash} ({plan.target.model}), but this "
                            f"transformer's weights are {found.weights_hash}; make a plan for this model")
        runtime = apply_plan(transformer, plan, merges=merges)
    except BaseException:
        if original is not None:
            transformer.load_state_dict(original)
        raise
    runtime.original_weights = original
    if bound is Binding.CAST:
        warn_cast(plan.target, found)
    if pipeline:
        step_hook(transformer).clock = PipelineClock(model, cfg_order, family_of(transformer), runtime)
        setattr(model, _ORIGINAL_CLASS, type(model))
        model.__class__ = _planned_class(type(model))
    return runtime


def remove_plan_from(model: Any) -> None:
    """Undo :func:`apply_plan_to`: processors, hooks, weights and the pipeline's class, exactly."""
    pipeline = is_pipeline(model)
    if pipeline and _ORIGINAL_CLASS in model.__dict__:
        model.__class__ = model.__dict__.pop(_ORIGINAL_CLASS)
    remove_plan(transformer_of(model))
