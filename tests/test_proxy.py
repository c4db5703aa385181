"""The proxy (greedy's losses at δ = 0), the plans it proposes, and warm-start plans the sampler learns from."""

import dataclasses
import itertools

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from ditplan.errors import UserError
from ditplan.evaluators.fidelity import relative_l1
from ditplan.models.adapters import experiment_adapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanTarget
from ditplan.plansearch.driver import run_search
from ditplan.plansearch.greedy import CANDIDATES, greedy_search
from ditplan.plansearch.proxy import (
    Proxy,
    cached_proxy,
    cell_flops,
    experiment_proxy,
    measure_gains,
    measure_proxy,
    probe_steps,
    propose,
    proxy_candidates,
)
from ditplan.plansearch.queue import proposal_max_loss
from ditplan.plansearch.space import IntervalChoices, build_space, experiment_space, space_methods
from ditplan.plansearch.storage import load_finished_study
from ditplan.rundir import SearchDir
from ditplan.spec import ProposalSpec, load_spec
from ditplan.strategies.apply import run_plan
from tests.conftest import DATA

TARGET = PlanTarget("m", "base", num_layers=2, num_tokens=16, scheduler="ddim", num_steps=3, guidance_scale=4.0)


def _batch(spec):
    return spec.workload.conditions()[:2], spec.workload.seeds()[:2]


def test_the_proxy_is_the_losses_greedy_measures_for_the_same_cells(tiny_adapter, tiny_spec):
    settings = tiny_spec.sampler.settings()
    proxy = measure_proxy(tiny_adapter, settings, *_batch(tiny_spec))
    steps, layers = settings.num_steps, tiny_adapter.num_layers
    assert set(proxy.losses) == {(s, l, m) for s in range(1, steps) for l in range(layers) for m in CANDIDATES}
    assert all(np.isfinite(v) and v >= 0 for v in proxy.losses.values()) and max(proxy.losses.values()) > 0

    at_zero = greedy_search(tiny_adapter, settings, *_batch(tiny_spec), 0.0)
    assert at_zero.losses == proxy.losses  # every cell, exactly
    assert proxy.sample_forwards == at_zero.sample_forwards
    loose = greedy_search(tiny_adapter, settings, *_batch(tiny_spec), 5.0)  # compresses: its trajectory differs later
    assert loose.plan.strategies() != {"full"}
    first = {k: v for k, v in loose.losses.items() if k[:2] == (1, 0)}  # step 1, layer 0: still all-dense context
    assert first and all(proxy.losses[k] == v for k, v in first.items())
    assert Proxy.from_json(proxy.to_json()) == proxy


def test_a_space_with_block_caching_adds_its_methods_to_the_cells_the_proxy_measures(tiny_adapter, tiny_spec,
                                                                                     monkeypatch):
    """Each reuse / forecast cell's loss is that cell alone against dense: the transformer output at its
    step with only that layer skipped, on the dense trajectory, against the dense output there."""
    settings = tiny_spec.sampler.settings()
    candidates = proxy_candidates(["full", "ast", "wars", "asc", "wars+asc", "reuse", "forecast"])
    assert candidates == (*CANDIDATES, "reuse", "forecast") and proxy_candidates(["full", "ast"]) == CANDIDATES
    proxy = measure_proxy(tiny_adapter, settings, *_batch(tiny_spec), candidates=candidates)
    steps, layers = settings.num_steps, tiny_adapter.num_layers
    assert set(proxy.losses) == {(s, l, m) for s in range(1, steps) for l in range(layers) for m in candidates}
    outputs = []
    predict = tiny_adapter.predict
    monkeypatch.setattr(tiny_adapter, "predict", lambda x, *a: outputs.append(predict(x, *a)) or outputs[-1])
    target = plan_target(tiny_adapter, settings)

    def output_at(step, cell=None):  # the transformer output at `step` of a plan dense but for `cell`
        grid = [["full"] * layers for _ in range(steps)]
        if cell is not None:
            grid[step][cell[0]] = cell[1]
        outputs.clear()
        run_plan(tiny_adapter, Plan(target, tuple(map(tuple, grid))), *_batch(tiny_spec), settings)
        assert len(outputs) == steps
        return outputs[step]

    for step, layer, method in ((1, 0, "reuse"), (steps - 1, layers - 1, "forecast"), (2, 1, "reuse")):
        expected = relative_l1(output_at(step), output_at(step, (layer, method)))
        assert expected > 0 and proxy.losses[step, layer, method] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_an_experiments_proxy_is_keyed_by_its_block_caching_candidates(tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    proposals = ProposalSpec(count=2, gain_probes=1)
    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"proposals": proposals})})
    adapter = experiment_adapter(spec)
    path = SearchDir(tmp_path).proxy
    plain, measured = experiment_proxy(adapter, spec, path)
    assert measured and {m for _, _, m in plain.losses} == set(CANDIDATES)
    space = spec.search.space.model_copy(update={"methods": [*space_methods(spec.search.space, type(adapter)), "reuse"]})
    cached = spec.model_copy(update={"search": spec.search.model_copy(update={"space": space})})
    with pytest.raises(UserError, match=r"candidates None there, \['ast', 'wars\+asc', 'wars', 'asc', 'reuse'\] now"):
        experiment_proxy(adapter, cached, path)  # a stored proxy of greedy's candidates is not the block space's
    proxy, measured = experiment_proxy(adapter, cached, tmp_path / "block.json")
    assert measured and {m for _, _, m in proxy.losses} == {*CANDIDATES, "reuse"}
    assert {k: v for k, v in proxy.losses.items() if k[2] != "reuse"} == plain.losses
    assert experiment_proxy(adapter, cached, tmp_path / "block.json") == (proxy, False)


