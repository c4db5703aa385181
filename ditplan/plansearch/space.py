"""Search spaces over plans, built from the registered strategies.

The (step × layer) grid is cut into layer groups × step segments; each cell picks one method.
Step 0 is always dense (every reuse strategy needs something computed before it). With one layer
per group and one step per segment the space is the full per-(step, layer) grid. Strategy
parameters (e.g. the WA-RS window size and shape) come from each strategy's own ``search_space``,
narrowed by the experiment file when it lists choices; ``wars`` and ``wars+asc`` draw one window.

SparseDiT joins as global choices (:class:`SparseChoices`): which fine-tuned network (its fixed
Poolingformer layers and SDTM modules) or none, then a pruning-curve family and its rates inside the
rate range that network was trained for; without a network, a number of Poolingformer bottom layers
(usable without fine-tuning). Blocks a layout fixes are not drawn in the grid; when the methods include
block caching, a network draws a cache interval for its own blocks instead (:class:`LayoutCaching`).

Block caching (``reuse``, ``forecast``) are cell methods like the attention strategies; a cell gives its
method to a whole step segment. FORA's cache interval on the grid's blocks (every layer the grid draws,
skipped together every step but every k-th) joins as a global choice (:class:`IntervalChoices`): a trial
draws whether to run one (method, every, stop); then its skipped steps are the method's and the cells
draw only the steps that compute (a segment with none draws nothing). One of
diffusers' caches joins as a global choice (:class:`CacheChoices`): a trial first draws whether it
runs the cache (then with its drawn config, every cell ``full`` and no sparse part, as such plans
must be) or draws the grid and the sparse part. A cache that needs values measured on the model (MagCache's
``mag_ratios``) gets them once, from a dense run of the experiment's calibration batch (cached by content
in ``evaluation.cache_dir``), and every plan it draws carries them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import optuna

from ditplan.errors import UserError
from ditplan.evaluators.reference import cached_calibration
from ditplan.models.adapters import model_folder
from ditplan.models.family import ModelAdapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanError, PlanTarget
from ditplan.registry import unknown_name
from ditplan.spec import ExperimentSpec, SpaceSpec
from ditplan.strategies.apply import family_refusal
from ditplan.strategies.base import config_fields, get_strategy_class, is_block_strategy
from ditplan.strategies.curves import CURVES, RATE_CHOICES
from ditplan.strategies.diffusers_cache import CACHE_METHODS
from ditplan.strategies.guidance import COMPUTED, GUIDANCE_FILLS
from ditplan.strategies.sdtm import SparseLayout
from ditplan.strategies.sparse_network import load_sparse_network, sparse_networks

NO_NETWORK = "none"
NO_CACHE = "none"
INTERVAL = "interval"  # the trial parameter of the grid's cache interval


@dataclass(frozen=True)
class SparseNetwork:
    """A fine-tuned SparseDiT network a plan may run on: its folder (``sparse.weights``), the target of
    plans on it, its fixed layout and the pruning rates it was trained for."""

    weights: str
    target: PlanTarget
    pool_layers: int
    modules: tuple[tuple[int, int], ...]
    rate_range: tuple[float, float]

    def rate_choices(self) -> list[float]:
        low, high = self.rate_range
        return sorted({low, high, *(r for r in RATE_CHOICES if low <= r <= high)})


@dataclass(frozen=True)
class SparseChoices:
    """networks: fine-tuned networks to choose from (besides none); pool_layers: Poolingformer layer
    counts for plans without a network; curves: pruning-curve families for plans with one; cache_every /
    cache_stop: the :class:`LayoutCaching` choices for a network's blocks (drawn when the space's methods
    include block caching; no ``cache_every``: none)."""

    networks: tuple[SparseNetwork, ...]
    pool_layers: tuple[int, ...]
    curves: tuple[str, ...]
    cache_every: tuple[int, ...] = ()
    cache_stop: tuple[float, ...] = ()


LAYOUT_CACHE_WARMUP = 2  # cached blocks compute at the first steps (a forecast extrapolates from two)
LAYOUT_CACHE_BLOCKS = ("modules", "all")


@dataclass(frozen=True)
class CacheInterval:
    """Block caching at FORA's cache interval: ``method`` (a block strategy: ``reuse``, ``forecast``) at the
    steps from ``LAYOUT_CACHE_WARMUP`` up to ``stop`` × the step count, except every ``every``-th of them,
    which computes."""

    method: str
    every: int
    stop: float

    def skips(self, step: int, num_steps: int) -> bool:
        return interval_skips(step, self.every, round(self.stop * num_steps))


@dataclass(frozen=True)
class LayoutCaching(CacheInterval):
    """A cache interval on the blocks a SparseDiT layout fixes: its SDTM modules (``blocks: modules``, each
    skipped as a whole) or all its blocks (``all``: its Poolingformer layers too)."""

    blocks: str


@dataclass(frozen=True)
class IntervalChoices:
    """The :class:`CacheInterval` choices for the grid's blocks: ``every`` and ``stop`` (the methods are the
    space's block strategies)."""

    every: tuple[int, ...]
    stop: tuple[float, ...]


