"""Search spaces: what a trial draws is a valid plan, and a plan maps back to the trial's parameters."""

import dataclasses

import optuna
import pytest

from ditplan.errors import UserError
from ditplan.plan import Plan, PlanTarget
from ditplan.plansearch.space import (
    INTERVAL,
    NO_CACHE,
    NO_NETWORK,
    CacheChoices,
    IntervalChoices,
    SparseChoices,
    SparseNetwork,
    build_space,
    cache_choices,
    interval_skips,
)
from ditplan.strategies.apply import CachePlanner, build_strategies, sparse_layout
from ditplan.strategies.diffusers_cache import CACHE_METHODS
from ditplan.strategies.sdtm import SparseLayout

TARGET = PlanTarget("m", "base", num_layers=6, num_tokens=256, scheduler="ddim", num_steps=10, guidance_scale=4.0)
NETWORK = SparseNetwork("sparse/p1-s1_5", dataclasses.replace(TARGET, model="tuned", weights_hash="tuned"),
                        pool_layers=1, modules=((1, 5),), rate_range=(0.5, 0.875))


def draw(space, trials=40, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(trials):
        trial = study.ask()
        out.append((space.suggest(trial), trial.params))
        study.tell(trial, 0.0)
    return out


def test_a_grouped_space_draws_groups_and_maps_plans_back():
    space = build_space(TARGET, ["full", "ast", "wars"], layer_groups=2, step_segments=3)
    for plan, params in draw(space):
        assert all(m == "full" for m in plan.grid[0])  # step 0 stays dense
        assert space.params_for(plan) == params
        build_strategies(plan)  # every drawn parameter is valid
    mixed = Plan(TARGET, (("full",) * 6,) + (("ast",) + ("full",) * 5,) * 9)  # layer 0 ≠ rest of its group
    assert space.params_for(mixed) is None


def test_sparse_choices_fix_the_layout_cells_and_keep_rates_in_the_network_range():
    space = build_space(TARGET, ["full", "ast", "asc"], layer_groups=3, step_segments=2,
                        sparse=SparseChoices((NETWORK,), pool_layers=(0, 2), curves=("constant", "paper", "step")))
    seen = set()
    for plan, params in draw(space, trials=60):
        assert space.params_for(plan) == params
        layout = sparse_layout(plan)
        if params["sparse.network"] == NO_NETWORK:
            seen.add(f"pool{params['sparse.pool_layers']}")
            assert plan.target == TARGET
            assert all(row[:params["sparse.pool_layers"]] == ("pool",) * params["sparse.pool_layers"] for row in plan.grid)
            continue
        seen.add(layout.curve.name)
        assert plan.target == NETWORK.target and layout.weights == NETWORK.weights
        assert all(row[0] == "pool" and row[1:5] == ("full",) * 4 for row in plan.grid)
        assert "L2-3/S1-4" not in params  # a group wholly inside the layout is not drawn
        for step in range(plan.num_steps):
            assert 0.5 <= layout.curve.rate(step, plan.num_steps) <= 0.875
    assert seen == {"pool0", "pool2", "constant", "paper", "step"}


def test_a_network_draws_block_caching_for_its_own_blocks_and_its_plans_map_back():
    """With block caching among the methods, a plan on a network draws a cache interval for the blocks its layout
    fixes (the grid cannot draw them): its SDTM module as a whole, or its Poolingformer layer too."""
    target = dataclasses.replace(TARGET, num_steps=20)
    network = dataclasses.replace(NETWORK, target=dataclasses.replace(NETWORK.target, num_steps=20))
    space = build_space(target, ["full", "ast", "reuse", "forecast"], layer_groups=3, step_segments=2,
                        sparse=SparseChoices((network,), (0,), ("paper",), cache_every=(2, 3), cache_stop=(0.8, 1.0)))
    seen = set()
    for plan, params in draw(space, trials=80):
        assert space.params_for(plan) == params
        if params["sparse.network"] == NO_NETWORK:
            continue
        sparse_layout(plan)  # a valid layout: the module computes or is skipped as a whole
        cache = "sparse.sparse/p1-s1_5.cache"
        columns = [tuple(row[layer] for row in plan.grid) for layer in range(6)]
        if params[cache] == NO_CACHE:
            assert columns[0] == ("pool",) * 20 and all(c == ("full",) * 20 for c in columns[1:5])
            continue
        every, stop, blocks = params[f"{cache}.every"], params[f"{cache}.stop"], params[f"{cache}.blocks"]
        seen.add((params[cache], every, stop, blocks))
        skipped = [s for s in range(20) if 2 <= s < round(stop * 20) and (s - 2) % every]
        for layer in range(1, 5):
            assert [s for s in range(20) if columns[layer][s] != "full"] == skipped
            assert {columns[layer][s] for s in skipped} == {params[cache]}
        assert [s for s in range(20) if columns[0][s] != "pool"] == (skipped if blocks == "all" else [])
        assert columns[5][0] == "full"  # the free layer is the grid's
    assert len(seen) >= 10  # of the 16 cachings
    uncached = dataclasses.replace(space, sparse=dataclasses.replace(space.sparse, cache_every=()))
    drawn = next(plan for plan, params in draw(space, trials=80) if params.get("sparse.sparse/p1-s1_5.cache") not in (None, NO_CACHE))
    assert uncached.params_for(drawn) is None  # a caching this space does not draw


def replay(space, params):
    return space.suggest(optuna.trial.FixedTrial(params))


def test_a_grid_interval_skips_the_grids_blocks_together_and_draws_cells_only_where_they_compute():
    """FORA's cache interval on the grid's blocks: at the steps it skips every layer the grid draws takes its
    method (the layout's blocks keep theirs); cells draw the computed steps; plans map back to parameters
    that rebuild them."""
    target = dataclasses.replace(TARGET, num_steps=20)
    network = dataclasses.replace(NETWORK, target=dataclasses.replace(NETWORK.target, num_steps=20))
    space = build_space(target, ["full", "ast", "reuse", "forecast"], layer_groups=3, step_segments=5,
                        sparse=SparseChoices((network,), (0, 1), ("paper",)), interval=IntervalChoices((3, 6), (0.8, 1.0)))
    seen = set()
    for plan, params in draw(space, trials=120):
        CachePlanner(plan, build_strategies(plan))  # every cache a cell reads is written earlier
        assert replay(space, space.params_for(plan)) == plan
        if params[INTERVAL] == NO_CACHE:
            assert not any(k.startswith(f"{INTERVAL}.") for k in params)
            continue
        method, every, stop = params[INTERVAL], params[f"{INTERVAL}.every"], params[f"{INTERVAL}.stop"]
        seen.add((method, every, stop))
        skipped = {s for s in range(20) if 2 <= s < round(stop * 20) and (s - 2) % every}
        fixed = set(sparse_layout(plan).fixed_cells()) if plan.sparse else set()
        for layer in set(range(6)) - fixed:
            assert {plan.grid[s][layer] for s in skipped} == {method}
        for layer in fixed:  # the layout's blocks are not the grid's
            assert method not in {plan.grid[s][layer] for s in skipped}
        for segment in space.step_segments:  # a segment the interval skips whole draws no cell
            assert any(name.endswith(f"/S{segment[0]}-{segment[1] - 1}") for name in params) == \
                bool(set(range(*segment)) - skipped)
    assert len(seen) == 8


def test_the_grid_interval_expresses_the_fixed_caching_plans_and_dense_needs_none():
    target = dataclasses.replace(TARGET, num_steps=20)
    space = build_space(target, ["full", "ast", "reuse"], 2, 5, interval=IntervalChoices((4, 5), (1.0,)))
    every_fifth = Plan(target, tuple(("reuse" if interval_skips(s, 5, 20) else "full",) * 6 for s in range(20)))
    assert space.params_for(every_fifth) == {INTERVAL: "reuse", f"{INTERVAL}.every": 5, f"{INTERVAL}.stop": 1.0,
                                             **{space.cell_name(g, s): "full" for g in space.layer_groups
                                                for s in space.step_segments if s != (9, 12)}}  # 9-11 skip
    assert build_space(target, ["full", "ast", "reuse"], 2, 5).params_for(every_fifth) is None  # segments only
    dense = space.params_for(Plan.uniform(target))
    assert dense[INTERVAL] == NO_CACHE and set(dense.values()) == {NO_CACHE, "full"}
    every_third = Plan(target, tuple(("reuse" if interval_skips(s, 3, 20) else "full",) * 6 for s in range(20)))
    assert space.params_for(every_third) is None  # not an interval of this space
    assert space.project(every_third)[INTERVAL] == NO_CACHE
    with pytest.raises(UserError, match="add reuse or forecast to search.space.methods"):
        build_space(target, ["full", "ast"], 2, 5, interval=IntervalChoices((4,), (1.0,)))


def test_each_cache_interval_alone_is_the_fixed_caching_plan_and_its_parameters_rebuild_it():
    """``proposals.intervals`` enqueues these: FORA's fixed schedules, every computed cell ``full``."""
    target = dataclasses.replace(TARGET, num_steps=20)
    space = build_space(target, ["full", "ast", "reuse", "forecast"], 2, 5, interval=IntervalChoices((2, 5, 6), (0.8, 1.0)))
    plans = space.interval_plans()
    assert sorted(plans) == sorted(f"interval-{m}-{e}-{s}" for m in ("reuse", "forecast") for e in (2, 5, 6)
                                   for s in (0.8, 1.0))
    every_fifth = Plan(target, tuple(("reuse" if interval_skips(s, 5, 20) else "full",) * 6 for s in range(20)))
    assert plans["interval-reuse-5-1.0"].grid == every_fifth.grid
    assert plans["interval-forecast-2-0.8"].grid == tuple(
        ("forecast" if interval_skips(s, 2, 16) else "full",) * 6 for s in range(20))
    for plan in plans.values():  # NOTE: a plan may have two parameter sets (every 6 to 1.0 is every 6 to 0.8 with
        params = space.params_for(plan)  # the last segment's cells reuse); params_for gives one that rebuilds it
        assert params is not None and space.suggest(optuna.trial.FixedTrial(params)).grid == plan.grid
    fifth = space.params_for(plans["interval-reuse-5-1.0"])
    assert (fifth[INTERVAL], fifth[f"{INTERVAL}.every"], fifth[f"{INTERVAL}.stop"]) == ("reuse", 5, 1.0)
    assert {v for k, v in fifth.items() if "/" in k} == {"full"}
    # a gap of every - 1 skipped steps: within max_run 4, every 6 (5 skipped in a row) is left out
    assert sorted(space.interval_plans(max_run=4)) == sorted(n for n in plans if "-6-" not in n)
    assert build_space(target, ["full", "reuse"], 2, 5).interval_plans() == {}  # no interval in the space


def test_plans_outside_the_sparse_choices_are_not_expressible():
    space = build_space(TARGET, ["full", "ast"], 3, 2, sparse=SparseChoices((NETWORK,), (0,), ("paper",)))
    dense = Plan.uniform(TARGET)
    assert space.params_for(dense) == {"sparse.network": NO_NETWORK, "sparse.pool_layers": 0,
                                       "L0-1/S1-4": "full", "L2-3/S1-4": "full", "L4-5/S1-4": "full",
                                       "L0-1/S5-9": "full", "L2-3/S5-9": "full", "L4-5/S5-9": "full"}
    layout = SparseLayout.from_dict({"pool_layers": 1, "modules": [[1, 5]], "weights": NETWORK.weights,
                                     "curve": {"name": "linear", "r_start": 0.875, "r_end": 0.5}})
    row = ("pool", "full", "full", "full", "full", "full")
    assert space.params_for(Plan(NETWORK.target, (row,) * 10, sparse=layout.to_dict())) is None  # curve not offered
    with pytest.raises(ValueError, match="unknown pruning curve 'wavy'"):
        build_space(TARGET, ["full"], 1, 1, sparse=SparseChoices((), (0,), ("wavy",)))


@pytest.mark.parametrize("method, params", [("first_block", {"threshold": [0.05, 0.2]}),
                                            ("forecast_cache", {"threshold": [0.1, 0.3]})])
def test_a_run_time_cache_choice_draws_cache_plans_with_dense_cells_and_maps_them_back(method, params):
    cache = cache_choices(method, params)
    space = build_space(TARGET, ["full", "ast", "reuse", "forecast"], 2, 3,
                        sparse=SparseChoices((NETWORK,), (0, 1), ("paper",)), cache=cache)
    seen = set()
    for plan, drawn in draw(space, trials=40):
        assert space.params_for(plan) == drawn
        if drawn["cache"] == NO_CACHE:
            assert plan.cache is None and not any(k.startswith("cache.") for k in drawn)
            seen |= plan.strategies()
            continue
        config = plan.cache["config"]
        assert drawn == {"cache": method, **{f"cache.{method}.{name}": value for name, value in config.items()}}
        assert set(config) == set(cache.space) and all(config[name] in cache.space[name] for name in config)
        assert config["threshold"] in params["threshold"]
        assert plan == Plan.uniform(TARGET, cache=plan.cache)  # every cell full, no sparse part
        seen.add("cache")
    assert {"cache", "reuse", "forecast", "pool"} <= seen
    other = Plan.uniform(TARGET, cache={"method": method, "config": {"threshold": 0.15}})  # not a choice
    assert space.params_for(other) is None
    assert build_space(TARGET, ["full"], 1, 1).params_for(other) is None  # no cache choice at all


def test_a_cache_choice_keeps_the_methods_own_values_and_refuses_unknown_fields():
    assert cache_choices("taylorseer").space == CACHE_METHODS["taylorseer"].space
    narrowed = cache_choices("taylorseer", {"cache_interval": [2], "disable_cache_after_step": [15]})
    assert narrowed.space == {**CACHE_METHODS["taylorseer"].space, "cache_interval": [2],
                              "disable_cache_after_step": [15]}
    with pytest.raises(UserError, match=r"search.space.cache.method: unknown cache 'teacache'.*; choose one of \['first_block', "
                                        r"'forecast_cache', 'mag', 'taylorseer'\]"):
        cache_choices("teacache")
    with pytest.raises(UserError, match="cache.params.mag_ratios is measured on the model .*, not drawn; drop it"):
        cache_choices("mag", {"mag_ratios": [[1.0] * 10]})
    with pytest.raises(UserError, match="'first_block' has no field 'interval'"):
        cache_choices("first_block", {"interval": [2]})


def test_an_experiment_file_makes_a_diffusers_cache_a_search_choice(tiny_adapter, tiny_spec):
    from ditplan.plansearch.space import experiment_space
    from ditplan.spec import SpaceSpec

    def with_space(**space):
        return tiny_spec.model_copy(update={"search": tiny_spec.search.model_copy(update={"space": SpaceSpec(**space)})})

    space = experiment_space(tiny_adapter, with_space(methods=["full", "reuse", "forecast"],
                                                      cache={"method": "taylorseer", "params": {"cache_interval": [2, 3]}}))
    assert space.methods == ("full", "reuse", "forecast") and space.params == {"forecast": {"order": [1, 2]}}
    assert space.cache == CacheChoices("taylorseer", {**CACHE_METHODS["taylorseer"].space, "cache_interval": [2, 3]})
    assert experiment_space(tiny_adapter, with_space()).cache is None
    assert experiment_space(tiny_adapter, with_space()).interval is None
    assert experiment_space(tiny_adapter, with_space(methods=["full", "reuse"], interval={})).interval == \
        IntervalChoices((2, 3, 4, 5), (0.8, 1.0))
    with pytest.raises(UserError, match="'taylorseer' has no field 'threshold'"):
        experiment_space(tiny_adapter, with_space(cache={"method": "taylorseer", "params": {"threshold": [0.1]}}))
    with pytest.raises(UserError, match=r"search.space.cache: forecast cache fn 1 \+ bn 1 leave none of the model's 2 "
                                        r"blocks to skip; lower fn or bn so that fn \+ bn < 2; set them in "
                                        r"search.space.cache.params") as err:
        experiment_space(tiny_adapter, with_space(cache={"method": "forecast_cache"}))  # the tiny DiT has 2 blocks
    assert "\n" not in str(err.value)
    fitting = experiment_space(tiny_adapter, with_space(cache={"method": "forecast_cache", "params": {"bn": [0]}}))
    assert fitting.cache == CacheChoices("forecast_cache", {**CACHE_METHODS["forecast_cache"].space, "bn": [0]})


def test_a_mag_cache_choice_draws_plans_that_carry_the_models_calibrated_ratios(tiny_adapter, tiny_spec, tmp_path,
                                                                             monkeypatch):
    import ditplan.evaluators.reference
    from ditplan.plansearch.space import experiment_space
    from ditplan.spec import SpaceSpec
    from ditplan.strategies.diffusers_cache import DiffusersCache, calibrated_config

    spec = tiny_spec.model_copy(update={
        "search": tiny_spec.search.model_copy(update={"space": SpaceSpec(methods=["full", "ast"], cache={"method": "mag"})}),
        "evaluation": tiny_spec.evaluation.model_copy(update={"cache_dir": str(tmp_path)})})
    space = experiment_space(tiny_adapter, spec)
    _, conditions, seeds = spec.seed_set("calibration")  # the experiment's calibration batch, dense
    assert space.cache.fixed == calibrated_config("mag", tiny_adapter, spec.sampler.settings(), conditions, seeds)
    assert len(space.cache.fixed["mag_ratios"]) == spec.sampler.num_steps
    monkeypatch.setattr(ditplan.evaluators.reference, "calibrated_config", None)  # measured once: read back now
    assert experiment_space(tiny_adapter, spec).cache == space.cache
    drawn = [plan for plan, params in draw(space, trials=20) if params["cache"] == "mag"]
    assert drawn and all(space.params_for(plan) is not None for plan in drawn)
    for plan in drawn:
        assert plan.cache["config"]["mag_ratios"] == space.cache.fixed["mag_ratios"]
        assert DiffusersCache.from_plan(plan).settings()["num_inference_steps"] == spec.sampler.num_steps


def test_the_joint_quickstart_space_joins_attention_block_caching_sparsedit_and_a_diffusers_cache(embedded_adapter):
    from pathlib import Path

    from ditplan.plansearch.space import experiment_space
    from ditplan.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "ditplan" / "experiments" / "quickstart-joint.yaml")
    space = experiment_space(embedded_adapter, spec)
    assert {"ast", "wars", "asc", "reuse", "forecast"} <= set(space.methods)
    assert space.sparse is not None and len(space.sparse.networks) == 3
    assert space.cache == CacheChoices("first_block", {"threshold": [0.05, 0.1, 0.15, 0.2, 0.3]})
