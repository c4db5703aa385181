"""diffusers' own caches as a plan part: FirstBlockCache and TaylorSeerCache.

Installed with diffusers' ``apply_first_block_cache`` / ``apply_taylorseer_cache`` (never
re-implemented); their fields are plan parameters the search can tune (``CacheMethod.space``). DiT
and PixArt (and SD3) transformers are not diffusers ``CacheMixin`` models, so the plan's step hook sets the
diffusers cache context around every transformer call, as ``CacheMixin.cache_context`` would. Where one of
them breaks on a family (:data:`BROKEN`), a plan with it is refused in one line and ditplan's own block
caching (``reuse``, ``forecast``) is the cache that runs there.

These caches decide at run time which blocks (FirstBlockCache) or attention modules (TaylorSeer)
compute, so a plan that carries one keeps every grid cell ``full`` (nothing of the plan's own reuse
can follow a run-time decision), and its cost is what ran: :class:`ExecutionCounter` counts the block
parts that executed in every call, and :func:`ditplan.evaluators.cost.executed_flops` turns the count
into FLOPs.

A plan file holds it as::

    cache: {method: first_block, config: {threshold: 0.1}}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

from ditplan.models.context import StepContext
from ditplan.models.family import ModelAdapter, family_of
from ditplan.plan import Plan, PlanError
from ditplan.strategies.hooks import remove_hook


@dataclass(frozen=True)
class CacheMethod:
    """One of diffusers' caches: its config class, diffusers' function that installs it, the names of
    the hooks it registers (to remove them), the fields a plan may set, the values a search draws, and
    config values ditplan sets from the model's family where the plan sets none."""

    config_class: type
    apply: Callable[[torch.nn.Module, Any], None]
    hook_names: tuple[str, ...]
    fields: tuple[str, ...]
    space: Mapping[str, Sequence[Any]]
    # config values ditplan sets from the model's family where the plan sets none
    family_defaults: Callable[[type[ModelAdapter]], Mapping[str, Any]] = lambda family: {}


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
}
CONTEXT_NAME = "ditplan"
# (family, cache) → why diffusers' cache does not run on that family (diffusers 0.42)
BROKEN: dict[tuple[str, str], str] = {
    ("sd3", "first_block"): "diffusers' FirstBlockCache crashes on SD3 (its last block returns no text stream)",
}


def broken_on(family: str, method: str) -> str | None:
    """Why diffusers' cache ``method`` does not run on ``family``, or None when it does."""
    return BROKEN.get((family, method))


@dataclass(frozen=True)
class DiffusersCache:
    """The ``cache`` part of a plan: which of diffusers' caches, and the config fields the plan sets (the
    family of the model it is installed on fills in the rest, :meth:`config_for`)."""

    method: str
    fields: Mapping[str, Any]

    def config_for(self, family: type[ModelAdapter]) -> Any:
        """diffusers' config object of this cache on a model of ``family``."""
        known = CACHE_METHODS[self.method]
        return known.config_class(**{**known.family_defaults(family), **self.fields})

    @classmethod
    def from_config(cls, data: Any) -> DiffusersCache:
        """The cache ``{method: NAME, config: {FIELD: VALUE}}`` describes; a bad method, field or value is
        a one-line :class:`PlanError`."""
        if not isinstance(data, Mapping) or set(data) - {"method", "config"}:
            raise PlanError("plan 'cache' must be a mapping {method: NAME, config: {FIELD: VALUE}}")
        method = CACHE_METHODS.get(data.get("method"))
        if method is None:
            raise PlanError(f"plan cache method {data.get('method')!r} is unknown; use one of {sorted(CACHE_METHODS)}")
        config = dict(data.get("config") or {})
        unknown = sorted(set(config) - set(method.fields))
        if unknown:
            raise PlanError(f"plan cache {data['method']!r} has no field {unknown[0]!r}; its fields are {list(method.fields)}")
        try:
            method.config_class(**config)
            return cls(data["method"], config)
        except (TypeError, ValueError) as err:
            raise PlanError(f"plan cache {data['method']!r} config {config} is invalid: {err}") from None

    @classmethod
    def from_plan(cls, plan: Plan) -> DiffusersCache | None:
        """The plan's cache (None without one), refused when its grid or sparse part would compute anything else."""
        if not plan.cache:
            return None
        cache = cls.from_config(plan.cache)
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
            raise PlanError(f"{reason}; use ditplan's block caching (reuse, forecast) there")
        CACHE_METHODS[self.method].apply(transformer, self.config_for(family))

    def remove(self, transformer: torch.nn.Module) -> None:
        """Remove every hook the cache installed, leaving no registry behind where none was."""
        for module in transformer.modules():
            for name in CACHE_METHODS[self.method].hook_names:
                remove_hook(module, name)

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
