"""Proxy sensitivities of the (step, layer, strategy) cells, and plans proposed from them.

The proxy is greedy's own loop (:func:`ditplan.plansearch.greedy.greedy_search`) at δ = 0 on the
calibration batch: every candidate is rejected, so the trajectory stays dense and the run measures
each (step ≥ 1, layer, candidate) cell alone against dense — ``steps × layers × candidates`` trial
forwards, about a quarter of what greedy's six thresholds spend together. The table it records is
the proxy: ``loss[(step, layer, method)]``, greedy's relative L1 of the transformer output. That
loss is taken at its step; what it costs the final samples is not the same at every step and for
every strategy (the embedded model: 0.006–0.015 per unit at step 1, 0.07–0.22 at the last steps, ASC's
about twice AST's late), so summed raw losses mis-rank the cells. So the
proxy also measures gains (:func:`measure_gains`: a few probe runs, each one step's layers all on one
strategy, forked from a dense run just before it), and proposals weigh every cell's loss by its gain.

Proposals treat the losses as additive over the cells of the space (a layer group × step segment;
one (step, layer) in the full grid). The default solves "least Σ loss with Σ FLOPs ≤ C" exactly, as a
multiple-choice knapsack by dynamic programming over a grid of FLOPs, for evenly spaced C from dense
to the fastest. The alternatives solve it by its Lagrangian: for each λ every cell independently takes
``argmin_m flops(m) + λ · loss(m)`` — exact only on the convex hull of the additive problem, which
leaves gaps in cost where the hull has few vertices. FLOPs per cell are the whole plan's
analytic FLOPs with that one cell changed, minus dense's (so a dense step's extra window pass for a
WA-RS residual is charged to the cell that reads it); runs of consecutive reuse cells share that
pass, so the sum slightly overstates their cost. Each plan is then judged for real as a trial.

A space with block caching (``reuse``, ``forecast``) adds those methods to the candidates the loop
measures (:func:`proxy_candidates`), so proposals can skip whole blocks. A space with the grid's cache
interval (FORA's "compute every k-th step") solves the knapsack once per interval it may draw, with that
interval's skipped steps priced as its method and the cells over the steps that compute, and each target
takes the interval (or none) of least predicted loss: the interval is one more choice of the problem.
Under an interval a computing cell still reuses at the skipped steps before and after its computed ones,
so the run cap counts them (and leaves out intervals whose gaps pass it).

What the additive proxy cannot see is staleness: it prices a reuse (``ast``, ``reuse``,
``forecast``) cell against the step before it, so a recompute in the middle of a long run earns back
only its own cell's loss, not the staleness it takes off every later reuse of that layer. On the
embedded model (held-out seeds) the uncapped knapsack's front has rel. L1 0.127 at FLOPs 0.557, where a
layer reuses one output for 19 steps; with every run capped at 10 steps it has 0.093 at 0.577 and 0.092
at 0.568
(``benchmarks/search_vs_greedy/results/search-vs-greedy-proxy46-gains7-s5{,-run10}-fullgrid.txt``). So proposals may
cap a layer's reuse runs (``max_run``): the knapsack then also tracks the length of each layer's
current run, and any computing cell, even a cheap ``asc`` one, ends it. The cap costs the fastest
plans, which need the longest runs: at 10 steps the fastest proposal has FLOPs 0.539, not 0.526.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditplan.atomic import atomic_write_text
from ditplan.errors import UserError
from ditplan.evaluators.cost import plan_flops
from ditplan.evaluators.fidelity import relative_l1
from ditplan.models.family import ModelAdapter
from ditplan.models.sampling import Snapshot, plan_target, sample_batch
from ditplan.plan import Plan
from ditplan.plansearch.greedy import CANDIDATES, family_candidates, greedy_search
from ditplan.plansearch.space import CacheInterval, PlanSpace, space_methods
from ditplan.spec import PROPOSAL_SPREADS, ExperimentSpec, SamplerSettings
from ditplan.strategies.apply import apply_plan, remove_plan
from ditplan.strategies.base import BlockStrategy, get_strategy_class

WINDOWED = ("wars", "wars+asc")  # the candidates whose window the proxy measured them with
# methods that compute nothing new at their step: a layer's run of them grows stale (``max_run``)
REUSING = frozenset({"ast", "reuse", "forecast"})
LAMBDA_SWEEP = np.geomspace(1e-4, 1e6, 401)  # × (dense FLOPs of one cell): from "fastest" to "dense"


@dataclass(frozen=True)
class Proxy:
    """losses: ``{(step, layer, method): relative L1 of that cell alone vs dense}`` on the calibration
    batch; params: the strategy parameters the cells ran with; sample_forwards / seconds: what
    measuring it cost (the budget unit of :func:`ditplan.evaluators.cost.sample_forwards`); gains:
    ``{(step, method): final-sample loss per unit of cell loss}`` (:func:`measure_gains`), empty when
    not measured. Proposals weigh every cell's loss by its gain (:attr:`weighted`)."""

    losses: Mapping[tuple[int, int, str], float]
    params: Mapping[str, Mapping[str, Any]]
    sample_forwards: int
    seconds: float
    gains: Mapping[tuple[int, str], float] = field(default_factory=dict)

    @property
    def weighted(self) -> dict[tuple[int, int, str], float]:
        """The losses in final-sample units (× the cell's gain); the losses themselves without gains."""
        if not self.gains:
            return dict(self.losses)
        return {(s, l, m): v * self.gains[s, m] for (s, l, m), v in self.losses.items()}

    def to_json(self, measured_with: Mapping[str, Any] | None = None) -> str:
        """JSON of the proxy, with what it was measured with (see :func:`cached_proxy`) when given."""
        return json.dumps({"losses": [[s, l, m, v] for (s, l, m), v in sorted(self.losses.items())],
                           "params": self.params, "sample_forwards": self.sample_forwards, "seconds": self.seconds,
                           "gains": [[s, m, v] for (s, m), v in sorted(self.gains.items())],
                           **({"measured_with": measured_with} if measured_with is not None else {})})

    @classmethod
    def from_json(cls, text: str) -> Proxy:
        data = json.loads(text)
        return cls({(int(s), int(l), str(m)): float(v) for s, l, m, v in data["losses"]}, data["params"],
                   int(data["sample_forwards"]), float(data["seconds"]),
                   {(int(s), str(m)): float(v) for s, m, v in data["gains"]})


