"""Run-time caches as a plan part: diffusers' FirstBlockCache, TaylorSeerCache and MagCache, and ditplan's forecast
cache.

diffusers' are installed with its ``apply_first_block_cache`` / ``apply_taylorseer_cache`` / ``apply_mag_cache``
(never re-implemented); the forecast cache, which diffusers lacks (cache-dit's DBCache with a Taylor forecast), with
ditplan's :func:`~ditplan.strategies.forecast_cache.apply_forecast_cache` on diffusers' hooks and cache contexts.
Their fields are plan parameters the search can tune (``CacheMethod.space``).
MagCache also needs its model's magnitude ratios at the plan's step count (``mag_ratios``, one per step):
diffusers' own calibration mode measures them on a dense run (:func:`calibrated_config`), and the plan
carries them, so a plan file runs on its own. DiT
and PixArt (and SD3) transformers are not diffusers ``CacheMixin`` models, so the plan's step hook sets the
diffusers cache context around every transformer call, as ``CacheMixin.cache_context`` would. Where one of
them breaks on a family (:data:`BROKEN`), a plan with it is refused in one line and ditplan's own block
caching (``reuse``, ``forecast``) or its forecast cache is the cache that runs there.

These caches decide at run time which blocks (FirstBlockCache) or attention modules (TaylorSeer)
compute, so a plan that carries one keeps every grid cell ``full`` (nothing of the plan's own reuse
can follow a run-time decision), and its cost is what ran: :class:`ExecutionCounter` counts the block
parts that executed in every call, and :func:`ditplan.evaluators.cost.executed_flops` turns the count
into FLOPs.

A plan file holds it as::

    cache: {method: first_block, config: {threshold: 0.1}}
    cache: {method: mag, config: {threshold: 0.06, mag_ratios: [1.0, 1.21, …]}}  # one ratio per step
    cache: {method: forecast_cache, config: {threshold: 0.2, order: 2}}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context
from diffusers.hooks.mag_cache import (
    _MAG_CACHE_BLOCK_HOOK,
    _MAG_CACHE_LEADER_BLOCK_HOOK,
)
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

from ditplan.models.context import StepContext, current_step
from ditplan.models.family import ModelAdapter, family_of
from ditplan.models.sampling import sample_batch
from ditplan.plan import Plan, PlanError
from ditplan.spec import SamplerSettings
from ditplan.strategies.forecast_cache import (
    FORECAST_HEAD_HOOK,
    FORECAST_MIDDLE_HOOK,
    ForecastCacheConfig,
    apply_forecast_cache,
    check_fits,
)
from ditplan.strategies.hooks import remove_hook

# (adapter, settings, conditions, seeds) → a config field's value, measured on a dense run of that batch
Calibration = Callable[[ModelAdapter, SamplerSettings, Sequence[Any], Sequence[int]], Any]


@dataclass(frozen=True)
class CacheMethod:
    """One run-time cache: its config class, the function that installs it (diffusers' own, or ditplan's where
    diffusers has none), the names of the hooks it registers (to remove them), the fields a plan may set, the values
    a search draws, and config values ditplan sets from the model's family where the plan sets none; for a cache
    that counts the sampling run's steps, the field that holds their count (ditplan sets it to the plan's), the
    fields measured on the model, one value per step (a plan carries them; :func:`calibrated_config` measures them),
    and a check of a config against the model's block count (a one-line :class:`PlanError`)."""

    config_class: type
    apply: Callable[[torch.nn.Module, Any], None]
    hook_names: tuple[str, ...]
    fields: tuple[str, ...]
    space: Mapping[str, Sequence[Any]]
    # config values ditplan sets from the model's family where the plan sets none
    family_defaults: Callable[[type[ModelAdapter]], Mapping[str, Any]] = lambda family: {}
    steps_field: str | None = None
    calibrated: Mapping[str, Calibration] = field(default_factory=dict)
    check_blocks: Callable[[Any, int], None] = lambda config, num_blocks: None
    library: str = "diffusers"  # whose cache it is (diffusers', or ditplan's own)


