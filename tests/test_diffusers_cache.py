"""Run-time caches as a plan part: diffusers' own (FirstBlockCache, TaylorSeer, MagCache), installed by diffusers'
apply_*, and ditplan's forecast cache (tests/test_forecast_cache.py has its own behaviour)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditplan.evaluators.cost import executed_flops, plan_flops
from ditplan.models.sampling import plan_target, sample
from ditplan.plan import Plan, PlanError, load_plan
from ditplan.strategies import apply_plan, remove_plan, run_plan
from ditplan.strategies.diffusers_cache import calibrated_config


def cache_plan(adapter, settings, method: str, **config) -> Plan:
    """A plan with the cache ``method`` and ``config``, and what the cache measures on the model (MagCache's ratios)."""
    measured = calibrated_config(method, adapter, settings, [3, 4], [5, 6])
    return Plan.uniform(plan_target(adapter, settings), cache={"method": method, "config": {**measured, **config}})


def hooked_modules(transformer: torch.nn.Module) -> list[str]:
    return [name for name, m in transformer.named_modules() if hasattr(m, "_diffusers_hook") or "forward" in m.__dict__]


@pytest.mark.parametrize("method, never_skip, skipping", [
    ("first_block", {"threshold": 0.0}, {"threshold": 1e9}),
    ("taylorseer", {"cache_interval": 1}, {}),
    ("mag", {"max_skip_steps": 0}, {"threshold": 1e9}),  # no step may skip; any error is small enough
    # the tiny DiT's 2 blocks: the first decides, the second is the middle (no last block kept)
    ("forecast_cache", {"threshold": 0.0, "bn": 0}, {"threshold": 1e9, "bn": 0}),
])
def test_a_cache_that_never_skips_equals_dense_and_removal_restores_the_transformer(tiny_adapter, tiny_spec, method,
                                                                                    never_skip, skipping):
    settings = tiny_spec.sampler.settings()
    conditions, seeds = tiny_spec.workload.conditions(), tiny_spec.workload.seeds()
    dense = sample(tiny_adapter, conditions, seeds, settings)
    assert torch.equal(run_plan(tiny_adapter, cache_plan(tiny_adapter, settings, method, **never_skip),
                                        conditions, seeds, settings).samples, dense)
    assert hooked_modules(tiny_adapter.transformer) == []
    skipped = run_plan(tiny_adapter, cache_plan(tiny_adapter, settings, method, **skipping), conditions, seeds, settings)
    assert not torch.equal(skipped.samples, dense)
    assert torch.equal(sample(tiny_adapter, conditions, seeds, settings), dense)


@pytest.mark.parametrize("method, config, expected", [
    # FirstBlockCache, never close enough: every block at step 0, then only the first block (per layer)
    ("first_block", {"threshold": 1e9}, {"block": [4, 1], "self_attention": [4, 1], "cross_attention": [0, 0]}),
    # TaylorSeer, warm-up 1, interval 2: attention computes at steps 0 and 2; the feed-forwards always run
    ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 1}, {"block": [4, 4], "self_attention": [2, 2],
                                                                          "cross_attention": [0, 0]}),
    # MagCache, no step retained, any error small enough: step 0 computes, then it skips every block at most 3 in a row
    ("mag", {"threshold": 1e9, "retention_ratio": 0.0}, {"block": [1, 1], "self_attention": [1, 1],
                                                         "cross_attention": [0, 0]}),
    # the forecast cache, warm-up 1, never close enough: the first block always, the second (middle) at step 0 only
    ("forecast_cache", {"threshold": 1e9, "bn": 0, "warmup": 1}, {"block": [4, 1], "self_attention": [4, 1],
                                                                  "cross_attention": [0, 0]}),
])
def test_executed_parts_are_counted_and_their_flops_equal_the_flop_counter(tiny_adapter, tiny_spec, method, config,
                                                                           expected):
    settings = tiny_spec.sampler.settings()  # 4 steps, CFG; the tiny DiT has 2 blocks
    runtime = apply_plan(tiny_adapter.transformer, cache_plan(tiny_adapter, settings, method, **config))
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            sample(tiny_adapter, [1, 2], [0, 1], settings)
        counts, calls = {k: list(v) for k, v in runtime.executed.counts.items()}, runtime.executed.calls
    finally:
        remove_plan(tiny_adapter.transformer)
    assert counts == expected and calls == 4
    assert executed_flops(tiny_adapter, counts, calls, rows=4).total == counter.get_total_flops()