@dataclass(frozen=True)
class GuidanceChoices:
    """Guidance on an interval per step segment: computed at every step, or one of ``fills`` between the steps
    that compute it, every ``every``-th of the segment from its first (0: none of them)."""

    fills: tuple[str, ...]
    every: tuple[int, ...]

    @staticmethod
    def segment(fill: str, every: int, start: int, end: int) -> list[str]:
        """The guidance of steps [start, end) for ``fill`` every ``every``-th step."""
        return [COMPUTED if every and (step - start) % every == 0 else fill for step in range(start, end)]

    def every_for(self, length: int) -> list[int]:
        """The ``every`` choices that give distinct guidance on a segment of ``length`` steps (one beyond the segment
        computes its first step only, as ``length`` does) and skip at least one step there."""
        return sorted({min(every, length) for every in self.every if min(every, length) != 1})


def interval_skips(step: int, every: int, end: int, warmup: int = LAYOUT_CACHE_WARMUP) -> bool:
    """FORA's cache interval: whether ``step`` skips when the first ``warmup`` steps compute, then every
    ``every``-th step from there, and every step from ``end`` on."""
    return warmup <= step < end and (step - warmup) % every != 0


def layout_columns(layout: SparseLayout, num_steps: int, caching: LayoutCaching | None = None) -> dict[int, tuple[str, ...]]:
    """The cells of every layer ``layout`` fixes, by step (layer → one cell per step)."""
    cached = layout.blocks() | (set(range(layout.pool_layers)) if caching and caching.blocks == "all" else set())
    return {layer: tuple(caching.method if caching and layer in cached and caching.skips(step, num_steps) else method
                         for step in range(num_steps))
            for layer, method in layout.fixed_cells().items()}


@dataclass(frozen=True)
class CacheChoices:
    """One of diffusers' caches (``method``, a key of ``CACHE_METHODS``), ``{field: [choices]}``, and the config
    values every plan that runs it carries, not drawn (its fields measured on the model: MagCache's
    ``mag_ratios``)."""

    method: str
    space: Mapping[str, Sequence[Any]]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def param_name(self, field: str) -> str:
        return f"cache.{self.method}.{field}"


def _bounds(cuts: Sequence[int], end: int, start: int) -> list[tuple[int, int]]:
    edges = sorted({start, *(c for c in cuts if start < c < end), end})
    return list(zip(edges[:-1], edges[1:]))


def even_cuts(count: int, end: int, start: int = 0) -> list[int]:
    """``count`` near-equal pieces of [start, end) as cut points."""
    count = max(1, min(count, end - start))
    return [start + round(i * (end - start) / count) for i in range(1, count)]