def measure_proxy(adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any], seeds: Sequence[int],
                  window_size: int | None = None, gain_probes: int = 0,
                  candidates: Sequence[str] = CANDIDATES) -> Proxy:
    """The proxy on the calibration batch ``(conditions, seeds)``: greedy's run at δ = 0 over
    ``candidates`` (greedy's own by default), its losses, and with ``gain_probes`` their gains
    (:func:`measure_gains`)."""
    result = greedy_search(adapter, settings, conditions, seeds, 0.0, window_size, candidates=candidates)
    window = {"window_size": window_size} if window_size is not None else {}
    proxy = Proxy(dict(result.losses), {m: dict(window) for m in WINDOWED}, result.sample_forwards, result.seconds)
    return measure_gains(adapter, settings, conditions, seeds, proxy, gain_probes) if gain_probes else proxy


def proxy_candidates(methods: Sequence[str], greedy: Sequence[str] = CANDIDATES) -> tuple[str, ...]:
    """What the proxy measures for a space of ``methods``: greedy's candidates (on the model's family:
    :func:`~ditplan.plansearch.greedy.family_candidates`), then the space's other block caching methods
    (``reuse``, ``forecast``: a whole block skipped)."""
    greedy = tuple(greedy)
    return greedy + tuple(m for m in methods if m not in greedy and m != "full"
                          and issubclass(get_strategy_class(m), BlockStrategy))


def experiment_proxy(adapter: ModelAdapter, spec: ExperimentSpec, path: Path) -> tuple[Proxy, bool]:
    """The proxy ``spec.search.proposals`` asks for, on the first K samples of the calibration batch, over
    :func:`proxy_candidates` of the space, kept at ``path`` (:func:`cached_proxy`, keyed by the model,
    sampler, batch, window, gain probes and — when the space adds block caching — the candidates)."""
    proposals = spec.search.proposals
    settings = spec.sampler.settings()
    _, conditions, seeds = spec.proxy_batch()
    window = spec.greedy.window_size
    candidates = proxy_candidates(space_methods(spec.search.space, type(adapter)), family_candidates(adapter))
    measured_with = {"target": asdict(plan_target(adapter, settings)), "conditions": conditions,
                     "seeds": seeds, "window_size": window, "gain_probes": proposals.gain_probes}
    if candidates != CANDIDATES:  # proxies of greedy's candidates alone stay keyed as before
        measured_with["candidates"] = list(candidates)
    return cached_proxy(path, lambda: measure_proxy(adapter, settings, conditions, seeds, window,
                                                    proposals.gain_probes, candidates), measured_with)


