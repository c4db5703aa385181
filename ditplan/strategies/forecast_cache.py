"""``forecast_cache``: a run-time cache that forecasts the blocks it skips (cache-dit's DBCache, Fn/Bn, with its
TaylorSeer calibrator), on diffusers' hook machinery; diffusers has no such cache, so ditplan installs its own hooks.

At each transformer call the first ``fn`` blocks and the last ``bn`` blocks always compute. The relative change
of the first blocks' residual (their output − their input, first stream) since the last step that computed the
middle blocks decides, as FirstBlockCache's does, whether the middle blocks compute or are skipped. A skipped
step's middle blocks return their input plus a Taylor forecast of the middle unit's residual from its last
computed steps (:meth:`ditplan.strategies.block_forecast.BlockForecast.block_output`, stream by stream as the
family's :class:`~ditplan.models.family.BlockPattern` names them), instead of reusing the last one.

The state lives per diffusers cache context (one per guidance branch, so each branch forecasts from its own
history) in a :class:`~diffusers.hooks.hooks.StateManager`, reset by ``reset_stateful_hooks``::

    apply_forecast_cache(pipe.transformer, ForecastCacheConfig(threshold=0.1, order=1))
    with pipe.transformer.cache_context("cond"):
        out = pipe.transformer(...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ditplan.models.family import BlockPattern, family_of
from ditplan.plan import PlanError
from ditplan.strategies.block_forecast import BlockForecast, ForecastConfig

FORECAST_HEAD_HOOK = "ditplan_forecast_cache_head"
FORECAST_MIDDLE_HOOK = "ditplan_forecast_cache_middle"


@dataclass(frozen=True)
class ForecastCacheConfig:
    """threshold (float, 0.1): the middle blocks are skipped while the first blocks' residual changed less than this
    (mean |Δ| / mean |residual| against the last step that computed them); higher skips more steps, faster but
    further from dense; 0 never skips. fn (int, 1): first blocks that always compute and whose residual decides.
    bn (int, 1): last blocks that always compute (they correct what the forecast misses). order (int, 1): Taylor
    order of the skipped steps' forecast from the last ``order + 1`` computed steps (0 reuses the last residual;
    higher follows fast-changing residuals better but amplifies noise and keeps more of them). warmup (int, 2):
    the first calls of each cache context that always compute. max_skip (int, 3): at most this many calls in a row
    skip (0 never skips)."""

    threshold: float = 0.1
    fn: int = 1
    bn: int = 1
    order: int = 1
    warmup: int = 2
    max_skip: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.order <= 3:
            raise ValueError(f"order {self.order} is not supported; use 0 … 3 (0 reuses the last residual)")
        if self.fn < 1:
            raise ValueError(f"fn {self.fn}: at least the first block computes, its residual decides; use fn ≥ 1")
        for name in ("bn", "warmup", "max_skip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} is negative; use 0 or more")
        if self.threshold < 0:
            raise ValueError(f"threshold {self.threshold} is negative; use 0 (never skip) or more")


def check_fits(config: ForecastCacheConfig, num_blocks: int) -> None:
    """Refuse, in one line, a config whose first and last blocks leave no middle block of ``num_blocks`` to skip."""
    if config.fn + config.bn >= num_blocks:
        raise PlanError(f"forecast cache fn {config.fn} + bn {config.bn} leave none of the model's {num_blocks} blocks "
                        f"to skip; lower fn or bn so that fn + bn < {num_blocks}")


class ForecastCacheState(BaseState):
    """What one cache context keeps between calls: the first blocks' input of the call under way and their residual
    at the last computing call, the middle unit's ``(step, residual per stream)`` at its last computed calls and its
    input while it computes, the calls so far, those skipped in a row, and whether this call skips."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.head_input: torch.Tensor | None = None
        self.head_residual: torch.Tensor | None = None
        self.residuals: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.middle_input: dict[str, torch.Tensor] = {}
        self.calls = 0
        self.step = 0
        self.skipped_in_row = 0
        self.skip = False