def test_a_stored_proxy_is_reused_only_when_measured_with_the_same_settings(tmp_path):
    path, stored = SearchDir(tmp_path).proxy, Proxy({(1, 0, "ast"): 0.5}, {}, 10, 1.0, {(1, "ast"): 2.0})
    calls = []

    def measure():
        calls.append(1)
        return stored

    settings = {"seeds": (0, 1), "gain_probes": 7}
    assert cached_proxy(path, measure, settings) == (stored, True)
    assert cached_proxy(path, measure, {"seeds": [0, 1], "gain_probes": 7}) == (stored, False)  # JSON-equal: reused
    assert calls == [1]
    text = path.read_text()
    with pytest.raises(UserError, match=r"proxy.json was measured with other settings than this search's \(gain_probes 7 there, 0 now\); delete"):
        cached_proxy(path, measure, {"seeds": [0, 1], "gain_probes": 0})
    path.write_text(stored.to_json())  # a file from before the settings were stored (and before gains: no key at all)
    with pytest.raises(UserError, match="written by an older ditplan"):
        cached_proxy(path, measure, settings)
    path.write_text(text.replace('"gains"', '"gainz"'))
    with pytest.raises(UserError, match=r"not a proxy file ditplan can read \(KeyError: 'gains'\); delete it"):
        cached_proxy(path, measure, settings)
    path.write_text(stored.to_json([1]))  # type: ignore[arg-type]  (a hand-edited file)
    with pytest.raises(UserError, match=r"not a proxy file ditplan can read \(ValueError: measured_with is \[1\], not a mapping\)"):
        cached_proxy(path, measure, settings)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a proxy file ditplan can read"):
        cached_proxy(path, measure, settings)
    assert calls == [1] and path.read_text() == "{not json"  # nothing measured, nothing overwritten