def probe_steps(num_steps: int, probes: int) -> list[int]:
    """``probes`` evenly spaced steps from 1 to the last (step 0 is dense in every plan)."""
    return sorted({int(round(x)) for x in np.linspace(1, num_steps - 1, min(probes, num_steps - 1))})


def measure_gains(adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any], seeds: Sequence[int],
                  proxy: Proxy, probes: int) -> Proxy:
    """``proxy`` with the gains of its cells: how much a cell's loss (the transformer output's, at its
    step) costs the final samples. For ``probes`` evenly spaced steps s and every measured method m,
    every layer at s runs m (the rest dense): gain(s, m) is the final samples' relative L1 to dense
    over the summed losses of those cells; steps between probes interpolate linearly."""
    steps, methods = probe_steps(settings.num_steps, probes), sorted({m for _, _, m in proxy.losses})
    started = time.perf_counter()
    dense, finals, forwards = _probe_samples(adapter, settings, conditions, seeds, proxy.params, steps, methods)
    summed: dict[tuple[int, str], float] = {}
    for (s, _, m), v in proxy.losses.items():
        summed[s, m] = summed.get((s, m), 0.0) + v
    measured = {(s, m): relative_l1(out, dense) / summed[s, m] if summed.get((s, m), 0.0) > 0 else 0.0
                for (s, m), out in finals.items()}
    gains = {(s, m): float(np.interp(s, steps, [measured[p, m] for p in steps]))
             for s in range(1, settings.num_steps) for m in methods}
    return replace(proxy, gains=gains, sample_forwards=proxy.sample_forwards + forwards,
                   seconds=proxy.seconds + time.perf_counter() - started)


def _probe_samples(adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any], seeds: Sequence[int],
                   params: Mapping[str, Mapping[str, Any]], steps: Sequence[int], methods: Sequence[str],
                   ) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor], int]:
    """The dense samples, each probe's (every layer at step s on method m) and the sample-forwards spent.
    Each probe goes on from a snapshot of the dense run just before step s − h, where h is the most
    computed steps a probed method reads back (1: the dense step that makes the caches s reads; a
    ``forecast`` of order k reads k + 1), so it costs the steps s − h … end only."""
    target = plan_target(adapter, settings)
    dense, finals = [], {(s, m): [] for s in steps for m in methods}
    forwards = 0
    back = max(_steps_read(m, params) for m in methods)
    for a in range(0, len(seeds), settings.batch_size):  # micro-batches of at most batch_size samples
        batch = (conditions[a : a + settings.batch_size], seeds[a : a + settings.batch_size])
        rows = len(batch[1]) * (2 if settings.cfg else 1)
        kept: dict[int, Snapshot] = {}

        def keep(i: int, latents: torch.Tensor, scheduler: Any) -> None:
            if i + 1 + back in steps:  # before step i + 1 = s − back
                kept[i + 1 + back] = Snapshot(i + 1, latents.clone(), copy.deepcopy(scheduler))

        dense.append(adapter.decode(sample_batch(adapter, *batch, settings, on_step=keep)))
        forwards += settings.num_steps * rows
        for s in steps:
            for m in methods:
                grid = [["full"] * target.num_layers for _ in range(target.num_steps)]
                grid[s] = [m] * target.num_layers
                plan = Plan(target, tuple(map(tuple, grid)), params={k: v for k, v in params.items() if k == m})
                apply_plan(adapter.transformer, plan, target, adapter.merges)
                try:
                    finals[s, m].append(adapter.decode(sample_batch(adapter, *batch, settings, start=kept.get(s))))
                finally:
                    remove_plan(adapter.transformer)
                forwards += (settings.num_steps - (s - back if s in kept else 0)) * rows
    return torch.cat(dense), {key: torch.cat(outs) for key, outs in finals.items()}, forwards


