"""Install a plan on a diffusers transformer and remove it again, exactly.

Each self-attention module (``attn1`` of every block) gets a :class:`PlanAttnProcessor` through
diffusers' own ``set_processor``; it looks up the strategy of its (step, layer) cell at every call.
The transformer itself gets a stateful diffusers hook (:class:`PlanStepHook`) that, at each call,
takes the step from the loop that publishes it (ditplan's own loop, :func:`denoising_step` in a
user's loop) or from a :class:`StepClock` (a stock pipeline, :mod:`ditplan.strategies.pipeline`),
starts empty caches at each new sampling run and is reset by diffusers' ``reset_stateful_hooks``.
The original processor objects are kept and put back by :func:`remove_plan`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ditplan.models.context import StepContext, current_step, step_context
from ditplan.models.family import BlockPattern, ModelAdapter, family_of
from ditplan.models.sampling import plan_target, sample
from ditplan.plan import Plan, PlanError, PlanTarget
from ditplan.spec import SamplerSettings
from ditplan.strategies.base import (
    BLOCK_ENTRY,
    STRATEGIES,
    AttentionCall,
    BlockStrategy,
    Strategy,
    get_strategy_class,
    is_block_strategy,
)
from ditplan.strategies.diffusers_cache import (
    DiffusersCache,
    ExecutionCounter,
    broken_on,
)
from ditplan.strategies.guidance import GuidanceRunner, GuidanceSchedule
from ditplan.strategies.hooks import remove_hook
from ditplan.strategies.joint import JointTokens
from ditplan.strategies.sdtm import SparseLayout, SparseRuntime
from ditplan.strategies.sparse_network import load_for_plan, new_merges

_RUNTIME_ATTR = "_ditplan_runtime"
STEP_HOOK = "ditplan_plan_step"
UNKNOWN_STEP_OF_BLOCK = (
    "a block of a transformer with a ditplan plan was called on its own, so the step is unknown; call the "
    "transformer, or wrap the call in `with ditplan.denoising_step(i, num_steps):`"
)
BLOCK_HOOK = "ditplan_block_cache"


def sparse_layout(plan: Plan) -> SparseLayout | None:
    """The plan's validated SparseDiT layout, or None; the grid must hold the layout's fixed cells."""
    if not plan.sparse:
        return None
    try:
        layout = SparseLayout.from_dict(plan.sparse)
        layout.validate(plan.num_layers, plan.target.num_tokens)
    except ValueError as err:
        raise PlanError(str(err)) from None
    for layer, method in sorted(layout.fixed_cells().items()):
        for step in range(plan.num_steps):
            cell = plan.method(step, layer)
            if cell != method and not is_block_strategy(cell):
                raise PlanError(
                    f"layer {layer} uses {cell!r} at step {step}, but the plan's sparse layout {layout.name} needs "
                    f"{method!r} there at every step, or a block-caching cell ({', '.join(_block_cells())}) that skips it"
                )
    for start, end in layout.modules:
        for step in range(plan.num_steps):
            cells = sorted({plan.method(step, layer) for layer in range(start, end)})
            if len(cells) > 1:
                raise PlanError(
                    f"SDTM module [{start}, {end}) mixes {cells} at step {step}; a module computes or is skipped as "
                    "a whole: give its blocks one cell at each step"
                )
    return layout


def _block_cells() -> list[str]:
    return sorted(name for name in STRATEGIES if is_block_strategy(name))


def block_units(num_layers: int, layout: SparseLayout | None) -> list[tuple[int, int]]:
    """The blocks each block is cached with, as ``(start, end)``: an SDTM module's blocks as one (dense tokens in
    and out, so the module has a residual; its inner blocks' token counts change by step), every other block alone."""
    units = [(layer, layer + 1) for layer in range(num_layers)]
    for start, end in layout.modules if layout is not None else ():
        units[start:end] = [(start, end)] * (end - start)
    return units


def build_strategies(plan: Plan, extra: tuple[str, ...] = ()) -> dict[str, Strategy]:
    """The configured, validated strategy object of every name the plan uses (plus ``extra`` names)."""
    strategies = {}
    for name in sorted(plan.strategies() | set(extra)):
        try:
            strategy = get_strategy_class(name).from_params(plan.params.get(name))
            strategy.validate(plan.target.num_tokens)
        except (TypeError, ValueError) as err:
            raise PlanError(str(err)) from None
        strategies[name] = strategy
    return strategies


