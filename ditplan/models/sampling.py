"""ditplan's denoising loop on diffusers schedulers, with classifier-free guidance and step tracking.

Every sample has its own seed, so a sample does not depend on which batch it was drawn in. The loop
publishes the step index, CFG layout and run id (:mod:`ditplan.models.context`) and resets diffusers'
stateful hooks (an applied plan's caches) after each run, also a failed one. It knows no strategy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ditplan.models.context import BRANCHES, StepContext, current_step, new_run_id, step_context
from ditplan.models.family import ModelAdapter
from ditplan.models.identity import dtype_name
from ditplan.plan import PlanTarget
from ditplan.progress import progress_bar
from ditplan.registry import SCHEDULERS
from ditplan.spec import SamplerSettings


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class of the sampler ``name`` (:data:`~ditplan.registry.SCHEDULERS`)."""
    return getattr(diffusers, SCHEDULERS.get_entry(name).class_name)


def make_scheduler(adapter: ModelAdapter, name: str) -> SchedulerMixin:
    return scheduler_class(name).from_config({**adapter.scheduler_config, **SCHEDULERS.get_entry(name).overrides})


# Called after every step with (step index, latents after it, the live scheduler: copy what you keep).
StepCallback = Callable[[int, torch.Tensor, SchedulerMixin], None]
# (step index, scaled latents, timestep, transformer inputs) → guided prediction; greedy calibration
# replaces the default (one guided forward) with its own trial forwards.
PredictFn = Callable[[int, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def start_schedule(adapter: ModelAdapter, settings: SamplerSettings, device: torch.device) -> SchedulerMixin:
    """A fresh scheduler for ``settings``, its schedule set as the family's stock pipeline sets it."""
    scheduler = make_scheduler(adapter, settings.scheduler)
    adapter.set_timesteps(scheduler, settings.num_steps, device)
    return scheduler


def initial_noise(adapter: ModelAdapter, seeds: Sequence[int], device: torch.device) -> torch.Tensor:
    shape = (adapter.latent_channels, adapter.latent_size, adapter.latent_size)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)  # (N, C, H, W)


def guided_prediction(
    adapter: ModelAdapter, latents: torch.Tensor, t: torch.Tensor, inputs: dict, settings: SamplerSettings
) -> torch.Tensor:
    """One guided model prediction for ``latents`` (N, C, H, W), inside the step's published context."""
    if not settings.cfg:
        return adapter.predict(latents, t, inputs)
    cond, uncond = cfg_predictions(adapter, latents, t, inputs)
    return adapter.guide(cond, uncond, settings.cfg_scale)


def cfg_predictions(adapter: ModelAdapter, latents: torch.Tensor, t: torch.Tensor, inputs: dict
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional predictions for ``latents`` (N, C, H, W), from ``[cond; uncond]``
    ``inputs``: one transformer call on the 2N batch, or, for a family whose pipeline makes two calls per step,
    the conditional call then the unconditional one, each published as its branch of the current step."""
    if not adapter.two_calls():
        return adapter.predict(torch.cat([latents, latents]), t, inputs).chunk(2)
    n, context = latents.shape[0], current_step()
    out = []
    for branch, rows in zip(BRANCHES, (slice(0, n), slice(n, None))):
        with step_context(dataclasses.replace(context, branch=branch)) if context is not None else nullcontext():
            out.append(adapter.predict(latents, t, {k: v[rows] for k, v in inputs.items()}))
    return out[0], out[1]


def batch_inputs(adapter: ModelAdapter, conditions: Sequence[Any], settings: SamplerSettings,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """The transformer's conditioning inputs for one batch: ``[cond; uncond]`` halves with CFG; a
    guidance-distilled model also gets the scale as its ``guidance`` input (every row)."""
    inputs = adapter.conditioning(conditions, device).for_batch(settings.cfg)
    if settings.guidance == "embedded":
        rows = len(conditions) * (2 if settings.cfg else 1)
        inputs = {**inputs, "guidance": torch.full((rows,), float(settings.guidance_scale), device=device)}
    return inputs


@dataclass(frozen=True)
class Snapshot:
    """A trajectory just before step ``step``: its latents and a copy of its scheduler's state (a
    multistep solver keeps earlier predictions). :func:`sample_batch` can go on from it (``start``)."""

    step: int
    latents: torch.Tensor
    scheduler: SchedulerMixin


@torch.no_grad()
def sample_batch(
    adapter: ModelAdapter,
    conditions: Sequence[Any], seeds: Sequence[int],  # the batch: a condition and a seed per sample
    settings: SamplerSettings,
    on_step: StepCallback | None = None,
    predict: PredictFn | None = None,
    start: Snapshot | None = None,
) -> torch.Tensor:
    """Sample one batch; returns the final latents (N, C, H, W) (not decoded). ``start``: go on from a
    snapshot of a run of the same batch and settings (taken in ``on_step``) instead of from the noise."""
    device = next(adapter.transformer.parameters()).device
    if start is None:
        scheduler = start_schedule(adapter, settings, device)
        # NOTE: flow-matching schedulers start from unit noise and scale no model input
        latents = initial_noise(adapter, seeds, device) * getattr(scheduler, "init_noise_sigma", 1.0)
    else:
        scheduler, latents = copy.deepcopy(start.scheduler), start.latents.clone()
    inputs = batch_inputs(adapter, conditions, settings, device)
    run = new_run_id()
    first = start.step if start is not None else 0
    try:
        for i, t in enumerate(scheduler.timesteps[first:], start=first):
            with step_context(StepContext(step=i, num_steps=settings.num_steps, cfg=settings.cfg, run=run)):
                model_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
                if predict is None:
                    prediction = guided_prediction(adapter, model_in, t, inputs, settings)
                else:
                    prediction = predict(i, model_in, t, inputs)
            latents = scheduler.step(prediction, t, latents).prev_sample
            if on_step is not None:
                on_step(i, latents, scheduler)
    finally:
        # NOTE: state kept by hooks (an applied plan's caches) must not outlive the run, failed or not.
        reset_stateful_hooks(adapter.transformer)
    return latents


def reset_stateful_hooks(module: torch.nn.Module) -> None:
    """Reset the state of every stateful diffusers hook on ``module`` and its children."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks()


def sample(
    adapter: ModelAdapter,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    settings: SamplerSettings,
    show_progress: bool = False,
    decode: bool = True,
) -> torch.Tensor:
    """Sample a whole workload in batches of ``settings.batch_size``; images (N, C, H, W) in [-1, 1]."""
    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions but {len(seeds)} seeds; give one seed per sample")
    out = []
    size = settings.batch_size
    starts = range(0, len(seeds), size)
    with progress_bar(len(starts) * settings.num_steps, "denoising steps", enabled=show_progress) as bar:
        for start in starts:
            batch_conditions, batch_seeds = conditions[start : start + size], seeds[start : start + size]
            latents = sample_batch(adapter, batch_conditions, batch_seeds, settings, lambda *_: bar.update(1))
            out.append(adapter.decode(latents) if decode else latents)
    return torch.cat(out).cpu()


def target_settings(target: PlanTarget, family: type[ModelAdapter], num_steps: int | None = None) -> SamplerSettings:
    """The sampler settings a plan's target records, on a model of ``family`` (how it takes the guidance scale), at
    ``num_steps`` steps (default the target's)."""
    return SamplerSettings(target.scheduler, num_steps or target.num_steps, target.guidance_scale, batch_size=1,
                           guidance=family.guidance_modes[0], true_cfg_scale=target.true_cfg_scale)


def normalised_schedule(scheduler: SchedulerMixin) -> tuple[float, ...]:
    """Each step's time as a fraction of the training timesteps (1 = noise), from a scheduler whose schedule is set."""
    total = scheduler.config.num_train_timesteps
    return tuple(round(float(t) / total, 6) for t in scheduler.timesteps)


def plan_target(adapter: ModelAdapter, settings: SamplerSettings) -> PlanTarget:
    """What a plan for this model and sampler is made for."""
    return PlanTarget(
        model=adapter.model_id,
        weights_hash=adapter.weights_hash,
        num_layers=adapter.num_layers,
        num_tokens=adapter.num_tokens,
        scheduler=settings.scheduler,
        num_steps=settings.num_steps,
        guidance_scale=float(settings.guidance_scale),
        true_cfg_scale=float(settings.true_cfg_scale),
        schedule=normalised_schedule(start_schedule(adapter, settings, torch.device("cpu"))),
        dtype=dtype_name(adapter.dtype),
        cast_hashes=dict(adapter.cast_hashes),
    )