def _steps_read(method: str, params: Mapping[str, Mapping[str, Any]]) -> int:
    """How many computed steps before its own a cell of ``method`` reads (a block strategy's history)."""
    strategy = get_strategy_class(method).from_params(params.get(method))
    return strategy.history if isinstance(strategy, BlockStrategy) else 1


def read_proxy(path: Path) -> tuple[Proxy, Any]:
    """The proxy in ``path`` and what it was measured with (None from a ditplan before that was stored);
    an unreadable file is a :class:`UserError` naming it."""
    try:
        text = path.read_text()
        proxy, found = Proxy.from_json(text), json.loads(text).get("measured_with")
        if found is not None and not isinstance(found, dict):
            raise ValueError(f"measured_with is {found!r}, not a mapping")
        return proxy, found
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{path} is not a proxy file ditplan can read ({type(err).__name__}: {err}); "
                        "delete it to measure the proxy again") from None


def cached_proxy(path: Path, measure: Callable[[], Proxy], measured_with: Mapping[str, Any]) -> tuple[Proxy, bool]:
    """The proxy stored at ``path``, or ``measure()``'s, stored there atomically; True when measured now.
    ``measured_with`` (JSON values: calibration seeds, window, gain probes) is stored beside it; a stored
    proxy measured with other settings, written by a ditplan without them, or unreadable, is a
    :class:`UserError` that names the file and the fix (a resumed search must not mix proxies)."""
    wanted = json.loads(json.dumps(measured_with))
    if path.exists():
        proxy, found = read_proxy(path)
        if found is None:
            raise UserError(f"{path} was written by an older ditplan (it does not say what it was measured with); "
                            "delete it to measure the proxy again")
        if found != wanted:
            changed = "; ".join(f"{k} {found.get(k)!r} there, {wanted.get(k)!r} now"
                                for k in sorted({*found, *wanted}) if found.get(k) != wanted.get(k))
            raise UserError(f"{path} was measured with other settings than this search's ({changed}); "
                            "delete the file to measure it again, or restore the experiment's settings")
        return proxy, False
    proxy = measure()
    atomic_write_text(path, proxy.to_json(wanted))
    return proxy, True


def cell_flops(adapter: ModelAdapter, settings: SamplerSettings, proxy: Proxy) -> dict[tuple[int, int, str], float]:
    """FLOPs of every measured cell: the whole plan's with only that cell changed, minus dense's (per sample)."""
    target = plan_target(adapter, settings)
    dense = plan_flops(adapter, None, settings).total
    grid = [["full"] * target.num_layers for _ in range(target.num_steps)]
    flops = {}
    for step, layer, method in proxy.losses:
        grid[step][layer] = method
        plan = Plan(target, tuple(map(tuple, grid)), params={k: v for k, v in proxy.params.items() if k == method})
        flops[step, layer, method] = plan_flops(adapter, plan, settings).total - dense
        grid[step][layer] = "full"
    return flops


def _usable_methods(space: PlanSpace, proxy: Proxy) -> list[str]:
    """The space's methods the proxy measured (and ``full``), with parameters the space can draw."""
    measured = {m for _, _, m in proxy.losses}
    usable = []
    for method in space.methods:
        if method != "full" and method not in measured:
            continue
        choices = space.params.get(method, {})
        if choices:
            resolved = get_strategy_class(method).resolved_params(proxy.params.get(method), space.target.num_tokens)
            if any(resolved.get(k) not in options for k, options in choices.items()):
                continue
        usable.append(method)
    return usable