class CachePlanner:
    """Which cache entries each (step, layer) cell must keep, derived from the plan alone.

    An entry is kept after a step only while a later step of the layer reads it before another step
    rewrites it; so caches are freed as soon as nothing needs them.
    """

    def __init__(self, plan: Plan, strategies: dict[str, Strategy], open_ended: bool = False,
                 steps: Sequence[int] | None = None) -> None:
        """``open_ended``: later steps are not decided yet (greedy calibration), so every entry that
        some known strategy reads is kept, made as the first such strategy defines it. ``steps``: the steps
        this stream of calls runs (default all; the unconditional branch of a plan whose guidance skips some)."""
        self.plan = plan
        self.strategies = strategies
        self.open_ended = open_ended
        self.steps = tuple(range(plan.num_steps)) if steps is None else tuple(steps)
        self._check_reads_are_written()
        self._block_history = self._later_block_history()

    def strategy_at(self, step: int, layer: int) -> Strategy:
        return self.strategies[self.plan.method(step, layer)]

    def next_reader(self, step: int, layer: int, entry: str) -> Strategy | None:
        """The strategy of the first later step that reads ``entry`` before a step rewrites it."""
        if self.open_ended:
            return next((s for _, s in sorted(self.strategies.items()) if entry in s.reads), None)
        for later in (s for s in self.steps if s > step):
            strategy = self.strategy_at(later, layer)
            if entry in strategy.reads:
                return strategy
            if entry in cell_writes(strategy):
                return None
        return None

    def block_history(self, step: int, layer: int) -> int:
        """How many computed residuals of block ``layer`` the block-level cells after ``step`` still use."""
        return self._block_history[step][layer]

    def _later_block_history(self) -> list[list[int]]:
        """``block_history`` of every (step, layer): the largest history of a later block-level cell
        (open-ended: of every known block strategy)."""
        if self.open_ended:
            most = max((s.history for s in self.strategies.values() if isinstance(s, BlockStrategy)), default=0)
            return [[most] * self.plan.num_layers for _ in range(self.plan.num_steps)]
        table = [[0] * self.plan.num_layers for _ in range(self.plan.num_steps)]
        for step, after in reversed(list(zip(self.steps, self.steps[1:]))):  # each step and the stream's next one
            for layer in range(self.plan.num_layers):
                later = self.strategy_at(after, layer)
                own = later.history if isinstance(later, BlockStrategy) else 0
                table[step][layer] = max(own, table[after][layer])
        return table

    def wants(self, step: int, layer: int) -> frozenset[str]:
        writes = self.strategy_at(step, layer).writes
        return frozenset(e for e in writes if self.next_reader(step, layer, e) is not None)

    def _check_reads_are_written(self) -> None:
        for layer in range(self.plan.num_layers):
            written: set[str] = set()
            made_for: dict[str, Strategy] = {}  # entry → the first strategy that reads it since it was made
            for step in self.steps:
                strategy = self.strategy_at(step, layer)
                missing = strategy.reads - written
                if missing:
                    raise PlanError(
                        f"layer {layer} uses {strategy.name!r} at step {step}, which reuses the {sorted(missing)[0]} "
                        f"of an earlier step, but no earlier step of that layer computes it; make an earlier step 'full'"
                    )
                for entry in strategy.reads:
                    first = made_for.setdefault(entry, strategy)
                    if first.cache_format(entry) != strategy.cache_format(entry):
                        raise PlanError(
                            f"layer {layer} reads one {entry} with {first.name!r} and, at step {step}, with "
                            f"{strategy.name!r}, which needs it made differently; give both the same parameters"
                        )
                made_for = {e: s for e, s in made_for.items() if e not in cell_writes(strategy)}
                written |= cell_writes(strategy)


def cell_writes(strategy: Strategy) -> frozenset[str]:
    """The cache entries a cell refreshes: its strategy's own, and the block residual wherever the block
    computes (any attention-level cell)."""
    return strategy.writes | ({BLOCK_ENTRY} if strategy.level == "attention" else frozenset())