def test_a_cache_plan_is_checked_before_anything_is_installed(tiny_adapter, tiny_spec, tmp_path):
    settings = tiny_spec.sampler.settings()
    target = plan_target(tiny_adapter, settings)
    mixed = Plan(target, (("full", "full"), ("ast", "full"), ("full", "full"), ("full", "full")),
                 cache={"method": "first_block", "config": {"threshold": 0.1}})
    bad = {
        "keeps every grid cell 'full'": mixed,
        "cache method 'teacache' is unknown": Plan.uniform(target, cache={"method": "teacache"}),
        "has no field 'treshold'": Plan.uniform(target, cache={"method": "first_block", "config": {"treshold": 0.1}}),
        r"cache 'mag' needs mag_ratios \(one per step, measured on the model\): calibrate them on the model at 4 steps "
        r"\(ditplan.calibrated_config\('mag', ": Plan.uniform(target, cache={"method": "mag"}),
        "cache 'mag' has 3 mag_ratios but the plan runs 4 steps: calibrate them on the model at 4 steps":
            Plan.uniform(target, cache={"method": "mag", "config": {"mag_ratios": [1.0, 1.1, 0.9]}}),
        r"forecast cache fn 1 \+ bn 1 leave none of the model's 2 blocks to skip; lower fn or bn so that fn \+ bn < 2":
            Plan.uniform(target, cache={"method": "forecast_cache"}),
        "cache 'forecast_cache' config {'order': 4, 'bn': 0} is invalid: order 4 is not supported; use 0 … 3":
            Plan.uniform(target, cache={"method": "forecast_cache", "config": {"order": 4, "bn": 0}}),
    }
    for message, plan in bad.items():
        with pytest.raises(PlanError, match=message) as err:
            apply_plan(tiny_adapter.transformer, plan)
        assert "\n" not in str(err.value)
        assert hooked_modules(tiny_adapter.transformer) == []
    good = cache_plan(tiny_adapter, settings, "taylorseer", cache_interval=3, max_order=2)
    assert load_plan(good.save(tmp_path / "plan.yaml")) == good
    with pytest.raises(PlanError, match="executed_flops"):
        plan_flops(tiny_adapter, good, settings)


def test_trials_and_the_held_out_evaluation_take_a_cache_plans_flops_from_what_ran(tiny_adapter, tiny_spec):
    from ditplan.evaluators.measure import measure
    from ditplan.plansearch.trial_task import trial_metrics
    from ditplan.spec import SeedSet

    spec = tiny_spec.model_copy(update={"search": tiny_spec.search.model_copy(
        update={"refine": tiny_spec.search.refine.model_copy(update={"samples": 6, "latency_repeats": 3})})})
    settings = spec.sampler.settings()  # 4 steps, CFG; the tiny DiT has 2 blocks
    never, always = (cache_plan(tiny_adapter, settings, "first_block", threshold=t) for t in (0.0, 1e9))
    # skipping everything it can: both blocks at step 0, then only the first block (per sample: 4 rows)
    skipped = executed_flops(tiny_adapter, {"block": [4, 1], "self_attention": [4, 1], "cross_attention": [0, 0]}, 4,
                             rows=4).total
    dense_one = plan_flops(tiny_adapter, None, settings, batch=2).total
    held_out = measure(tiny_adapter, spec, {"never": never, "always": always}, spec.seed_set("held_out"), timed=True,
                       rounds_count=3).metrics
    assert held_out["never"]["flops_ratio"] == 1.0 and held_out["never"]["attention_flops_ratio"] == 1.0
    assert held_out["never"]["rel_l1"] == 0.0
    assert held_out["always"]["flops_ratio"] == skipped / dense_one  # 3 rounds of 2 samples each
    assert held_out["always"]["attention_flops_ratio"] == 5 / 8
    conditions, seeds = [1, 2], [0, 1]
    dense = sample(tiny_adapter, conditions, seeds, settings)
    trial = trial_metrics(spec, always, dense, SeedSet("search", conditions, seeds), ["rel_l1", "flops_ratio"])
    assert trial["flops_ratio"] == skipped / dense_one and trial["rel_l1"] > 0


def test_mag_ratios_are_diffusers_own_calibration_one_per_step_averaged_over_the_samples(tiny_adapter, tiny_spec):
    import dataclasses

    settings = tiny_spec.sampler.settings()  # 4 steps, CFG as one [cond; uncond] call
    ratios = calibrated_config("mag", tiny_adapter, settings, [1, 2, 3], [0, 1, 2])["mag_ratios"]
    assert len(ratios) == settings.num_steps and ratios[0] == 1.0  # step 0 has no residual before it
    assert len(set(ratios)) == settings.num_steps  # measured, not made up
    assert hooked_modules(tiny_adapter.transformer) == []
    one_by_one = calibrated_config("mag", tiny_adapter, dataclasses.replace(settings, batch_size=1), [1, 2, 3],
                                   [0, 1, 2])["mag_ratios"]
    assert one_by_one == pytest.approx(ratios, rel=1e-6)  # the mean over the samples, whatever the batches
    alone = [calibrated_config("mag", tiny_adapter, settings, [c], [s])["mag_ratios"] for c, s in ((1, 0), (2, 1))]
    assert ratios != pytest.approx(alone[0], rel=1e-6) and ratios != pytest.approx(alone[1], rel=1e-6)