@dataclass(frozen=True)
class PlanSpace:
    """methods: strategy names a cell may take; layer_cuts / step_cuts: where groups and segments start;
    params: ``{strategy: {param: [choices]}}`` for the methods' own parameters."""

    target: PlanTarget
    methods: tuple[str, ...]
    layer_cuts: tuple[int, ...]
    step_cuts: tuple[int, ...]
    params: Mapping[str, Mapping[str, Sequence[Any]]]
    sparse: SparseChoices | None = None
    cache: CacheChoices | None = None
    interval: IntervalChoices | None = None
    guidance: GuidanceChoices | None = None

    @property
    def layer_groups(self) -> list[tuple[int, int]]:
        return _bounds(self.layer_cuts, self.target.num_layers, 0)

    @property
    def step_segments(self) -> list[tuple[int, int]]:
        return _bounds(self.step_cuts, self.target.num_steps, 1)  # step 0 stays dense

    def cell_name(self, layers: tuple[int, int], steps: tuple[int, int]) -> str:
        return f"L{layers[0]}-{layers[1] - 1}/S{steps[0]}-{steps[1] - 1}"

    def params_for(self, plan: Plan) -> dict[str, Any] | None:
        """The trial parameters that reproduce ``plan``, or None when this space cannot express it
        (a cell that mixes methods, a method or parameter value outside the choices)."""
        params: dict[str, Any] = {}
        fixed: dict[int, tuple[str, ...]] = {}
        if self.cache is not None:
            cache = self._cache_params_for(plan)
            if cache is None or plan.cache:
                return cache
            params.update(cache)
        elif plan.cache:
            return None
        if self.sparse is not None:
            sparse = self._sparse_params_for(plan)
            if sparse is None:
                return None
            params.update(sparse[0])
            fixed = sparse[1]
        elif plan.sparse:
            return None
        if any(m != "full" for layer, m in enumerate(plan.grid[0]) if layer not in fixed):
            return None
        guidance = self._guidance_params_for(plan)
        if guidance is None:
            return None
        params.update(guidance)
        for interval in [None, *self.intervals()]:  # the first that expresses it: no interval where none is needed
            grid = self._grid_params_for(plan, fixed, interval)
            if grid is not None:
                params.update(grid)
                break
        else:
            return None
        used = {m for row in plan.grid for m in row}
        for name, choices in self.params.items():
            if name not in used:
                continue
            resolved = get_strategy_class(name).resolved_params(plan.params.get(name), self.target.num_tokens)
            for key, options in choices.items():
                value = resolved.get(key)
                if value is None or value not in options or params.setdefault(_param_name(name, key), value) != value:
                    return None
        return params

    def project(self, plan: Plan) -> dict[str, Any] | None:
        """The parameters of a plan of this space near ``plan`` (one it cannot express): each cell takes
        the method most of its (step, layer) cells use (ties: the space's order), strategy parameters the
        plan's where offered, else the first choice. None for plans with a SparseDiT or cache part."""
        if plan.sparse or plan.cache:
            return None
        params: dict[str, Any] = {"cache": NO_CACHE} if self.cache is not None else {}
        if self.sparse is not None:
            sparse = self._sparse_params_for(plan)
            if sparse is None:
                return None
            params.update(sparse[0])
        if self.intervals():
            params[INTERVAL] = NO_CACHE
        params.update(self._guidance_params_for(plan) or self._guidance_params_for(replace(plan, guidance=None)) or {})
        used = set()
        for layers in self.layer_groups:
            for steps in self.step_segments:
                cells = [plan.grid[s][l] for s in range(*steps) for l in range(*layers)]
                method = max(self.methods, key=cells.count)  # first of the most used
                params[self.cell_name(layers, steps)] = method
                used.add(method)
        for name, choices in self.params.items():
            if name not in used:
                continue
            resolved = get_strategy_class(name).resolved_params(plan.params.get(name), self.target.num_tokens)
            for key, options in choices.items():
                params.setdefault(_param_name(name, key), resolved.get(key) if resolved.get(key) in options else options[0])
        return params

    def suggest(self, trial: optuna.Trial) -> Plan:
        """Called once per trial on the driver: draws every cell and parameter, returns the plan."""
        if self.cache is not None:
            cache = self._suggest_cache(trial)
            if cache is not None:
                return Plan.uniform(self.target, cache=cache)
        target, layout, fixed = self.target, None, {}
        if self.sparse is not None:
            target, layout, fixed = self._suggest_sparse(trial)
        interval = self._suggest_interval(trial)
        grid = [[fixed[layer][step] if layer in fixed else "full" for layer in range(target.num_layers)]
                for step in range(target.num_steps)]
        for l0, l1 in self.layer_groups:
            free = [layer for layer in range(l0, l1) if layer not in fixed]
            for s0, s1 in self.step_segments:
                computed = self.computed_steps(s0, s1, interval)
                method = (trial.suggest_categorical(self.cell_name((l0, l1), (s0, s1)), list(self.methods))
                          if free and computed else None)
                for step in range(s0, s1):
                    for layer in free:
                        grid[step][layer] = method if step in computed else _skipped(interval)
        used = {m for row in grid for m in row}
        params = {}
        for name, choices in self.params.items():
            if name in used:
                params[name] = {p: trial.suggest_categorical(_param_name(name, p), list(c)) for p, c in choices.items()}
        guidance = self._suggest_guidance(trial)
        return Plan(target, tuple(map(tuple, grid)), params=params, sparse=layout.to_dict() if layout else None,
                    guidance=guidance)

    # --- guidance on an interval ------------------------------------------------------------------
    def _guidance_name(self, steps: tuple[int, int]) -> str:
        return f"guidance.S{steps[0]}-{steps[1] - 1}"

    def _suggest_guidance(self, trial: optuna.Trial) -> tuple[str, ...] | None:
        """Per step segment: ``full``, or a fill and how often the segment computes the unconditional branch."""
        if self.guidance is None:
            return None
        guidance = [COMPUTED] * self.target.num_steps
        for s0, s1 in self.step_segments:
            name, choices = self._guidance_name((s0, s1)), self.guidance.every_for(s1 - s0)
            fill = trial.suggest_categorical(name, [COMPUTED, *self.guidance.fills]) if choices else COMPUTED
            if fill != COMPUTED:
                every = trial.suggest_categorical(f"{name}.every", choices)
                guidance[s0:s1] = self.guidance.segment(fill, every, s0, s1)
        return tuple(guidance) if set(guidance) != {COMPUTED} else None

    def _guidance_params_for(self, plan: Plan) -> dict[str, Any] | None:
        """The guidance parameters that give ``plan``'s guidance, or None when this space cannot express it."""
        steps = plan.guidance or (COMPUTED,) * plan.num_steps
        if self.guidance is None:
            return {} if set(steps) == {COMPUTED} else None
        params: dict[str, Any] = {}
        for s0, s1 in self.step_segments:
            name, segment, choices = self._guidance_name((s0, s1)), list(steps[s0:s1]), self.guidance.every_for(s1 - s0)
            if set(segment) == {COMPUTED}:
                params.update({name: COMPUTED} if choices else {})
                continue
            options = [(fill, every) for fill in self.guidance.fills for every in choices
                       if self.guidance.segment(fill, every, s0, s1) == segment]
            if not options:
                return None
            params[name], params[f"{name}.every"] = options[0]
        return params if steps[0] == COMPUTED else None

    # --- the grid's cache interval -----------------------------------------------------------------
    def intervals(self) -> list[CacheInterval]:
        """Every cache interval a trial may draw for the grid's blocks (none without ``interval`` choices)."""
        if self.interval is None:
            return []
        return [CacheInterval(m, e, s) for m in self._block_methods() for e in self.interval.every
                for s in self.interval.stop]

    def interval_plans(self, max_run: int | None = None) -> dict[str, Plan]:
        """Each cache interval of the space alone, by name (``interval-reuse-5-1.0``): its method at the steps it
        skips, every cell ``full`` at the steps it computes — FORA's fixed schedules on the grid's blocks —
        leaving out intervals whose gaps are longer than ``max_run`` steps."""
        steps = self.target.num_steps
        return {f"interval-{i.method}-{i.every}-{i.stop}": Plan(
                    self.target, tuple((i.method if i.skips(s, steps) else "full",) * self.target.num_layers
                                       for s in range(steps)))
                for i in self.intervals() if max_run is None or i.every - 1 <= max_run}

    def _suggest_interval(self, trial: optuna.Trial) -> CacheInterval | None:
        if self.interval is None or not self.intervals():
            return None
        return self._draw_interval(trial, INTERVAL, self.interval.every, self.interval.stop)

    def _draw_interval(self, trial: optuna.Trial, prefix: str, every: Sequence[int],
                       stop: Sequence[float]) -> CacheInterval | None:
        """A cache interval drawn as ``prefix`` (none or a block method), ``prefix.every``, ``prefix.stop``."""
        method = trial.suggest_categorical(prefix, [NO_CACHE, *self._block_methods()])
        if method == NO_CACHE:
            return None
        return CacheInterval(method, trial.suggest_categorical(f"{prefix}.every", list(every)),
                             trial.suggest_categorical(f"{prefix}.stop", list(stop)))

    def computed_steps(self, start: int, end: int, interval: CacheInterval | None) -> set[int]:
        """The steps of segment [start, end) whose cells are drawn (the rest skip at ``interval``)."""
        return {s for s in range(start, end) if interval is None or not interval.skips(s, self.target.num_steps)}

    def _grid_params_for(self, plan: Plan, fixed: Mapping[int, Any], interval: CacheInterval | None) -> dict[str, Any] | None:
        """The interval and cell parameters of ``plan``'s free layers at ``interval``, or None when they are
        not cells of this space at that interval."""
        params = _interval_params(INTERVAL, interval) if self.intervals() else {}
        for layers in self.layer_groups:
            free = [l for l in range(*layers) if l not in fixed]
            for steps in self.step_segments:
                computed = self.computed_steps(*steps, interval)
                if any(plan.grid[s][l] != _skipped(interval) for s in set(range(*steps)) - computed for l in free):
                    return None
                if not free or not computed:
                    continue
                methods = {plan.grid[s][l] for s in computed for l in free}
                if len(methods) != 1 or not methods <= set(self.methods):
                    return None
                params[self.cell_name(layers, steps)] = methods.pop()
        return params

    # --- diffusers' caches --------------------------------------------------------------------------
    def _suggest_cache(self, trial: optuna.Trial) -> dict[str, Any] | None:
        """The plan's ``cache`` part, or None when the trial runs without the cache."""
        choices = self.cache
        assert choices is not None
        if trial.suggest_categorical("cache", [NO_CACHE, choices.method]) == NO_CACHE:
            return None
        config = {f: trial.suggest_categorical(choices.param_name(f), list(c)) for f, c in choices.space.items()}
        return {"method": choices.method, "config": {**choices.fixed, **config}}

    def _cache_params_for(self, plan: Plan) -> dict[str, Any] | None:
        choices = self.cache
        assert choices is not None
        if not plan.cache:
            return {"cache": NO_CACHE}
        config = dict(plan.cache.get("config") or {})
        if plan.cache.get("method") != choices.method or set(config) != {*choices.space, *choices.fixed}:
            return None
        if any(config[f] not in options for f, options in choices.space.items()):
            return None
        if any(config[f] != value for f, value in choices.fixed.items()):
            return None
        return {"cache": choices.method, **{choices.param_name(f): config[f] for f in choices.space}}

    # --- SparseDiT --------------------------------------------------------------------------------
    def _network(self, weights: str) -> SparseNetwork:
        return next(n for n in self.sparse.networks if n.weights == weights)  # type: ignore[union-attr]

    def _curve_space(self, network: SparseNetwork, curve: str) -> dict[str, list[Any]]:
        space = CURVES[curve].search_space()
        return {k: network.rate_choices() if k.startswith("r") else v for k, v in space.items()}

    def _block_methods(self) -> list[str]:
        return [m for m in self.methods if is_block_strategy(m)]

    def _caching_choices(self, network: SparseNetwork) -> list[LayoutCaching]:
        """Every block caching a plan on ``network`` may draw for its blocks (none when the space has no block
        caching or no intervals)."""
        sparse = self.sparse
        assert sparse is not None
        if not sparse.cache_every:
            return []
        return [LayoutCaching(m, e, s, b) for m in self._block_methods() for e in sparse.cache_every
                for s in sparse.cache_stop for b in _caching_blocks(network)]

    def _suggest_sparse(self, trial: optuna.Trial) -> tuple[PlanTarget, SparseLayout | None, dict[int, tuple[str, ...]]]:
        """The network (or none), its layout, curve and block caching; returns the plan's target, layout and
        the grid cells the layout fixes (layer → its cell at every step)."""
        choices = self.sparse
        assert choices is not None
        num_steps = self.target.num_steps
        weights = trial.suggest_categorical("sparse.network", [NO_NETWORK, *(n.weights for n in choices.networks)])
        if weights == NO_NETWORK:
            pool = trial.suggest_categorical("sparse.pool_layers", list(choices.pool_layers))
            layout = SparseLayout(modules=(), curve=CURVES["constant"](r=0.0), pool_layers=pool) if pool else None
            return self.target, layout, layout_columns(layout, num_steps) if layout else {}
        network = self._network(weights)
        name = trial.suggest_categorical(f"sparse.{weights}.curve", list(choices.curves))
        rates = {k: trial.suggest_categorical(f"sparse.{weights}.{name}.{k}", v)
                 for k, v in self._curve_space(network, name).items()}
        layout = SparseLayout(network.modules, CURVES[name](**rates), weights, network.pool_layers)
        return network.target, layout, layout_columns(layout, num_steps, self._suggest_caching(trial, network))

    def _suggest_caching(self, trial: optuna.Trial, network: SparseNetwork) -> LayoutCaching | None:
        if not self._caching_choices(network):
            return None
        prefix = f"sparse.{network.weights}.cache"
        sparse = self.sparse
        assert sparse is not None
        interval = self._draw_interval(trial, prefix, sparse.cache_every, sparse.cache_stop)
        if interval is None:
            return None
        return LayoutCaching(interval.method, interval.every, interval.stop,
                             trial.suggest_categorical(f"{prefix}.blocks", list(_caching_blocks(network))))

    def _caching_params_for(self, plan: Plan, network: SparseNetwork,
                            layout: SparseLayout) -> tuple[dict[str, Any], dict[int, tuple[str, ...]]] | None:
        """The caching parameters and fixed columns of ``plan`` on ``network``, or None when its layout's cells
        are no caching this space draws."""
        choices = self._caching_choices(network)
        prefix = f"sparse.{network.weights}.cache"
        for caching in [None, *choices]:
            columns = layout_columns(layout, plan.num_steps, caching)
            if all(tuple(row[layer] for row in plan.grid) == cells for layer, cells in columns.items()):
                if caching is None:
                    return (_interval_params(prefix, None) if choices else {}), columns
                return {**_interval_params(prefix, caching), f"{prefix}.blocks": caching.blocks}, columns
        return None

    def _sparse_params_for(self, plan: Plan) -> tuple[dict[str, Any], dict[int, tuple[str, ...]]] | None:
        choices = self.sparse
        assert choices is not None
        if not plan.sparse:
            return ({"sparse.network": NO_NETWORK, "sparse.pool_layers": 0}, {}) if 0 in choices.pool_layers else None
        layout = SparseLayout.from_dict(plan.sparse)
        if not layout.weights:
            if layout.modules or layout.pool_layers not in choices.pool_layers:
                return None
            columns = layout_columns(layout, plan.num_steps)
            if any(tuple(row[layer] for row in plan.grid) != cells for layer, cells in columns.items()):
                return None
            return {"sparse.network": NO_NETWORK, "sparse.pool_layers": layout.pool_layers}, columns
        if layout.weights not in {n.weights for n in choices.networks} or layout.curve.name not in choices.curves:
            return None
        network = self._network(layout.weights)
        params: dict[str, Any] = {"sparse.network": layout.weights, f"sparse.{layout.weights}.curve": layout.curve.name}
        for key, options in self._curve_space(network, layout.curve.name).items():
            value = getattr(layout.curve, key)
            if value not in options:
                return None
            params[f"sparse.{layout.weights}.{layout.curve.name}.{key}"] = value
        caching = self._caching_params_for(plan, network, layout)
        if caching is None:
            return None
        return {**params, **caching[0]}, caching[1]