def propose(space: PlanSpace, proxy: Proxy, flops: Mapping[tuple[int, int, str], float], count: int,
            spread: str = "knapsack", max_run: int | None = None, max_loss: float | None = None) -> list[Plan]:
    """Up to ``count`` plans of the space (every cell of a layer group × step segment one method, under one
    of the space's cache intervals or none; no SparseDiT or cache part), from the most faithful (dense) to
    the fastest, most faithful first.
    ``spread``: ``knapsack`` — for ``count`` evenly spaced predicted FLOPs, the plan of least summed
    loss at most that dear (a multiple-choice knapsack, solved exactly on a grid of 4,000 FLOPs steps);
    ``flops`` — the Lagrangian optima (the knapsack's convex hull) nearest to those FLOPs; ``hull`` —
    Lagrangian optima evenly spaced in their list ordered by predicted loss (bunched where the hull has
    many near-dense optima). A front's hypervolume is an integral over cost: gaps in cost are what it
    loses, and the hull leaves gaps the knapsack fills. ``max_run`` (knapsack only): no layer reuses its
    attention or block output (:data:`REUSING`) for more than that many steps in a row (from dense to
    the fastest plan that keeps to it). ``max_loss``: from dense to the fastest plan whose summed
    (weighted) loss is at most that, none beyond. A space with a cache interval (``search.space.interval``)
    solves the problem once per interval — its skipped steps priced as the interval's method, its cells
    over the steps that compute — and every target takes the interval whose plan has the least loss
    (exact for the interval as one more choice). Deterministic."""
    if spread not in PROPOSAL_SPREADS:
        raise ValueError(f"unknown proposal spread {spread!r}; use one of {list(PROPOSAL_SPREADS)}")
    if max_run is not None and spread != "knapsack":
        raise ValueError(f"a reuse run limit needs spread 'knapsack', not {spread!r}")
    methods = _usable_methods(space, proxy)
    if max_run is not None and max_run >= space.target.num_steps - 1:
        max_run = None  # a limit as long as the sampling run limits nothing
    losses = proxy.weighted
    options = [o for interval in [None, *space.intervals()]
               if (o := _interval_cells(space, methods, losses, flops, interval, max_run)) is not None]
    if spread == "knapsack":
        picks = _knapsack(options, count, max_loss=max_loss)
    else:
        optima = sorted((p for p in _lagrangian_optima(options)
                         if max_loss is None or _predicted(options, p)[0] <= max_loss),
                        key=lambda p: _predicted(options, p))  # costs descend
        if spread == "hull":
            keep = {int(round(x)) for x in np.linspace(0, len(optima) - 1, min(count, len(optima)))}
        else:
            keep = _nearest(np.array([_predicted(options, p)[1] for p in optima]), count)
        picks = [optima[k] for k in keep]
    picks.sort(key=lambda p: _predicted(options, p))  # most faithful first
    plans = [_plan(space, options[o], [methods[j] for j in pick], proxy) for o, pick in picks]
    return list({plan.grid: plan for plan in plans}.values())  # one plan from two intervals: a cell reusing throughout


@dataclass(frozen=True)
class RunCap:
    """At most ``limit`` steps in a row of reuse (the knapsack's columns ``methods``) in one layer: cell i
    spans ``length[i]`` steps and ``first[i]`` says it starts a layer's run of cells; under a cache interval
    a computing method at cell i still reuses at the ``head[i]`` steps before its first computed step and
    the ``tail[i]`` after its last."""

    limit: int
    methods: frozenset[int]
    length: Sequence[int]
    first: Sequence[bool]
    head: Sequence[int]
    tail: Sequence[int]


@dataclass(frozen=True)
class _Cells:
    """The knapsack's cells (layer group × step segment, layer-major) at one cache interval (None: none):
    ``cost[i, j]`` / ``loss[i, j]`` the summed predicted FLOPs and loss of giving cell i method j at its
    computed steps, its skipped steps the interval's method (``inf`` loss: not a choice, as at a cell with no
    computed step, which only the interval's method fills); ``runs``: the reuse run cap, if any."""

    interval: CacheInterval | None
    cells: Sequence[tuple[tuple[int, int], tuple[int, int]]]
    cost: np.ndarray
    loss: np.ndarray
    runs: RunCap | None