class ForecastHeadHook(ModelHook):
    """On the first block: notes the call's step and the first stream's input (the first blocks' residual starts
    there)."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, pattern: BlockPattern) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.pattern = pattern

    def new_forward(self, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: ForecastCacheState = self.state_manager.get_state()
        step = self.state_manager.context.step_index
        state.step = state.calls if step is None else step  # a context without steps: its calls count them
        state.calls += 1
        state.head_input = self.pattern.streams_in(args, kwargs)[self.pattern.inputs[0]]
        return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class ForecastMiddleHook(ModelHook):
    """On each middle block: the first decides whether the call skips them (from the first blocks' residual, which
    ends at its input); when it skips, the first returns the forecast output of the whole middle unit and the others
    pass it on; when it computes, the last keeps the unit's residual for later forecasts."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, config: ForecastCacheConfig, pattern: BlockPattern,
                 is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.state_manager = state_manager
        self.config = config
        self.forecast = BlockForecast(ForecastConfig(config.order))
        self.pattern = pattern
        self.is_first = is_first
        self.is_last = is_last

    def new_forward(self, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state: ForecastCacheState = self.state_manager.get_state()
        streams = self.pattern.streams_in(args, kwargs)  # (B, N, C) per stream
        if self.is_first:
            self._decide(state, streams[self.pattern.inputs[0]] - state.head_input)
        if state.skip:
            if not self.is_first:
                return self.pattern.pack(streams)  # the middle unit's output, made by its first block
            history = state.residuals
            return self.pattern.pack({name: self.forecast.block_output(x, [(s, r[name]) for s, r in history], state.step)
                                      for name, x in streams.items() if name in history[-1][1]})
        if self.is_first:
            state.middle_input = streams
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last:
            state.residuals.append((state.step, {name: x - state.middle_input[name]
                                                 for name, x in self.pattern.streams_out(out).items()}))
            del state.residuals[: -self.forecast.history]
            state.middle_input = {}
        return out

    def _decide(self, state: ForecastCacheState, head_residual: torch.Tensor) -> None:
        """Whether this call skips the middle blocks: after the warm-up, with a computed residual to forecast from,
        fewer than ``max_skip`` calls skipped in a row, and the first blocks' residual close enough to the one of the
        last computing call; that residual is kept when the call computes."""
        state.head_input = None
        state.skip = (state.calls > self.config.warmup and bool(state.residuals)
                      and state.skipped_in_row < self.config.max_skip
                      and _relative_change(head_residual, state.head_residual) < self.config.threshold)
        if state.skip:
            state.skipped_in_row += 1
        else:
            state.skipped_in_row = 0
            state.head_residual = head_residual

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


@torch.compiler.disable
def _relative_change(residual: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |residual − previous| / mean |previous| (FirstBlockCache's measure)."""
    return ((residual - previous).abs().mean() / previous.abs().mean()).item()


def apply_forecast_cache(transformer: torch.nn.Module, config: ForecastCacheConfig) -> None:
    """Install the forecast cache on ``transformer`` (a diffusers transformer of a ditplan family, its blocks as the
    family lists them); each call must run inside a diffusers cache context. Refused in one line, before any hook is
    registered, when ``fn + bn`` leave no middle block. Example::

        apply_forecast_cache(pipe.transformer, ForecastCacheConfig(threshold=0.2, order=2))
        image = pipe(prompt).images[0]  # a CacheMixin transformer: its pipeline sets the cache context
    """
    family = family_of(transformer)
    blocks = family.blocks(transformer)
    check_fits(config, len(blocks))
    manager = StateManager(ForecastCacheState)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(
        ForecastHeadHook(manager, family.block_pattern(blocks[0])), FORECAST_HEAD_HOOK)
    middle = range(config.fn, len(blocks) - config.bn)
    for index in middle:
        hook = ForecastMiddleHook(manager, config, family.block_pattern(blocks[index]), index == middle[0],
                                  index == middle[-1])
        HookRegistry.check_if_exists_or_initialize(blocks[index]).register_hook(hook, FORECAST_MIDDLE_HOOK)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:  # NOTE: as CacheMixin.enable_cache: its cache of child registries misses the new hooks
        registry.invalidate_child_registries_cache()