@pytest.mark.parametrize("candidates, back", [(CANDIDATES, 1), ((*CANDIDATES, "reuse", "forecast"), 2)])
def test_a_gain_is_the_final_samples_loss_of_its_probe_over_the_probed_cells_losses(tiny_adapter, tiny_spec,
                                                                                   candidates, back):
    """``back``: the steps a probe must replay before its own (a forecast of order 1 reads two residuals)."""
    settings = dataclasses.replace(tiny_spec.sampler.settings(), num_steps=6, batch_size=2)  # two micro-batches
    conditions, seeds = tiny_spec.workload.conditions()[:3], tiny_spec.workload.seeds()[:3]
    proxy = measure_proxy(tiny_adapter, settings, conditions, seeds, candidates=candidates)
    weighed = measure_gains(tiny_adapter, settings, conditions, seeds, proxy, probes=3)
    steps = probe_steps(settings.num_steps, 3)
    assert steps == [1, 3, 5] and weighed.losses == proxy.losses
    dense = run_plan(tiny_adapter, None, conditions, seeds, settings).samples
    target = plan_target(tiny_adapter, settings)
    for s in steps:
        for m in candidates:  # each probe from scratch: every layer at step s runs m
            grid = [["full"] * 2 for _ in range(6)]
            grid[s] = [m] * 2
            final = relative_l1(run_plan(tiny_adapter, Plan(target, tuple(map(tuple, grid))), conditions, seeds,
                                         settings).samples, dense)
            summed = sum(proxy.losses[s, layer, m] for layer in range(2))
            assert np.isclose(weighed.gains[s, m], final / summed, rtol=1e-5, atol=0)
    for m in candidates:  # between probes: linear
        assert np.isclose(weighed.gains[2, m], (weighed.gains[1, m] + weighed.gains[3, m]) / 2)
    assert {s for s, _ in weighed.gains} == set(range(1, 6))
    rows = 2 * len(seeds)  # CFG: both halves
    # a dense run, then per probe step s and method: steps s − back … 5 (the whole run when s − back < 1)
    replayed = sum(6 if s - back < 1 else 6 - (s - back) for s in steps)
    assert weighed.sample_forwards - proxy.sample_forwards == rows * (6 + len(candidates) * replayed)
    assert weighed.weighted[3, 1, "ast"] == proxy.losses[3, 1, "ast"] * weighed.gains[3, "ast"]
    assert Proxy.from_json(weighed.to_json()) == weighed


def _synthetic(seed=0):
    """A proxy and cell FLOPs on TARGET for methods ast (cheap, lossy) and asc (dearer, less lossy)."""
    rng = np.random.default_rng(seed)
    cells = [(s, l) for s in (1, 2) for l in (0, 1)]
    losses = {(s, l, m): float(rng.uniform(0.01, 0.2) * (2 if m == "ast" else 1)) for s, l in cells for m in ("ast", "asc")}
    flops = {(s, l, m): float(-rng.uniform(1, 2) * (3 if m == "ast" else 1)) for s, l in cells for m in ("ast", "asc")}
    return Proxy(losses, {}, 0, 0.0), flops


def _predicted(plan, proxy, flops):
    cells = [(s, l, plan.grid[s][l]) for s in range(1, plan.num_steps) for l in range(plan.num_layers)]
    return (sum(proxy.losses.get(c, 0.0) for c in cells), sum(flops.get(c, 0.0) for c in cells))


def test_proposals_are_the_least_flops_plans_for_their_summed_loss():
    proxy, flops = _synthetic()
    space = build_space(TARGET, ["full", "ast", "asc"], TARGET.num_layers, TARGET.num_steps)  # the full grid
    plans = propose(space, proxy, flops, count=100)
    every = []  # brute force: every plan of the space, by (Σ loss, Σ FLOPs)
    for pick in itertools.product(["full", "ast", "asc"], repeat=4):
        grid = [["full", "full"], list(pick[:2]), list(pick[2:])]
        every.append(_predicted(Plan(TARGET, tuple(map(tuple, grid))), proxy, flops))
    points = [_predicted(p, proxy, flops) for p in plans]
    assert points == sorted(points)  # most faithful first
    assert points[0] == (0.0, 0.0) and points[-1][1] == min(f for _, f in every)  # dense … fastest
    for loss, cost in points:  # no plan of the space is cheaper at ≤ the same summed loss
        assert not any(l <= loss + 1e-12 and c < cost - 1e-12 for l, c in every)
    assert all(space.params_for(p) is not None for p in plans)
    three = propose(space, proxy, flops, count=3)
    assert len(three) == 3 and three[0] == plans[0] and three[-1] == plans[-1]


def test_proposals_weigh_every_cell_by_its_gain():
    proxy, flops = _synthetic()
    weighed = dataclasses.replace(proxy, gains={(s, m): 0.05 if s == 1 else 1.0 for s in (1, 2) for m in ("ast", "asc")})
    space = build_space(TARGET, ["full", "ast", "asc"], TARGET.num_layers, TARGET.num_steps)
    plans = propose(space, weighed, flops, count=100)
    assert plans == propose(space, Proxy(weighed.weighted, {}, 0, 0.0), flops, count=100)
    assert plans != propose(space, proxy, flops, count=100)
    assert set(plans[1].grid[1]) != {"full"} and set(plans[1].grid[2]) == {"full"}  # step 1 is nearly free