def calibrate_mag_ratios(adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any],
                         seeds: Sequence[int]) -> list[float]:
    """MagCache's magnitude ratios of ``adapter``'s model at ``settings``' step count, one per step: diffusers' own
    calibration (``MagCacheConfig(calibrate=True)``: nothing skipped, each step's ratio of its residual's norm to
    the last one's) over a dense run of ``(conditions, seeds)`` in ditplan's loop, averaged over the batches (by
    their samples) and, where guidance makes two calls per step, over the two calls (each has its own context)."""
    transformer, steps = adapter.transformer, settings.num_steps
    # NOTE: one step more than the run: diffusers ends a calibration after `num_inference_steps` steps by printing
    # the ratios and dropping them, so at the run's last step they are all still in the hooks' state.
    apply_mag_cache(transformer, MagCacheConfig(num_inference_steps=steps + 1, calibrate=True))
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(CacheContextHook(), CALIBRATION_HOOK)
    try:
        runs = [(len(seeds[i : i + settings.batch_size]), ratios)
                for i in range(0, len(seeds), settings.batch_size)
                for ratios in _mag_calibration_run(adapter, settings, conditions[i : i + settings.batch_size],
                                                   seeds[i : i + settings.batch_size])]
    finally:
        remove_hook(transformer, CALIBRATION_HOOK)
        remove_cache_hooks(transformer, "mag")
    total = sum(n for n, _ in runs)
    return [sum(n * ratios[step] for n, ratios in runs) / total for step in range(steps)]


def _mag_calibration_run(adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any],
                         seeds: Sequence[int]) -> list[list[float]]:
    """One dense run of a batch under MagCache's calibration hooks: the ratios each cache context recorded."""
    manager = _mag_state_manager(adapter.transformer)
    ratios: dict[str, list[float]] = {}

    def keep(*_: Any) -> None:  # after every step: the hooks' state is reset when the run ends
        ratios.update({name: list(state.calibration_ratios) for name, state in manager._state_cache.items()})

    sample_batch(adapter, conditions, seeds, settings, on_step=keep)
    return list(ratios.values())


def _mag_state_manager(transformer: torch.nn.Module) -> StateManager:
    """The state manager MagCache's hooks on ``transformer`` share (its leader block's)."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_MAG_CACHE_LEADER_BLOCK_HOOK) if registry is not None else None
        if hook is not None:
            return hook.state_manager
    raise PlanError(f"diffusers' MagCache found no transformer blocks on {type(transformer).__name__}")


CACHE_METHODS: dict[str, CacheMethod] = {
    # run the first block; skip the rest when its residual changed less than `threshold` (relative)
    "first_block": CacheMethod(
        FirstBlockCacheConfig, apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
        fields=("threshold",), space={"threshold": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3]},
    ),
    # compute attention every `cache_interval` steps after a warm-up, Taylor-forecast it in between
    "taylorseer": CacheMethod(
        TaylorSeerCacheConfig, apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,),
        fields=("cache_interval", "disable_cache_before_step", "disable_cache_after_step", "max_order",
                "cache_identifiers"),
        space={"cache_interval": [2, 3, 4, 5], "disable_cache_before_step": [1, 2, 3, 5], "max_order": [1, 2]},
        # NOTE: diffusers' default patterns ("^transformer_blocks.*attn", matched in full) hook no module of
        # DiT/PixArt, whose attention modules are attn1/attn2: the family names its attention modules.
        family_defaults=lambda family: {"cache_identifiers": [family.attention_names]},
    ),
    # after the first `retention_ratio` of the steps, skip every block (the last residual stands in) while the
    # error the model's magnitude ratios accumulate stays under `threshold`, at most `max_skip_steps` in a row
    "mag": CacheMethod(
        MagCacheConfig, apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
        fields=("threshold", "max_skip_steps", "retention_ratio", "mag_ratios"),
        space={"threshold": [0.02, 0.04, 0.06, 0.1, 0.15], "max_skip_steps": [1, 2, 3, 4, 5],
               "retention_ratio": [0.1, 0.2, 0.3]},
        steps_field="num_inference_steps",
        calibrated={"mag_ratios": calibrate_mag_ratios},
    ),
    # ditplan's: the first `fn` and last `bn` blocks always compute; the middle ones are skipped while the first
    # blocks' residual changed less than `threshold` (relative), at most `max_skip` calls in a row after `warmup`,
    # and their residual is Taylor-forecast (order `order`) from the last computed steps
    "forecast_cache": CacheMethod(
        ForecastCacheConfig, apply_forecast_cache, (FORECAST_HEAD_HOOK, FORECAST_MIDDLE_HOOK),
        fields=("threshold", "fn", "bn", "order", "warmup", "max_skip"),
        space={"threshold": [0.05, 0.1, 0.2, 0.3], "order": [1, 2], "max_skip": [2, 3, 4]},
        check_blocks=check_fits,
        library="ditplan",
    ),
}
CONTEXT_NAME = "ditplan"
CALIBRATION_HOOK = "ditplan_cache_calibration"
# (family, cache) → why diffusers' cache does not run on that family (diffusers 0.42)
BROKEN: dict[tuple[str, str], str] = {
    ("sd3", "first_block"): "diffusers' FirstBlockCache crashes on SD3 (its last block returns no text stream)",
}


def broken_on(family: str, method: str) -> str | None:
    """Why diffusers' cache ``method`` does not run on ``family``, or None when it does."""
    return BROKEN.get((family, method))