def _interval_params(prefix: str, interval: CacheInterval | None) -> dict[str, Any]:
    """The trial parameters :meth:`PlanSpace._draw_interval` draws for ``interval`` (None: none)."""
    if interval is None:
        return {prefix: NO_CACHE}
    return {prefix: interval.method, f"{prefix}.every": interval.every, f"{prefix}.stop": interval.stop}


def _skipped(interval: CacheInterval | None) -> str:
    """The method of the grid's cells at the steps ``interval`` skips."""
    assert interval is not None, "without an interval every step computes"
    return interval.method


def _caching_blocks(network: SparseNetwork) -> tuple[str, ...]:
    """What a network's block caching may cover: its modules, or all its blocks when it has Poolingformer layers."""
    return LAYOUT_CACHE_BLOCKS if network.pool_layers else LAYOUT_CACHE_BLOCKS[:1]


def _param_name(strategy: str, param: str) -> str:
    """The trial parameter of a strategy's parameter; strategies that share parameters (``wars+asc``
    with ``wars``: one window, so one residual serves both) draw them once, under the other's name."""
    return f"{get_strategy_class(strategy).shares_params_with or strategy}.{param}"


def build_space(
    target: PlanTarget,
    methods: Sequence[str],
    layer_groups: int | Sequence[int],
    step_segments: int | Sequence[int],
    param_choices: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    sparse: SparseChoices | None = None,
    cache: CacheChoices | None = None,
    interval: IntervalChoices | None = None,
    guidance: GuidanceChoices | None = None,
) -> PlanSpace:
    """``layer_groups`` / ``step_segments``: a count (even pieces) or explicit cut points."""
    _check_methods(methods, param_choices or {}, interval is not None)
    layer_cuts = even_cuts(layer_groups, target.num_layers) if isinstance(layer_groups, int) else list(layer_groups)
    step_cuts = even_cuts(step_segments, target.num_steps, 1) if isinstance(step_segments, int) else list(step_segments)
    params: dict[str, dict[str, Sequence[Any]]] = {}
    for name in methods:
        space = {k: list(v) for k, v in get_strategy_class(name).search_space(target.num_tokens).items()}
        space.update({k: list(v) for k, v in (param_choices or {}).get(name, {}).items()})
        if space:
            params[name] = space
    for name, space in params.items():
        other = get_strategy_class(name).shares_params_with
        if other in params and params[other] != space:
            raise UserError(f"{name} and {other} share their parameters (one window for both), but the search space "
                            f"gives them different choices ({space} vs {params[other]}); give both the same choices")
    if sparse is not None:
        _check_curves(sparse.curves)
    for fill in guidance.fills if guidance is not None else ():
        if fill not in GUIDANCE_FILLS:
            raise unknown_name("guidance fill", fill, GUIDANCE_FILLS.choices(), "search.space.guidance.fills")
    return PlanSpace(target, tuple(methods), tuple(layer_cuts), tuple(step_cuts), params, sparse, cache, interval,
                     guidance)