def test_knapsack_proposals_are_the_whole_front_of_the_summed_proxy_the_lagrangian_only_its_convex_hull():
    proxy, flops = _synthetic()
    space = build_space(TARGET, ["full", "ast", "asc"], TARGET.num_layers, TARGET.num_steps)  # the full grid
    every = set()  # brute force: every plan of the space, by (Σ loss, Σ FLOPs)
    for pick in itertools.product(["full", "ast", "asc"], repeat=4):
        grid = [["full", "full"], list(pick[:2]), list(pick[2:])]
        every.add(_predicted(Plan(TARGET, tuple(map(tuple, grid))), proxy, flops))
    front = {p for p in every if not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in every)}
    knapsack = [_predicted(p, proxy, flops) for p in propose(space, proxy, flops, 4001, "knapsack")]
    assert knapsack == sorted(knapsack) and set(knapsack) == front  # every unit of savings a target
    hull = {_predicted(p, proxy, flops) for p in propose(space, proxy, flops, 4001, "flops")}
    assert hull < front  # the Lagrangian misses the front's points off its convex hull
    assert len(propose(space, proxy, flops, 3, "knapsack")) == 3


@pytest.mark.parametrize("max_loss", [0.0, 0.05, 0.12, 10.0])
def test_a_loss_bound_gives_the_whole_front_of_the_plans_within_it_and_none_beyond(max_loss):
    proxy, flops = _synthetic()
    space = build_space(TARGET, ["full", "ast", "asc"], TARGET.num_layers, TARGET.num_steps)  # the full grid
    within = set()  # brute force: every plan of the space with Σ loss ≤ the bound, by (Σ loss, Σ FLOPs)
    for pick in itertools.product(["full", "ast", "asc"], repeat=4):
        point = _predicted(Plan(TARGET, (("full", "full"), pick[:2], pick[2:])), proxy, flops)
        if point[0] <= max_loss:
            within.add(point)
    front = {p for p in within if not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in within)}
    assert {_predicted(p, proxy, flops) for p in propose(space, proxy, flops, 4001, max_loss=max_loss)} == front
    hull = {_predicted(p, proxy, flops) for p in propose(space, proxy, flops, 4001, "flops", max_loss=max_loss)}
    assert hull <= front and max(loss for loss, _ in hull) <= max_loss


def test_proposals_are_bounded_by_the_searchs_rel_l1_constraint_only_when_their_losses_predict_it():
    search = load_spec(DATA / "tiny-search.yaml").search  # constraint rel_l1 ≤ 5.0
    assert proposal_max_loss(search) is None  # no proposals
    with_gains = search.model_copy(update={"proposals": ProposalSpec(count=3)})
    assert proposal_max_loss(with_gains) == 5.0
    raw = search.model_copy(update={"proposals": ProposalSpec(count=3, gain_probes=0)})  # losses of the transformer output
    assert proposal_max_loss(raw) is None
    flops_only = with_gains.model_copy(update={"constraints": [c.model_copy(update={"metric": "flops_ratio"})
                                                              for c in search.constraints]})
    assert proposal_max_loss(flops_only) is None


def _longest_reuse_run(plan):
    """The most steps in a row any layer of ``plan`` reuses its attention or block output (ast, reuse, forecast)."""
    longest = 0
    for layer in range(plan.num_layers):
        run = 0
        for step in range(plan.num_steps):
            run = run + 1 if plan.grid[step][layer] in ("ast", "reuse", "forecast") else 0
            longest = max(longest, run)
    return longest


@pytest.mark.parametrize("limit, methods", [(1, ("ast", "asc")), (2, ("ast", "asc")), (3, ("ast", "asc")),
                                            (2, ("ast", "reuse", "asc"))])