def remove_cache_hooks(transformer: torch.nn.Module, method: str) -> None:
    """Remove every hook diffusers' cache ``method`` installed, leaving no registry behind where none was."""
    for module in transformer.modules():
        for name in CACHE_METHODS[method].hook_names:
            remove_hook(module, name)


def calibrated_config(method: str, adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any],
                      seeds: Sequence[int]) -> dict[str, Any]:
    """The config fields of diffusers' cache ``method`` that are measured on the model (MagCache's ``mag_ratios``),
    from dense runs of ``(conditions, seeds)`` at ``settings``; {} for a cache that needs none. The model must carry
    no plan."""
    return {name: calibrate(adapter, settings, conditions, seeds)
            for name, calibrate in CACHE_METHODS[method].calibrated.items()}


@dataclass(frozen=True)
class DiffusersCache:
    """The ``cache`` part of a plan: which of diffusers' caches, the config fields the plan sets and its step
    count (the family of the model it is installed on fills in the rest, :meth:`config_for`)."""

    method: str
    fields: Mapping[str, Any]
    num_steps: int

    def settings(self) -> dict[str, Any]:
        """The config values the plan decides: its fields and, for a cache that counts steps, the plan's count."""
        steps_field = CACHE_METHODS[self.method].steps_field
        return {**({steps_field: self.num_steps} if steps_field else {}), **self.fields}

    def config_for(self, family: type[ModelAdapter]) -> Any:
        """diffusers' config object of this cache on a model of ``family``."""
        known = CACHE_METHODS[self.method]
        return known.config_class(**{**known.family_defaults(family), **self.settings()})

    @classmethod
    def from_config(cls, data: Any, num_steps: int) -> DiffusersCache:
        """The cache ``{method: NAME, config: {FIELD: VALUE}}`` describes for a plan of ``num_steps`` steps; a bad
        method, field or value, or calibrated values missing or not one per step, is a one-line :class:`PlanError`."""
        if not isinstance(data, Mapping) or set(data) - {"method", "config"}:
            raise PlanError("plan 'cache' must be a mapping {method: NAME, config: {FIELD: VALUE}}")
        method = CACHE_METHODS.get(data.get("method"))
        if method is None:
            raise PlanError(f"plan cache method {data.get('method')!r} is unknown; use one of {sorted(CACHE_METHODS)}")
        config = dict(data.get("config") or {})
        unknown = sorted(set(config) - set(method.fields))
        if unknown:
            raise PlanError(f"plan cache {data['method']!r} has no field {unknown[0]!r}; its fields are {list(method.fields)}")
        for name in method.calibrated:
            _check_per_step(data["method"], name, config.get(name), num_steps)
        cache = cls(data["method"], config, num_steps)
        try:
            method.config_class(**cache.settings())
            return cache
        except (TypeError, ValueError) as err:
            raise PlanError(f"plan cache {data['method']!r} config {config} is invalid: {err}") from None

    @classmethod
    def from_plan(cls, plan: Plan) -> DiffusersCache | None:
        """The plan's cache (None without one), refused when its grid or sparse part would compute anything else or
        its config does not fit the plan's block count."""
        if not plan.cache:
            return None
        cache = cls.from_config(plan.cache, plan.num_steps)
        known = CACHE_METHODS[cache.method]
        known.check_blocks(known.config_class(**cache.settings()), plan.num_layers)
        cells = plan.strategies() - {"full"}
        if cells or plan.sparse:
            raise PlanError(
                f"a plan with diffusers' {cache.method!r} cache keeps every grid cell 'full' and has no sparse part "
                f"(the cache decides at run time what computes); this one uses {sorted(cells) or 'a sparse layout'}"
            )
        return cache

    def install(self, transformer: torch.nn.Module) -> None:
        family = family_of(transformer)
        reason = broken_on(family.name, self.method)
        if reason:
            raise PlanError(f"{reason}; use ditplan's run-time forecast_cache or its block caching (reuse, forecast) there")
        CACHE_METHODS[self.method].apply(transformer, self.config_for(family))

    def remove(self, transformer: torch.nn.Module) -> None:
        remove_cache_hooks(transformer, self.method)

    @staticmethod
    @contextmanager
    def context(transformer: torch.nn.Module, context: StepContext) -> Iterator[None]:
        """diffusers' cache context around one transformer call (what ``CacheMixin.cache_context`` sets); with
        two calls per step, one per guidance branch, as their pipelines name them."""
        name = CONTEXT_NAME if context.branch is None else f"{CONTEXT_NAME}-{context.branch}"
        _set_cache_context(transformer, CacheContext(name, step_index=context.step,
                                                     num_inference_steps=context.num_steps))
        try:
            yield
        finally:
            _set_cache_context(transformer, None)