def _check_methods(methods: Sequence[str], param_choices: Mapping[str, Mapping[str, Any]], interval: bool) -> None:
    """Every method a registered strategy, every parameter choice one of a listed method's parameters, and a
    block strategy among the methods when the grid's cache interval is drawn."""
    for name in methods:
        get_strategy_class(name, "search.space.methods")
    sharers = {get_strategy_class(m).shares_params_with for m in methods}
    for name, params in param_choices.items():
        if name not in methods and name not in sharers:
            raise UserError(f"search.space.params names {name!r}, which search.space.methods does not list; add it "
                            "there or drop its params")
        for param in params:
            if param not in config_fields(name):
                raise unknown_name(f"parameter of {name!r}", param, config_fields(name), "search.space.params")
    if interval and not any(is_block_strategy(m) for m in methods):
        raise UserError(f"search.space.interval caches blocks with a block strategy, but methods {list(methods)} have "
                        f"none; add reuse or forecast to search.space.methods, or drop search.space.interval")


def _check_curves(curves: Sequence[str]) -> None:
    for curve in curves:
        if curve not in CURVES:
            raise unknown_name("pruning curve", curve, list(CURVES), "search.space.sparse.curves")


def space_methods(space: SpaceSpec, family: type[ModelAdapter]) -> list[str]:
    """The strategies a space's cells draw: those it names, else the model family's own."""
    return list(space.methods) if space.methods is not None else list(family.default_methods)