def test_a_reuse_run_limit_gives_the_whole_front_of_the_plans_within_it(limit, methods):
    """With block reuse beside ast, a layer's run of either (mixed) is one run."""
    target = dataclasses.replace(TARGET, num_steps=5)  # steps 1–4 × 2 layers: 3⁸ (4⁸) plans
    rng = np.random.default_rng(limit)
    cells = [(s, l) for s in range(1, 5) for l in range(2)]
    proxy = Proxy({(s, l, m): float(rng.uniform(0.01, 0.2) * (1 if m == "asc" else 2)) for s, l in cells
                   for m in methods}, {}, 0, 0.0)
    flops = {(s, l, m): float(-rng.uniform(1, 2) * (1 if m == "asc" else 3)) for s, l in cells for m in methods}
    space = build_space(target, ["full", *methods], target.num_layers, target.num_steps)
    within = set()  # brute force: every plan whose reuse runs are at most `limit` steps, by (Σ loss, Σ FLOPs)
    for pick in itertools.product(["full", *methods], repeat=8):
        plan = Plan(target, (("full", "full"), *(pick[i : i + 2] for i in range(0, 8, 2))))
        if _longest_reuse_run(plan) <= limit:
            within.add(_predicted(plan, proxy, flops))
    front = {p for p in within if not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in within)}
    plans = propose(space, proxy, flops, 4001, max_run=limit)
    assert max(_longest_reuse_run(p) for p in plans) == limit
    assert {_predicted(p, proxy, flops) for p in plans} == front
    unlimited = propose(space, proxy, flops, 4001)
    assert max(_longest_reuse_run(p) for p in unlimited) == 4 and propose(space, proxy, flops, 4001, max_run=4) == unlimited


def _interval_plans(space):
    """Every plan of a one-layer ``space`` without SparseDiT: each cache interval (or none), then a method per step
    segment with computed steps."""
    for interval in [None, *space.intervals()]:
        segments = [(s0, s1) for s0, s1 in space.step_segments if space.computed_steps(s0, s1, interval)]
        for pick in itertools.product(space.methods, repeat=len(segments)):
            cells = {s: m for (s0, s1), m in zip(segments, pick) for s in space.computed_steps(s0, s1, interval)}
            yield Plan(space.target, tuple((cells.get(s, interval and interval.method),) if s else ("full",)
                                           for s in range(space.target.num_steps)))


@pytest.mark.parametrize("limit", [None, 2, 3])
def test_with_a_cache_interval_proposals_are_the_whole_front_of_the_plans_under_every_interval_or_none(limit):
    """The interval is one more choice of the knapsack: its skipped steps priced as its method, its cells over the
    computed steps, a computing cell still reusing at the skipped steps around it (the run limit counts them)."""
    target = dataclasses.replace(TARGET, num_layers=1, num_steps=8)  # steps 1–7 in segments 1–2, 3–5, 6–7
    rng = np.random.default_rng(7)
    methods = ("ast", "reuse", "asc")
    proxy = Proxy({(s, 0, m): float(rng.uniform(0.01, 0.2) * (1 if m == "asc" else 2)) for s in range(1, 8)
                   for m in methods}, {}, 0, 0.0)
    flops = {(s, 0, m): float(-rng.uniform(1, 2) * (1 if m == "asc" else 3)) for s in range(1, 8) for m in methods}
    space = build_space(target, ["full", *methods], 1, [3, 6], interval=IntervalChoices((2, 3, 4), (0.8, 1.0)))
    within = {}  # brute force: every plan of the space within the run limit, by (Σ loss, Σ FLOPs)
    for plan in _interval_plans(space):
        if limit is None or _longest_reuse_run(plan) <= limit:
            within.setdefault(_predicted(plan, proxy, flops), plan)
    front = {p for p in within if not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in within)}
    assert any(space.params_for(within[p])["interval"] != "none" for p in front)  # the intervals make the front
    plans = propose(space, proxy, flops, 4001, max_run=limit)
    assert {_predicted(p, proxy, flops) for p in plans} == front
    assert all(space.params_for(p) is not None for p in plans)
    assert limit is None or max(map(_longest_reuse_run, plans)) == limit
    if limit is None:
        hull = {_predicted(p, proxy, flops) for p in propose(space, proxy, flops, 4001, "flops")}
        assert hull <= front and len(hull) > 2


def test_proposals_leave_out_a_method_the_proxy_measured_with_parameters_the_space_cannot_draw():
    """The proxy measures forecast at its default order 1; a space drawing only order 2 cannot express those
    cells, so proposals do without forecast (every proposal is a point of the space)."""
    rng = np.random.default_rng(0)
    cells = [(s, l) for s in (1, 2) for l in (0, 1)]
    proxy = Proxy({(s, l, m): float(rng.uniform(0.01, 0.2)) for s, l in cells for m in ("ast", "forecast")}, {}, 0, 0.0)
    flops = {(s, l, m): float(-rng.uniform(1, 2)) for s, l in cells for m in ("ast", "forecast")}
    for orders, used in (([1, 2], {"full", "ast", "forecast"}), ([2], {"full", "ast"})):
        space = build_space(TARGET, ["full", "ast", "forecast"], TARGET.num_layers, TARGET.num_steps,
                            {"forecast": {"order": orders}})
        plans = propose(space, proxy, flops, 100)
        assert {m for p in plans for row in p.grid for m in row} == used
        assert all(space.params_for(p) is not None for p in plans)