def _interval_cells(space: PlanSpace, methods: Sequence[str], losses: Mapping[tuple[int, int, str], float],
                    flops: Mapping[tuple[int, int, str], float], interval: CacheInterval | None,
                    max_run: int | None) -> _Cells | None:
    """The cells at ``interval``, or None when no plan can take it (its method not among ``methods``, or its
    gaps longer than ``max_run``)."""
    if interval is not None and interval.method not in methods:
        return None
    if interval is not None and max_run is not None and interval.every - 1 > max_run:
        return None
    cells = [(layers, steps) for layers in space.layer_groups for steps in space.step_segments]
    cost, loss = np.zeros((len(cells), len(methods))), np.zeros((len(cells), len(methods)))
    heads, tails = [], []
    for i, (layers, steps) in enumerate(cells):
        computed = space.computed_steps(*steps, interval)
        skipped = sorted(set(range(*steps)) - computed)
        for j, method in enumerate(methods):
            if not computed and interval is not None and method != interval.method:
                loss[i, j] = np.inf
                continue
            members = [(s, l, method) for s in computed for l in range(*layers) if method != "full"]
            members += [(s, l, interval.method) for s in skipped for l in range(*layers)] if interval else []
            cost[i, j] = sum(flops[m] for m in members)
            loss[i, j] = sum(losses[m] for m in members)
        heads.append(min(computed, default=steps[1]) - steps[0])
        tails.append(steps[1] - 1 - max(computed, default=steps[1] - 1))
    reusing = frozenset(j for j, m in enumerate(methods) if m in REUSING)
    runs = None
    if max_run is not None and reusing:
        runs = RunCap(max_run, reusing, [s1 - s0 for _, (s0, s1) in cells],
                      [i % len(space.step_segments) == 0 for i in range(len(cells))], heads, tails)
    return _Cells(interval, cells, cost, loss, runs)


def _predicted(options: Sequence[_Cells], pick: tuple[int, tuple[int, ...]]) -> tuple[float, float]:
    """The summed predicted (loss, cost) of ``pick``: (the option, a method per cell)."""
    option, rows = options[pick[0]], np.arange(len(pick[1]))
    return float(option.loss[rows, pick[1]].sum()), float(option.cost[rows, pick[1]].sum())


def _lagrangian_optima(options: Sequence[_Cells]) -> list[tuple[int, tuple[int, ...]]]:
    """For a sweep of λ, the option (cache interval) whose cells, each independently taking argmin cost +
    λ·loss, sum to the least: the distinct optima, as (option, a method per cell)."""
    finite = options[0].loss[np.isfinite(options[0].loss)]  # the first option, no interval, has no excluded choice
    scale = max(float(np.abs(options[0].cost).max()), 1e-12) / max(float(finite.max()), 1e-12)  # λ: cost per unit of loss
    optima = set()
    for lam in LAMBDA_SWEEP * scale:
        values = [o.cost + lam * o.loss for o in options]
        best = int(np.argmin([v.min(axis=1).sum() for v in values]))  # ties: the first (no interval)
        optima.add((best, tuple(int(j) for j in np.argmin(values[best], axis=1))))
    return list(optima)


def _knapsack(options: Sequence[_Cells], count: int, steps: int = 4000,
              max_loss: float | None = None) -> list[tuple[int, tuple[int, ...]]]:
    """For ``count`` evenly spaced savings targets from none to the most, the least summed loss with
    savings ≥ the target, by dynamic programming over each option's cells (−cost on a grid of ``steps``
    units shared by all options; a choice that costs more than dense saves nothing), the target taking the
    option of least loss: the distinct plans (fewer where targets share one), as (option, a method per
    cell). ``max_loss``: the most savings is that of the fastest plan within this summed loss."""
    savings = [np.where(o.cost < 0, -o.cost, 0.0) for o in options]
    quantum = max(max(float(s.max(axis=1).sum()) for s in savings), 1e-12) / steps
    units = [np.rint(s / quantum).astype(int) for s in savings]
    tables = [_knapsack_table(u, o.loss, steps, o.runs) for u, o in zip(units, options)]
    targets = np.rint(np.linspace(0, max(t.reach(max_loss) for t in tables), count)).astype(int)
    chosen = np.stack([t.best.min(axis=0)[targets] for t in tables]).argmin(axis=0)  # ties: the first option
    picks = set()
    for o, table in enumerate(tables):
        if (chosen == o).any():
            picks.update((o, tuple(int(j) for j in row)) for row in table.walk_back(units[o], targets[chosen == o]))
    return sorted(picks)