def check_space(space: SpaceSpec, family: type[ModelAdapter]) -> None:
    """Refuse, before anything runs, a search space that names what does not exist (a strategy, a parameter
    of one, a pruning curve, one of diffusers' caches or its fields) or what ``family`` does not run: one
    line with the valid choices."""
    methods = space_methods(space, family)
    refusal = family_refusal(family, methods, space.cache.method if space.cache is not None else None)
    if refusal:
        raise UserError(f"search.space: {refusal}")
    _check_methods(methods, space.params, space.interval is not None)
    if space.sparse is not None:
        _check_curves(space.sparse.curves)
    if space.cache is not None:
        cache_choices(space.cache.method, space.cache.params)


def cache_choices(method: str, params: Mapping[str, Sequence[Any]] | None = None) -> CacheChoices:
    """Diffusers' cache ``method`` as a search choice: its own search values, narrowed or extended
    field by field by ``params``; unknown methods, fields and values are refused by name."""
    known = CACHE_METHODS.get(method)
    if known is None:
        raise unknown_name("cache", method, list(CACHE_METHODS), "search.space.cache.method")
    space = {k: list(v) for k, v in known.space.items()}
    for name, values in (params or {}).items():
        if name not in known.fields:
            raise UserError(f"search.space.cache.params: {method!r} has no field {name!r}; its fields are "
                            f"{list(known.fields)}")
        if name in known.calibrated:
            raise UserError(f"search.space.cache.params.{name} is measured on the model (a dense run of the "
                            "calibration batch), not drawn; drop it")
        if not values:
            raise UserError(f"search.space.cache.params.{name} lists no values; give at least one")
        for value in values:
            try:
                _unmeasured_config(method, {name: value})
            except (TypeError, ValueError) as err:
                raise UserError(f"search.space.cache.params.{name}: {value!r} is not valid for {method!r} ({err})") from None
        space[name] = list(values)
    return CacheChoices(method, space)