def _check_per_step(method: str, name: str, values: Any, num_steps: int) -> None:
    """Refuse a calibrated field of ``method`` that is missing or not one number per step of the plan."""
    fix = (f"calibrate them on the model at {num_steps} steps (ditplan.calibrated_config({method!r}, adapter, "
           "settings, conditions, seeds)); a search drawing this cache does it for you")
    if values is None:
        raise PlanError(f"plan cache {method!r} needs {name} (one per step, measured on the model): {fix}")
    if not isinstance(values, list) or len(values) != num_steps:
        count = f"{len(values)} {name}" if isinstance(values, list) else f"{name} {values!r}"
        raise PlanError(f"plan cache {method!r} has {count} but the plan runs {num_steps} steps: {fix}")


class CacheContextHook(ModelHook):
    """diffusers' cache context around each transformer call in ditplan's loop (the step it publishes), for a cache
    installed without a plan (a calibration run); a plan's step hook sets it for the plan's own cache."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with DiffusersCache.context(module, current_step()):
            return self.fn_ref.original_forward(*args, **kwargs)


class ExecutionCounter:
    """Counts the block parts that really ran in a sampling run: a block (its feed-forward), its
    self-attention and its cross-attention (their query projections run only when they compute), and
    the transformer calls (counted by the plan runtime)."""

    PARTS = ("block", "self_attention", "cross_attention")

    def __init__(self, transformer: torch.nn.Module) -> None:
        family = family_of(transformer)
        blocks = family.blocks(transformer)
        self.num_layers = len(blocks)
        self.reset()
        self._handles = []
        for layer, block in enumerate(blocks):
            cross = family.cross_attention_of(block)
            modules = {"block": family.block_probe(block), "self_attention": family.attention_of(block).to_q}
            if cross is not None:
                modules["cross_attention"] = cross.to_q
            for part, module in modules.items():
                self._handles.append(module.register_forward_pre_hook(
                    lambda *_, part=part, layer=layer: self._count(part, layer)))

    def _count(self, part: str, layer: int) -> None:
        self.counts[part][layer] += 1

    def reset(self) -> None:
        """Counts per part and layer, from zero."""
        self.counts = {part: [0] * self.num_layers for part in self.PARTS}
        self.calls = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
