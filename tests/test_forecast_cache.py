"""ditplan's forecast cache (method ``forecast_cache``): first and last blocks computed at every call, the middle ones
skipped on the first blocks' residual change and filled by a Taylor forecast, one history per cache context."""

from __future__ import annotations

import pytest
import torch

from ditplan.models.adapters import adapter_from_spec
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan
from ditplan.strategies import run_plan


@pytest.fixture()
def four_block_dit(tiny_spec):
    """The tiny DiT with 4 blocks: block 0 decides, blocks 1–2 are the middle unit, block 3 always computes."""
    return adapter_from_spec(tiny_spec.model.model_copy(update={"config": {**tiny_spec.model.config, "num_layers": 4}}))


def forecast_plan(adapter, settings, **config) -> Plan:
    return Plan.uniform(plan_target(adapter, settings), cache={"method": "forecast_cache", "config": config})


def recorded(adapter, plan, conditions, seeds, settings, probes: dict[str, tuple[int, str]]) -> dict[str, list]:
    """``run_plan`` with, per name, what block ``layer`` took (``"in"``: its first stream) or returned (``"out"``) at
    every call."""
    blocks = type(adapter).blocks(adapter.transformer)
    seen: dict[str, list] = {name: [] for name in probes}
    handles = []
    for name, (layer, side) in probes.items():
        if side == "in":
            handles.append(blocks[layer].register_forward_pre_hook(
                lambda _m, args, kwargs, name=name: seen[name].append((args[0] if args else kwargs["hidden_states"]).clone()),
                with_kwargs=True))
        else:
            handles.append(blocks[layer].register_forward_hook(lambda _m, _a, out, name=name: seen[name].append(out)))
    try:
        seen["run"] = run_plan(adapter, plan, conditions, seeds, settings)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_first_and_last_blocks_compute_at_every_call_and_a_high_threshold_skips_the_middle(four_block_dit, tiny_spec):
    settings = tiny_spec.sampler.settings()  # 4 steps, CFG as one call per step
    skipping = run_plan(four_block_dit, forecast_plan(four_block_dit, settings, threshold=1e9, warmup=2), [1, 2],
                        [0, 1], settings)
    # warm-up 2: steps 0 and 1 compute the middle, steps 2 and 3 skip it; blocks 0 and 3 run at every call
    assert skipping.executed.counts["block"] == [4, 2, 2, 4] and skipping.executed.calls == 4
    capped = run_plan(four_block_dit, forecast_plan(four_block_dit, settings, threshold=1e9, warmup=1, max_skip=1),
                      [1, 2], [0, 1], settings)
    assert capped.executed.counts["block"] == [4, 2, 2, 4]  # step 0 computes, 1 skips, 2 computes (one in a row), 3 skips
    never = run_plan(four_block_dit, forecast_plan(four_block_dit, settings, threshold=0.0, warmup=0), [1, 2], [0, 1],
                     settings)
    assert never.executed.counts["block"] == [4, 4, 4, 4]


@pytest.mark.parametrize("order", [0, 1])
def test_a_skipped_step_takes_a_taylor_forecast_of_the_middle_residual_order_0_reusing_it(four_block_dit, tiny_spec,
                                                                                          order):
    settings = tiny_spec.sampler.settings()
    plan = forecast_plan(four_block_dit, settings, threshold=1e9, warmup=2, order=order)
    seen = recorded(four_block_dit, plan, [1, 2], [0, 1], settings, {"x": (1, "in"), "out": (2, "out")})
    x, out = seen["x"], seen["out"]  # the middle unit's input and output at steps 0-3
    r0, r1 = out[0] - x[0], out[1] - x[1]  # its residuals at the computed steps 0 and 1
    reuse, linear = x[2] + r1, x[2] + r1 + (r1 - r0)  # step 2: the last residual, or extrapolated one step
    torch.testing.assert_close(out[2], reuse if order == 0 else linear, rtol=1e-6, atol=1e-5)
    assert not torch.allclose(reuse, linear, atol=1e-3)  # the two orders differ
    assert seen["run"].executed.counts["block"] == [4, 2, 2, 4]


def test_with_two_calls_per_step_each_guidance_branch_forecasts_from_its_own_history():
    from tests.test_families import PROMPTS, tiny_qwen_adapter

    case, adapter = tiny_qwen_adapter()  # 3 blocks: block 1 is the middle; CFG as two calls per step
    plan = forecast_plan(adapter, case.settings, threshold=1e9, warmup=1, order=0)
    seen = recorded(adapter, plan, PROMPTS, [1, 2], case.settings, {"x": (1, "in"), "out": (1, "out")})
    x, image = seen["x"], [out[1] for out in seen["out"]]  # the middle block's image stream, cond then uncond per step
    (xc0, xu0, xc1, xu1), (oc0, ou0, oc1, ou1) = x[:4], image[:4]
    assert not torch.allclose(oc0 - xc0, ou0 - xu0)  # the branches' residuals differ (their prompts do)
    torch.testing.assert_close(oc1, xc1 + (oc0 - xc0), rtol=0, atol=1e-5)  # each reuses its own step 0
    torch.testing.assert_close(ou1, xu1 + (ou0 - xu0), rtol=0, atol=1e-5)
    # both branches compute the middle block at step 0 only; blocks 0 and 2 at every call
    assert seen["run"].executed.counts["block"] == [8, 2, 8] and seen["run"].executed.calls == 8