def _unmeasured_config(method: str, values: Mapping[str, Any]) -> Any:
    """The config of cache ``method`` with ``values``, before its fields measured on the model are."""
    known = CACHE_METHODS[method]
    # NOTE: the fields measured on the model are not yet: one neutral ratio stands in for them
    return known.config_class(**{**dict.fromkeys(known.calibrated, [1.0]), **values})


def check_cache_fits(choices: CacheChoices, num_layers: int) -> None:
    """Refuse, in one line, a cache choice that draws a config not fitting a model of ``num_layers`` blocks (the
    forecast cache's ``fn + bn`` leaving no middle block)."""
    names = list(choices.space)
    for values in itertools.product(*(choices.space[name] for name in names)):
        try:
            CACHE_METHODS[choices.method].check_blocks(_unmeasured_config(choices.method, dict(zip(names, values))),
                                                       num_layers)
        except PlanError as err:
            raise UserError(f"search.space.cache: {err}; set them in search.space.cache.params") from None


def experiment_space(adapter: ModelAdapter, spec: ExperimentSpec) -> PlanSpace:
    """The search space an experiment file describes, for its model and sampler."""
    space = spec.search.space
    cache = cache_choices(space.cache.method, space.cache.params) if space.cache else None
    if cache is not None:
        check_cache_fits(cache, adapter.num_layers)
        cache = calibrated(cache, adapter, spec)
    interval = IntervalChoices(tuple(space.interval.every), tuple(space.interval.stop)) if space.interval else None
    guidance = GuidanceChoices(tuple(space.guidance.fills), tuple(space.guidance.every)) if space.guidance else None
    if guidance is not None and not spec.sampler.settings().cfg:
        raise UserError("search.space.guidance skips the unconditional branch of classifier-free guidance, but the "
                        "sampler runs none; drop search.space.guidance or sample with guidance")
    return build_space(plan_target(adapter, spec.sampler.settings()), space_methods(space, type(adapter)), space.layer_groups,
                       space.step_segments, space.params, sparse_choices(adapter, spec), cache, interval,
                       guidance)