@dataclass
class CallState:
    """What one stream of transformer calls keeps between steps: per layer, the attention cache entries and
    (a unit's first block: see :func:`block_units`) the ``(step, output − input per token stream)`` of its last
    computed steps while block-level cells read them, and a unit's input until its end."""

    caches: list[dict[str, Any]]
    block_residuals: list[list[tuple[int, dict[str, torch.Tensor]]]]
    unit_inputs: dict[int, dict[str, torch.Tensor]]

    @classmethod
    def empty(cls, num_layers: int) -> CallState:
        return cls([{} for _ in range(num_layers)], [[] for _ in range(num_layers)], {})


class PlanRuntime:
    """The plan installed on one transformer, its strategies and the per-layer caches of a run.

    The caches belong to a stream of calls (:class:`CallState`): one per guidance branch when guidance runs as
    two calls per step (each branch reuses its own earlier steps), and one per greedy calibration micro-batch
    (``chunk``). ``frozen`` (trial forwards during greedy calibration) reads caches but writes and frees nothing.
    """

    def __init__(self, plan: Plan, strategies: dict[str, Strategy], originals: list[Any],
                 sparse: SparseRuntime | None = None) -> None:
        self.use(CachePlanner(plan, strategies))
        self.sparse = sparse
        self.originals = originals
        self.states: dict[tuple[int, str | None], CallState] = {}
        self.chunk = 0  # greedy calibration's micro-batch
        self.branch: str | None = None  # the guidance branch of the call under way (two calls per step)
        # per (chunk, layer): what the conditional call of a step leaves for the unconditional one (ASC)
        self.between_calls: dict[tuple[int, int], dict[str, Any]] = {}
        self.frozen = False
        self.peak_cache_bytes = 0
        self.run: int | None = None  # the sampling run the caches belong to
        self.last_step = -1
        # the transformer's own weights while a fine-tuned SparseDiT network's are swapped in
        self.original_weights: dict[str, torch.Tensor] | None = None
        self.diffusers_cache: DiffusersCache | None = None  # the run-time cache the plan carries (diffusers' or ditplan's)
        self.executed: ExecutionCounter | None = None  # what ran, when that is decided at run time
        self.block_layers: list[int] = []  # the blocks with a BlockCacheHook
        self.joint: JointTokens | None = None  # the token layout of a joint attention (set when applied)

    def use(self, planner: CachePlanner) -> None:
        """Run ``planner``'s plan from now on: its cache planning and its guidance, with the unconditional branch's
        own cache planning over the steps that compute it where the guidance skips some."""
        self.planner = planner
        schedule = GuidanceSchedule.from_plan(planner.plan)
        self.uncond_planner = CachePlanner(planner.plan, planner.strategies, steps=schedule.computed_steps) if schedule else None
        self.guidance = GuidanceRunner(schedule) if schedule else None

    def drop_between(self) -> None:
        """Free what the conditional call of this step left for an unconditional call that does not run."""
        for key in [k for k in self.between_calls if k[0] == self.chunk]:
            del self.between_calls[key]

    @property
    def state(self) -> CallState:
        """The caches of the call under way."""
        key = (self.chunk, self.branch)
        if key not in self.states:
            self.states[key] = CallState.empty(len(self.originals))
        return self.states[key]

    @property
    def caches(self) -> list[dict[str, Any]]:
        return self.state.caches

    @property
    def block_residuals(self) -> list[list[tuple[int, dict[str, torch.Tensor]]]]:
        return self.state.block_residuals

    @property
    def unit_inputs(self) -> dict[int, dict[str, torch.Tensor]]:
        return self.state.unit_inputs

    def between(self, layer: int) -> dict[str, Any]:
        """What the conditional call of this step left for the unconditional one at ``layer``."""
        return self.between_calls.setdefault((self.chunk, layer), {})

    @property
    def plan(self) -> Plan:
        return self.planner.plan

    @property
    def stream_planner(self) -> CachePlanner:
        """The cache planner of the call under way: the unconditional branch's where the plan's guidance skips
        some of its steps, else the plan's."""
        return self.uncond_planner if self.branch == "uncond" and self.uncond_planner is not None else self.planner

    def wants(self, step: int, layer: int) -> frozenset[str]:
        if self.frozen:
            return frozenset()
        return self.stream_planner.wants(step, layer)

    def after_call(self, step: int, layer: int) -> None:
        """Free what no later step reads; track the peak cache size."""
        if self.frozen:
            return
        cache = self.caches[layer]
        for entry in [e for e in cache if self.stream_planner.next_reader(step, layer, e) is None]:
            del cache[entry]
        self.note_peak()

    def note_peak(self) -> None:
        """Called after the caches change: track their peak size."""
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def cache_bytes(self) -> int:
        # NOTE: an opaque strategy caches what the attention module returned: a tensor, or a tuple (joint attention)
        entries = [v for state in self.states.values() for cache in state.caches for v in cache.values()]
        entries += [v for shared in self.between_calls.values() for v in shared.values()]
        entries += [streams for state in self.states.values() for residuals in state.block_residuals
                    for _, streams in residuals]
        return sum(t.numel() * t.element_size() for t in _tensors(entries))

    def enter(self, context: StepContext) -> None:
        """Called at every transformer call: check the step count, and start empty caches when the call
        belongs to a new sampling run (another run id, or a step lower than the last one)."""
        if context.num_steps != self.plan.num_steps:
            raise PlanError(
                f"plan has {self.plan.num_steps} steps but the sampler runs {context.num_steps}; "
                "sample with the plan's step count or make a plan for this one"
            )
        if context.run != self.run or (context.run is None and context.step < self.last_step):
            self.reset()
            self.run = context.run
            if self.executed is not None:
                self.executed.reset()  # the counts describe the latest run
        if self.executed is not None:
            self.executed.calls += 1
        self.last_step = context.step
        self.branch = context.branch

    def reset(self) -> None:
        self.states.clear()
        self.between_calls.clear()
        if self.guidance is not None:
            self.guidance.reset()
        if self.sparse is not None:
            self.sparse.reset()
        self.last_step = -1


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a cache entry: a tensor, or tuples, lists and dicts of them (other values skipped)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        yield from _tensors(list(value.values()))