@dataclass(frozen=True)
class _Table:
    """The knapsack's dynamic program over the cells: ``best[r, k]`` the least loss of all cells with
    savings ≥ k units ending in a reuse run of r steps; ``method[i, r, k]`` / ``came[i, r, k]`` the choice
    at cell i that reached (r, k) and the run length before it."""

    best: np.ndarray
    method: np.ndarray
    came: np.ndarray

    def reach(self, max_loss: float | None = None) -> int:
        """The most savings (units) any plan within the table's run limit (and of summed loss ≤ ``max_loss``)
        has; −1 when no plan is."""
        least = self.best.min(axis=0)  # non-decreasing in savings
        return int(np.flatnonzero(np.isfinite(least) if max_loss is None else least <= max_loss).max(initial=-1))

    def walk_back(self, units: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The least-loss plan (a method per cell) for every savings target, all targets at once."""
        k, picks = targets.copy(), np.zeros((len(targets), len(units)), dtype=np.int64)
        r = self.best[:, k].argmin(axis=0)
        for i in reversed(range(len(units))):
            picks[:, i] = self.method[i, r, k]
            r = self.came[i, r, k]
            k = np.maximum(k - units[i, picks[:, i]], 0)
        return picks


def _knapsack_table(units: np.ndarray, loss: np.ndarray, steps: int, runs: RunCap | None) -> _Table:
    """The dynamic program over the cells in order: each takes every method from every state it can
    (a computing method from the best state whose run its head can lengthen, to a run of its tail; reuse
    from a run it can lengthen)."""
    cap = runs.limit if runs is not None else 0
    best = np.full((cap + 1, steps + 1), np.inf)
    best[0, 0] = 0.0
    method = np.zeros((len(units), cap + 1, steps + 1), dtype=np.int16)
    came = np.zeros((len(units), cap + 1, steps + 1), dtype=np.int16)
    reach = np.arange(steps + 1)
    for i in range(len(units)):
        new = np.full_like(best, np.inf)
        head, tail = (0, 0) if runs is None else (runs.head[i], runs.tail[i])
        room = best if runs is None or runs.first[i] else best[: cap + 1 - head]  # head ≤ an interval's gap ≤ cap
        lowest, lowest_run = room.min(axis=0), room.argmin(axis=0)
        for j in range(units.shape[1]):
            shift = np.maximum(reach - units[i, j], 0)
            if runs is None or j not in runs.methods:  # computes: the run ends (and its tail starts one)
                rows, moved, before = slice(tail, tail + 1), (lowest[shift] + loss[i, j])[None], lowest_run[shift][None]
            elif runs.length[i] > cap:
                continue
            elif runs.first[i]:  # reuse opening a layer: a run of this cell's length
                rows = slice(runs.length[i], runs.length[i] + 1)
                moved, before = (lowest[shift] + loss[i, j])[None], lowest_run[shift][None]
            else:  # reuse: the run grows by this cell's length
                rows = slice(runs.length[i], cap + 1)
                moved = best[: cap + 1 - runs.length[i]][:, shift] + loss[i, j]
                before = np.broadcast_to(np.arange(cap + 1 - runs.length[i])[:, None], moved.shape)
            better = moved < new[rows]
            new[rows] = np.where(better, moved, new[rows])
            method[i, rows] = np.where(better, j, method[i, rows])
            came[i, rows] = np.where(better, before, came[i, rows])
        best = new
    return _Table(best, method, came)


def _nearest(costs: np.ndarray, count: int) -> set[int]:
    """Indices of the plans nearest to ``count`` evenly spaced costs between the first and the last,
    each taken once."""
    free, keep = set(range(len(costs))), set()
    for target in np.linspace(costs[0], costs[-1], min(count, len(costs))):
        nearest = min(free, key=lambda k: (abs(costs[k] - target), k))
        free.discard(nearest)
        keep.add(nearest)
    return keep


def _plan(space: PlanSpace, cells: _Cells, picked: Sequence[str], proxy: Proxy) -> Plan:
    target, interval = space.target, cells.interval
    grid = [["full"] * target.num_layers for _ in range(target.num_steps)]
    for (layers, steps), method in zip(cells.cells, picked):
        computed = space.computed_steps(*steps, interval)
        for step in range(*steps):
            for layer in range(*layers):
                grid[step][layer] = method if step in computed else interval.method  # type: ignore[union-attr]
    used = {m for row in grid for m in row}
    params = {m: dict(p) for m, p in proxy.params.items() if m in used}
    return Plan(target, tuple(map(tuple, grid)), params=params, provenance={"search": "proxy-proposal"})