def calibrated(choices: CacheChoices, adapter: ModelAdapter, spec: ExperimentSpec) -> CacheChoices:
    """``choices`` with the config values its cache needs measured on the model, from a dense run of the
    experiment's calibration batch (read from ``evaluation.cache_dir`` when measured before)."""
    _, conditions, seeds = spec.seed_set("calibration")
    return replace(choices, fixed=cached_calibration(choices.method, adapter, spec.sampler.settings(), conditions, seeds,
                                                     spec.evaluation.cache_dir))


def sparse_choices(adapter: ModelAdapter, spec: ExperimentSpec) -> SparseChoices | None:
    """The SparseDiT part of an experiment's search space, with the fine-tuned networks it names (or
    finds next to the model's weights) loaded to learn their targets."""
    sparse = spec.search.space.sparse
    if sparse is None:
        return None
    found = sparse_networks(model_folder(adapter.model_id)) if adapter.model_id else {}
    names = list(found) if sparse.networks == "auto" else sparse.networks
    settings = spec.sampler.settings()
    networks = []
    for weights in names:
        info = found.get(weights)
        if info is None:
            raise UserError(f"search.space.sparse.networks names {weights!r}, but no fine-tuned network is there; "
                            f"found: {sorted(found) or 'none'} (make one with `ditplan finetune-sparse`)")
        layout = info["layout"]
        networks.append(SparseNetwork(
            weights=weights,
            target=plan_target(load_sparse_network(adapter, weights), settings),
            pool_layers=int(layout["pool_layers"]),
            modules=tuple((int(a), int(b)) for a, b in layout["modules"]),
            rate_range=(float(info["rate_range"][0]), float(info["rate_range"][1])),
        ))
    return SparseChoices(tuple(networks), tuple(sparse.pool_layers), tuple(sparse.curves), tuple(sparse.cache_every),
                         tuple(sparse.cache_stop))