def test_a_reuse_run_limit_shorter_than_a_step_segment_leaves_reuse_out_of_it():
    proxy, flops = _synthetic()
    space = build_space(TARGET, ["full", "ast", "asc"], TARGET.num_layers, [1, 3])  # one segment: steps 1–2
    assert max(_longest_reuse_run(p) for p in propose(space, proxy, flops, 100)) == 2
    assert {m for p in propose(space, proxy, flops, 100, max_run=1) for row in p.grid for m in row} == {"full", "asc"}
    with pytest.raises(ValueError, match="needs spread 'knapsack', not 'flops'"):
        propose(space, proxy, flops, 100, "flops", max_run=1)


def test_proposals_spread_evenly_over_predicted_flops_where_the_optima_bunch_near_dense():
    target = dataclasses.replace(TARGET, num_layers=4, num_steps=9)
    cells = [(s, l) for s in range(1, 9) for l in range(4)]
    # 30 cells that save little for almost no loss (the optima bunch near dense), then 2 that save much
    losses = {(s, l, "ast"): 1e-4 * (i + 1) if i < 30 else (1.0, 4.0)[i - 30] for i, (s, l) in enumerate(cells)}
    flops = {(s, l, "ast"): -0.1 if i < 30 else -10.0 for i, (s, l) in enumerate(cells)}
    proxy = Proxy(losses, {}, 0, 0.0)
    space = build_space(target, ["full", "ast"], target.num_layers, target.num_steps)
    every = [_predicted(p, proxy, flops)[1] for p in propose(space, proxy, flops, 1000, "flops")]  # the hull
    widest = max(a - b for a, b in zip(every, every[1:]))  # the largest cost gap between neighbouring vertices
    for count in (3, 4):
        for spread, evenly in (("knapsack", True), ("flops", True), ("hull", False)):
            costs = [_predicted(p, proxy, flops)[1] for p in propose(space, proxy, flops, count, spread)]
            assert len(costs) == count and costs[0] == 0.0 and costs[-1] == every[-1]  # dense … fastest
            near = all(abs(c - t) <= widest / 2 for c, t in zip(costs, np.linspace(0.0, every[-1], count)))
            assert near == evenly  # hull: the middle proposals sit among the near-dense optima
    assert len(propose(space, proxy, flops, 6, "flops")) == 6  # more than the gaps allow: still distinct plans
    assert len(propose(space, proxy, flops, 6, "knapsack")) == 4  # targets that share their least-loss plan


def test_in_a_grouped_space_proposals_give_each_group_one_method_by_the_groups_summed_proxy():
    proxy, flops = _synthetic(1)
    space = build_space(TARGET, ["full", "ast", "asc"], 1, 1)  # one cell: every (step ≥ 1, layer)
    plans = propose(space, proxy, flops, count=10)
    assert [p.grid[1][0] for p in plans][0] == "full" and plans[-1].grid[1][0] == "ast"
    for plan in plans:
        assert len({plan.grid[s][l] for s in (1, 2) for l in (0, 1)}) == 1
        assert space.params_for(plan) is not None


def _spec(tmp_path, **search):
    spec = load_spec(DATA / "tiny-search.yaml")
    space = spec.search.space.model_copy(update={"layer_groups": 2, "step_segments": 3})  # the full grid
    evaluation = spec.evaluation.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    workload = spec.workload.model_copy(update={"samples_per_condition": 1})
    search = spec.search.model_copy(update={"space": space, "refine": None, "workers": 1, **search})
    greedy = spec.greedy.model_copy(update={"calibration_samples": 2})
    return spec.model_copy(update={"evaluation": evaluation, "search": search, "workload": workload, "greedy": greedy})


def _study(spec, run_dir):
    return load_finished_study(spec, SearchDir(run_dir))


