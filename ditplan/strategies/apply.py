"""Install a plan on a diffusers transformer and remove it again, exactly.

Each self-attention module (``attn1`` of every block) gets a :class:`PlanAttnProcessor` through
diffusers' own ``set_processor``; it looks up the strategy of its (step, layer) cell at every call.
The original processor objects are kept and put back by :func:`remove_plan`.
"""

from __future__ import annotations

from typing import Any

import torch

from ditplan.models.context import current_step
from ditplan.plan import Plan, PlanError, PlanTarget
from ditplan.strategies.base import AttentionCall, Strategy, get_strategy_class
from ditplan.strategies.sdtm import SparseLayout, SparseRuntime, new_merges

_RUNTIME_ATTR = "_ditplan_runtime"


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
            if plan.method(step, layer) != method:
                raise PlanError(
                    f"layer {layer} uses {plan.method(step, layer)!r} at step {step}, but the plan's sparse layout "
                    f"{layout.name} needs {method!r} there at every step"
                )
    return layout


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

    def __init__(self, plan: Plan, strategies: dict[str, Strategy], open_ended: bool = False) -> None:
        """``open_ended``: later steps are not decided yet (greedy calibration), so every entry that
        some known strategy reads is kept, made as the first such strategy defines it."""
        self.plan = plan
        self.strategies = strategies
        self.open_ended = open_ended
        self._check_reads_are_written()

    def strategy_at(self, step: int, layer: int) -> Strategy:
        return self.strategies[self.plan.method(step, layer)]

    def next_reader(self, step: int, layer: int, entry: str) -> Strategy | None:
        """The strategy of the first later step that reads ``entry`` before a step rewrites it."""
        if self.open_ended:
            return next((s for _, s in sorted(self.strategies.items()) if entry in s.reads), None)
        for later in range(step + 1, self.plan.num_steps):
            strategy = self.strategy_at(later, layer)
            if entry in strategy.reads:
                return strategy
            if entry in strategy.writes:
                return None
        return None

    def wants(self, step: int, layer: int) -> frozenset[str]:
        writes = self.strategy_at(step, layer).writes
        return frozenset(e for e in writes if self.next_reader(step, layer, e) is not None)

    def _check_reads_are_written(self) -> None:
        for layer in range(self.plan.num_layers):
            written: set[str] = set()
            made_for: dict[str, Strategy] = {}  # entry → the first strategy that reads it since it was made
            for step in range(self.plan.num_steps):
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
                made_for = {e: s for e, s in made_for.items() if e not in strategy.writes}
                written |= strategy.writes


class PlanRuntime:
    """The plan installed on one transformer, its strategies and the per-layer caches of a run.

    ``frozen`` (trial forwards during greedy calibration) reads caches but writes and frees nothing.
    """

    def __init__(self, plan: Plan, strategies: dict[str, Strategy], originals: list[Any],
                 sparse: SparseRuntime | None = None) -> None:
        self.planner = CachePlanner(plan, strategies)
        self.sparse = sparse
        self.originals = originals
        self.caches: list[dict[str, torch.Tensor]] = [{} for _ in originals]
        self.frozen = False
        self.peak_cache_bytes = 0

    @property
    def plan(self) -> Plan:
        return self.planner.plan

    def wants(self, step: int, layer: int) -> frozenset[str]:
        if self.frozen:
            return frozenset()
        return self.planner.wants(step, layer)

    def after_call(self, step: int, layer: int) -> None:
        """Free what no later step reads; track the peak cache size."""
        if self.frozen:
            return
        cache = self.caches[layer]
        for entry in [e for e in cache if self.planner.next_reader(step, layer, e) is None]:
            del cache[entry]
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for cache in self.caches for t in cache.values())

    def reset(self) -> None:
        for cache in self.caches:
            cache.clear()
        if self.sparse is not None:
            self.sparse.reset()


class PlanAttnProcessor:
    """The attention processor ditplan installs: dispatches each call to the plan's strategy."""

    def __init__(self, runtime: PlanRuntime, layer: int) -> None:
        self.runtime = runtime
        self.layer = layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        context = current_step()
        runtime = self.runtime
        if context is None:
            raise RuntimeError(
                "a ditplan plan is applied but the transformer was called outside ditplan's sampling loop, so the "
                "step is unknown; sample with ditplan.models.sampling.sample, or remove_plan(transformer) first"
            )
        if context.num_steps != runtime.plan.num_steps:
            raise PlanError(
                f"plan has {runtime.plan.num_steps} steps but the sampler runs {context.num_steps}; "
                "sample with the plan's step count or make a plan for this one"
            )
        if args:
            raise TypeError("ditplan's attention processor takes keyword arguments only after hidden_states")
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
            reader=lambda entry: runtime.planner.next_reader(step, layer, entry),
        )
        out = runtime.planner.strategy_at(step, layer).attention(call)
        if "output" in call.wants:
            runtime.caches[layer]["output"] = out
        runtime.after_call(step, layer)
        return out


def _attention_layers(transformer: torch.nn.Module) -> list[Any]:
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no transformer_blocks; ditplan supports DiT and PixArt")
    return [block.attn1 for block in blocks]


def get_runtime(transformer: torch.nn.Module) -> PlanRuntime | None:
    return getattr(transformer, _RUNTIME_ATTR, None)


def apply_plan(
    transformer: torch.nn.Module,
    plan: Plan,
    target: PlanTarget | None = None,
    merges: torch.nn.ModuleList | None = None,
) -> PlanRuntime:
    """Install ``plan`` on ``transformer`` (a diffusers DiT/PixArt transformer).

    ``target`` (what the model and sampler are) is checked against the plan first; a plan with another
    layer count is always refused. ``merges``: the SDTM merge weights of a fine-tuned SparseDiT network
    (identity merges when None). Example::

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
    runtime = PlanRuntime(plan, build_strategies(plan), originals, sparse)
    for index, attn in enumerate(layers):
        attn.set_processor(PlanAttnProcessor(runtime, index))
    if sparse is not None:
        sparse.install(transformer.transformer_blocks)
    setattr(transformer, _RUNTIME_ATTR, runtime)
    return runtime


def remove_plan(transformer: torch.nn.Module) -> None:
    """Put the original attention processors back; a transformer without a plan is left alone."""
    runtime = get_runtime(transformer)
    if runtime is None:
        return
    for attn, original in zip(_attention_layers(transformer), runtime.originals):
        attn.set_processor(original)
    if runtime.sparse is not None:
        runtime.sparse.remove(transformer.transformer_blocks)
    runtime.reset()
    delattr(transformer, _RUNTIME_ATTR)


def reset_plan_state(transformer: torch.nn.Module) -> None:
    """Clear the caches of an applied plan (called before and after every sampling run)."""
    runtime = get_runtime(transformer)
    if runtime is not None:
        runtime.reset()