class StepClock(Protocol):
    """Derives the step of a transformer call that no loop published (see ``pipeline.PipelineClock``)."""

    def context_for(self, args: tuple, kwargs: dict) -> StepContext:
        """Called at each transformer call without a published step; raises ``PlanError`` when the call
        does not fit the schedule."""


class PlanStepHook(ModelHook):
    """The transformer-level hook of an applied plan: publishes the step for the plan's processors and
    hooks during the forward, and owns the run's state (``reset_state`` clears the caches)."""

    _is_stateful = True

    def __init__(self, runtime: PlanRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.clock: StepClock | None = None  # set when the plan is applied to a pipeline

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        context = current_step()
        if context is None:
            if self.clock is None:
                raise PlanError(
                    "a ditplan plan is applied to this transformer but the denoising step is unknown: apply the plan "
                    "to the diffusers pipeline instead (ditplan.apply_plan(pipe, plan)), wrap each call in "
                    "`with ditplan.denoising_step(i, num_steps):`, or remove_plan first"
                )
            context = self.clock.context_for(args, kwargs)
        guidance = self.runtime.guidance
        if guidance is None:
            return self._call(module, context, args, kwargs)
        return guidance.forward(lambda ctx, a, k: self._call(module, ctx, a, k), context, args, kwargs, self.runtime.chunk,
                                self.runtime.drop_between)

    def _call(self, module: torch.nn.Module, context: StepContext, args: tuple, kwargs: dict) -> Any:
        """The transformer's own forward, as the call of ``context``."""
        self.runtime.enter(context)
        cache = self.runtime.diffusers_cache
        with step_context(context), cache.context(module, context) if cache is not None else nullcontext():
            return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.runtime.reset()
        return module


class BlockCacheHook(ModelHook):
    """On each block of a unit (:func:`block_units`) whose plan row has block-level cells: at those steps the
    unit's first block returns the strategy's output for the whole unit and its other blocks pass it on; at
    computed steps the unit keeps its residual (its last block's output − its first block's input) while later
    block-level cells need it. A block with several token streams (joint attention's image and text) is
    cached stream by stream, as its family's :class:`~ditplan.models.family.BlockPattern` names them."""

    def __init__(self, runtime: PlanRuntime, layer: int, unit: tuple[int, int], pattern: BlockPattern) -> None:
        super().__init__()
        self.runtime = runtime
        self.layer = layer
        self.unit = unit
        self.pattern = pattern

    def new_forward(self, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        runtime, layer, (start, end) = self.runtime, self.layer, self.unit
        context = current_step()  # published by the plan's step hook around the transformer call
        if context is None:
            raise PlanError(UNKNOWN_STEP_OF_BLOCK)
        step = context.step
        strategy = runtime.planner.strategy_at(step, start)
        residuals = runtime.block_residuals[start]
        streams = self.pattern.streams_in(args, kwargs)
        if isinstance(strategy, BlockStrategy):
            if layer != start:
                return self.pattern.pack(streams)  # the unit's output, made by its first block
            out = {name: strategy.block_output(x, [(s, r[name]) for s, r in residuals], step)
                   for name, x in streams.items() if name in residuals[-1][1]}  # the streams the block returns
            if not runtime.frozen and runtime.stream_planner.block_history(step, start) == 0:
                residuals.clear()  # the last reader
            return self.pattern.pack(out)
        if layer == start:
            runtime.unit_inputs[start] = streams
        out = self.fn_ref.original_forward(*args, **kwargs)  # (B, N, C) per stream at the unit's end
        if layer == end - 1:
            unit_input = runtime.unit_inputs.pop(start)
            if not runtime.frozen:
                keep = runtime.stream_planner.block_history(step, start)
                if keep:  # the residual is only made while a later block-level cell reads it
                    residuals.append((step, {n: x - unit_input[n] for n, x in self.pattern.streams_out(out).items()}))
                del residuals[: max(0, len(residuals) - keep)]
                runtime.note_peak()
        return out


class PlanAttnProcessor:
    """The attention processor ditplan installs: dispatches each call to the plan's strategy. Arguments an
    attention module passes by position (FLUX's) are named as its original processor names them."""

    def __init__(self, runtime: PlanRuntime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer
        signature = inspect.signature(runtime.originals[layer].__call__)
        self.positional = list(signature.parameters)[2:]  # after (attn, hidden_states)

        # NOTE: diffusers' Attention passes a processor only the keyword arguments its ``__call__`` names (read with
        # inspect.signature(processor.__call__)); this instance attribute shows it the original's names (Qwen-Image's
        # mask and RoPE), while calls still go to the class's __call__.
        def named_like_the_original(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        named_like_the_original.__signature__ = signature  # type: ignore[attr-defined]
        self.__call__ = named_like_the_original

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        context = current_step()
        runtime = self.runtime
        if context is None:
            raise PlanError(UNKNOWN_STEP_OF_BLOCK)
        if len(args) > len(self.positional):
            raise TypeError(f"the attention processor got {len(args)} positional arguments after hidden_states; "
                            f"its original takes {self.positional}")
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        step, layer = context.step, self.layer
        if runtime.sparse is not None and layer in runtime.sparse.key_values:
            # an SDTM end: keys/values come from the other token set (dense ↔ sparse)
            kwargs = {**kwargs, "encoder_hidden_states": runtime.sparse.key_values[layer]}
        call = AttentionCall(
            attn=attn,
            original=runtime.originals[layer],
            hidden_states=hidden_states,
            kwargs=kwargs,
            context=context,
            cache=runtime.caches[layer],
            wants=runtime.wants(step, layer),
            reader=lambda entry: runtime.stream_planner.next_reader(step, layer, entry),
            between=runtime.between(layer) if context.branch is not None else None,
            joint=runtime.joint,
        )
        out = runtime.planner.strategy_at(step, layer).attention(call)
        if "output" in call.wants:
            runtime.caches[layer]["output"] = out
        runtime.after_call(step, layer)
        return out


def _attention_layers(transformer: torch.nn.Module) -> list[Any]:
    """The self-attention module of every block a plan's layers are (the transformer's family says where)."""
    family = family_of(transformer)
    return [family.attention_of(block) for block in family.blocks(transformer)]


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return family_of(transformer).blocks(transformer)


def get_runtime(transformer: torch.nn.Module) -> PlanRuntime | None:
    return getattr(transformer, _RUNTIME_ATTR, None)


def apply_plan(
    transformer: torch.nn.Module,
    plan: Plan,
    target: PlanTarget | None = None,
    merges: torch.nn.ModuleList | None = None,
    block_layers: Iterable[int] = (),
) -> PlanRuntime:
    """Install ``plan`` on ``transformer`` (a diffusers transformer of a known family).

    ``target`` (what the model and sampler are) is checked against the plan first; a plan with another
    layer count is always refused. ``merges``: the SDTM merge weights of a fine-tuned SparseDiT network
    (identity merges when None). ``block_layers``: blocks to hook for block-level cells besides those the
    plan's rows have (greedy calibration, whose later rows are not decided yet). Example::

        plan = load_plan("plan.yaml")
        apply_plan(adapter.transformer, plan, target)
        images = sample(adapter, labels, seeds, settings)
        remove_plan(adapter.transformer)
    """
    if get_runtime(transformer) is not None:
        raise PlanError("a plan is already applied to this transformer; call remove_plan(transformer) first")
    if target is not None:
        plan.check_fits(target)
    layers = _attention_layers(transformer)
    if plan.num_layers != len(layers):
        raise PlanError(f"plan is for {plan.num_layers} layers but this model has {len(layers)} layers")
    layout = sparse_layout(plan)
    if layout is not None and layout.weights and merges is None:
        raise PlanError(f"plan needs the fine-tuned SparseDiT network {layout.weights!r}, but no merge weights came "
                        "with this model; load the network with ditplan.load_for_plan")
    sparse = None
    if layout is not None:
        if merges is None:
            weight = next(transformer.parameters())
            merges = new_merges(len(layout.modules), layers[0].inner_dim).to(weight.device, weight.dtype)
        sparse = SparseRuntime(layout, plan.target.num_tokens, merges)
    originals = [attn.processor for attn in layers]
    runtime = PlanRuntime(plan, build_strategies(plan), originals, sparse)  # validates the plan: nothing is changed yet
    check_family_runs(plan, transformer)
    runtime.diffusers_cache = DiffusersCache.from_plan(plan)
    family = family_of(transformer)
    if not family.plan_attention:
        runtime.joint = JointTokens(plan.target.num_tokens, family.text_first)
    for index, attn in enumerate(layers):
        attn.set_processor(PlanAttnProcessor(runtime, index))
    blocks = _blocks(transformer)
    if sparse is not None:
        sparse.install(blocks)
    runtime.block_layers = sorted({*block_cached_layers(plan), *block_layers})
    units = block_units(plan.num_layers, layout)
    for layer in runtime.block_layers:
        HookRegistry.check_if_exists_or_initialize(blocks[layer]).register_hook(
            BlockCacheHook(runtime, layer, units[layer], family.block_pattern(blocks[layer])), BLOCK_HOOK)
    if runtime.diffusers_cache is not None:
        runtime.diffusers_cache.install(transformer)
        runtime.executed = ExecutionCounter(transformer)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(PlanStepHook(runtime), STEP_HOOK)
    setattr(transformer, _RUNTIME_ATTR, runtime)
    return runtime


def check_plan(plan: Plan, adapter: ModelAdapter, settings: SamplerSettings) -> None:
    """Refuse, before any sampling, a plan that does not fit ``adapter`` and ``settings`` or whose
    strategies, sparse layout or cache are misconfigured (one-line :class:`PlanError`)."""
    plan.check_fits(plan_target(load_for_plan(adapter, plan), settings))
    check_family_runs(plan, adapter.transformer)
    sparse_layout(plan)
    strategies = build_strategies(plan, extra=tuple(plan.params))
    CachePlanner(plan, strategies)  # the strategies and their cache planning
    DiffusersCache.from_plan(plan)
    schedule = GuidanceSchedule.from_plan(plan)
    if schedule is not None:
        if not settings.cfg:
            raise PlanError("plan guidance skips unconditional steps, but the sampler runs no classifier-free guidance; "
                            "drop the plan's guidance part or sample with guidance")
        CachePlanner(plan, strategies, steps=schedule.computed_steps)  # the unconditional branch's own steps


def family_refusal(family: type[ModelAdapter], names: Iterable[str], cache: str | None = None) -> str | None:
    """Why ``family`` cannot run the strategies ``names`` (and diffusers' cache ``cache``), or None. A family whose
    self-attention ditplan's attention strategies do not run on takes ``full``, block caching and diffusers' caches
    that do not break on it."""
    broken = broken_on(family.name, cache) if cache else None
    if broken:
        return (f"{broken}; ditplan's run-time forecast_cache and its block caching ({', '.join(_block_cells())}) "
                "are the caches that run there")
    if family.plan_attention:
        return None
    refused = sorted(n for n in names if not runs_on_any_attention(n))
    if refused:
        usable = sorted(n for n in STRATEGIES if runs_on_any_attention(n))
        return (f"{refused[0]!r} does not run on the {family.name} family's attention; plans for it use "
                f"{', '.join(usable)}")
    return None


def runs_on_any_attention(name: str) -> bool:
    """Whether strategy ``name`` runs on joint attention as well: a block-level one, one that takes the attention
    module as a whole (:meth:`~ditplan.strategies.base.Strategy.module_share`), or one that works on its kernel
    (``joint_kernel``)."""
    strategy = get_strategy_class(name)
    return strategy.level == "block" or strategy.module_share(True) is not None or strategy.joint_kernel


def check_family_runs(plan: Plan, transformer: torch.nn.Module) -> None:
    """Refuse, in one line, a plan whose strategies the transformer's family does not run."""
    refusal = family_refusal(family_of(transformer), plan.strategies(), (plan.cache or {}).get("method"))
    if refusal:
        raise PlanError(refusal)


def block_cached_layers(plan: Plan) -> list[int]:
    """The layers whose plan row holds block-level cells (they get a :class:`BlockCacheHook`)."""
    return [layer for layer in range(plan.num_layers)
            if any(is_block_strategy(plan.method(step, layer)) for step in range(plan.num_steps))]


def step_hook(transformer: torch.nn.Module) -> PlanStepHook:
    """The step hook of the plan applied to ``transformer``."""
    return transformer._diffusers_hook.get_hook(STEP_HOOK)


def remove_plan(transformer: torch.nn.Module) -> None:
    """Put the original attention processors back and remove the plan's hooks; a transformer without
    a plan is left alone."""
    runtime = get_runtime(transformer)
    if runtime is None:
        return
    for attn, original in zip(_attention_layers(transformer), runtime.originals):
        attn.set_processor(original)
    blocks = _blocks(transformer)
    if runtime.sparse is not None:
        runtime.sparse.remove(blocks)
    for layer in runtime.block_layers:
        remove_hook(blocks[layer], BLOCK_HOOK)
    if runtime.diffusers_cache is not None:
        runtime.diffusers_cache.remove(transformer)
        runtime.executed.remove()  # type: ignore[union-attr]
    remove_hook(transformer, STEP_HOOK)
    if runtime.original_weights is not None:
        transformer.load_state_dict(runtime.original_weights)
    runtime.reset()
    delattr(transformer, _RUNTIME_ATTR)


@dataclass(frozen=True)
class Executed:
    """What ran in one sampling run of a plan whose cache decides at run time (one of diffusers'):
    the block parts counted by :class:`ExecutionCounter` over ``calls`` transformer calls."""

    counts: dict[str, list[int]]  # part → runs per layer
    calls: int


@dataclass(frozen=True)
class PlanRun:
    """One sampling run under a plan: the samples, the peak bytes the plan's caches held, and what
    ran where that is decided at run time (else None: the plan's cost is analytic)."""

    samples: torch.Tensor
    peak_cache_bytes: int
    executed: Executed | None = None


def run_plan(
    adapter: ModelAdapter,
    plan: Plan | None,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    settings: SamplerSettings,
    show_progress: bool = False,
) -> PlanRun:
    """Sample under ``plan`` (dense when None), checked against this model and sampler, and remove
    it again. A plan made for a fine-tuned SparseDiT network runs on that network, loaded from next
    to ``adapter``'s weights."""
    if plan is None:
        return PlanRun(sample(adapter, conditions, seeds, settings, show_progress), 0)
    adapter = load_for_plan(adapter, plan)
    runtime = apply_plan(adapter.transformer, plan, plan_target(adapter, settings), adapter.merges)
    try:
        samples = sample(adapter, conditions, seeds, settings, show_progress)
        counter = runtime.executed
        executed = Executed({k: list(v) for k, v in counter.counts.items()}, counter.calls) if counter is not None else None
        return PlanRun(samples, runtime.peak_cache_bytes, executed)
    finally:
        remove_plan(adapter.transformer)