def test_greedy_plans_and_proposals_enter_the_study_with_parameters_the_sampler_sees_and_a_resume_keeps_them(
        local_ray, tmp_path):
    assert ProposalSpec().max_reuse_run == 10 and ProposalSpec(spread="flops").max_reuse_run is None
    spec = _spec(tmp_path, proposals=ProposalSpec(count=2, max_reuse_run=1))
    adapter = experiment_adapter(spec)
    space = experiment_space(adapter, spec)
    found = greedy_search(adapter, spec.sampler.settings(), *_batch(spec), 5.0).plan
    assert found.strategies() == {"full", "ast"}
    grid = [list(row) for row in found.grid]
    grid[2][1] = "wars"  # as greedy writes WA-RS: the default window, no window parameters
    greedy = dataclasses.replace(found, grid=tuple(map(tuple, grid)), params={"wars": {}}).with_provenance(name="D1")
    params = space.params_for(greedy)
    assert params is not None  # the full grid expresses greedy's plan, its default window included
    odd = dataclasses.replace(greedy, params={"wars": {"window_size": 3}}).with_provenance(name="D2")
    assert space.params_for(odd) is None  # a window the space does not offer: run whole, learned from projected
    projected = space.project(odd)
    assert projected == {**params, "wars.window_size": 1}  # the first window offered; every cell as it was
    assert projected != params  # so a trial with the projected parameters is not D1's plan either
    warm = {"D1": greedy, "D2": odd}
    run = tmp_path / "run"
    run_search(spec, run, trials=3, workers=1, warm_start=warm, show_progress=False)

    for resumed in (False, True):
        study = _study(spec, run)
        done = study.get_trials(states=(TrialState.COMPLETE,))
        by_name = {t.user_attrs.get("name"): t for t in done}
        assert by_name["D1"].params == params and "plan_given" not in by_name["D1"].user_attrs
        assert by_name["D2"].params == projected and by_name["D2"].user_attrs["projected"]
        assert SearchDir(run).load_trial(by_name['D2'].number).params == {"wars": {"window_size": 3}}
        proxy = Proxy.from_json(SearchDir(run).proxy.read_text())
        proposed = propose(space, proxy, cell_flops(adapter, spec.sampler.settings(), proxy), 2, max_run=1)
        assert max(_longest_reuse_run(p) for p in proposed) == 1  # the experiment's limit reached the knapsack
        assert [by_name[f"proposal-{i}"].params for i in range(2)] == [space.params_for(p) for p in proposed]
        # every complete trial carries every cell: multivariate TPE's joint space is the whole grid
        assert set(optuna.search_space.intersection_search_space(done)) == {p for p in params if "/" in p}
        assert len(done) == (2 + 3 if not resumed else 2 + 4)
        if not resumed:
            run_search(spec, run, trials=4, workers=1, resume=True, warm_start=warm, show_progress=False)
    names = [t.user_attrs.get("name") for t in done]
    assert names.count("D1") == names.count("D2") == names.count("proposal-0") == 1  # a resume adds none twice
    other = spec.search.model_copy(update={"proposals": ProposalSpec(count=2, gain_probes=1, max_reuse_run=1)})
    with pytest.raises(UserError, match=r"proxy.json was measured with other settings than this search's \(gain_probes 7 there, 1 now\); delete"):
        run_search(spec.model_copy(update={"search": other}), run, trials=5, workers=1, resume=True, show_progress=False)
    assert len(_study(spec, run).get_trials(states=(TrialState.COMPLETE,))) == 2 + 4
    # a sampler trial with D2's projected parameters runs the projection: D2's values are its whole plan's
    _study(spec, run).enqueue_trial(projected)
    run_search(spec, run, trials=5, workers=1, resume=True, warm_start=warm, show_progress=False)
    last = _study(spec, run).get_trials(states=(TrialState.COMPLETE,))[-1]
    assert last.params == projected and "repeat_of" not in last.user_attrs
    assert last.values != by_name["D2"].values


def test_a_grouped_space_projects_a_plan_it_cannot_express_onto_each_cells_most_used_method():
    space = build_space(TARGET, ["full", "ast", "asc"], 1, 1)
    grid = (("full", "full"), ("ast", "asc"), ("ast", "full"))
    params = space.project(Plan(TARGET, grid))
    assert params == {"L0-1/S1-2": "ast"}  # ast 2 cells, asc 1, full 1
    assert space.project(Plan(TARGET, (("full", "full"), ("asc", "ast"), ("asc", "ast")))) == {"L0-1/S1-2": "ast"}  # tie: the space's order
    plan = space.suggest(optuna.trial.FixedTrial(params))
    assert space.params_for(plan) == params
