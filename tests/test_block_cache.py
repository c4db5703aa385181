"""Block caching strategies: ``reuse`` (FORA / Δ-DiT style) and ``forecast`` (TaylorSeer style)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditplan.evaluators.cost import plan_flops
from ditplan.models.context import denoising_step
from ditplan.models.sampling import plan_target, sample
from ditplan.plan import Plan, PlanError, load_plan
from ditplan.spec import SamplerSettings
from ditplan.strategies import apply_plan, remove_plan, run_plan
from ditplan.strategies.apply import get_runtime
from ditplan.strategies.block_forecast import BlockForecast, ForecastConfig


def columns_plan(target, columns, params=None) -> Plan:
    """columns[layer] = the cells of that layer over the steps."""
    return Plan(target, tuple(tuple(col[s] for col in columns) for s in range(target.num_steps)), params=params or {})


def test_reuse_at_a_step_whose_block_input_equals_the_cached_steps_equals_recomputation(tiny_adapter, tiny_spec):
    settings = tiny_spec.sampler.settings()
    plan = columns_plan(plan_target(tiny_adapter, settings), [["full", "reuse", "full", "full"]] * 2)
    x = torch.randn(2, 4, 16, 16)
    kwargs = {"timestep": torch.tensor([500, 500]), "class_labels": torch.tensor([3, 10])}
    transformer = tiny_adapter.transformer
    with torch.no_grad():
        dense = transformer(x, **kwargs).sample
        apply_plan(transformer, plan)
        try:
            with denoising_step(0, 4):
                first = transformer(x, **kwargs).sample
            with denoising_step(1, 4):  # both blocks skipped; the same input as at step 0
                reused = transformer(x, **kwargs).sample
        finally:
            remove_plan(transformer)
    assert torch.equal(first, dense)
    torch.testing.assert_close(reused, dense, rtol=1e-6, atol=1e-6)  # x + (out − x) = out up to rounding
    assert not hasattr(transformer.transformer_blocks[0], "_diffusers_hook")


def test_a_forecast_of_order_zero_equals_reuse(tiny_adapter, tiny_spec):
    settings = tiny_spec.sampler.settings()
    target = plan_target(tiny_adapter, settings)
    conditions, seeds = tiny_spec.workload.conditions(), tiny_spec.workload.seeds()
    reuse = run_plan(tiny_adapter, columns_plan(target, [["full", "reuse", "reuse", "full"]] * 2),
                             conditions, seeds, settings).samples
    order0 = columns_plan(target, [["full", "forecast", "forecast", "full"]] * 2, {"forecast": {"order": 0}})
    assert torch.equal(run_plan(tiny_adapter, order0, conditions, seeds, settings).samples, reuse)
    dense = run_plan(tiny_adapter, None, conditions, seeds, settings).samples
    assert not torch.equal(reuse, dense)


@pytest.mark.parametrize("order", [1, 2])
def test_a_forecast_extrapolates_polynomial_residuals_exactly(order):
    a, b, c = torch.full((1, 2, 3), 0.5), torch.full((1, 2, 3), 0.25), torch.full((1, 2, 3), 0.125)

    def residual(step: int) -> torch.Tensor:  # a polynomial of degree `order` in the step index
        return a + b * step + (c * step * step if order == 2 else 0)

    computed = [1, 2, 4][-(order + 1):]
    forecast = BlockForecast(ForecastConfig(order=order))
    out = forecast.block_output(torch.zeros(1, 2, 3), [(s, residual(s)) for s in computed], step=7)
    assert torch.equal(out, residual(7))


def test_block_caches_hold_only_what_later_steps_read(tiny_adapter, tiny_spec):
    settings = SamplerSettings(num_steps=6, guidance_scale=3.0)
    plan = columns_plan(plan_target(tiny_adapter, settings),
                        [["full", "full", "forecast", "full", "full", "full"], ["full"] * 6], {"forecast": {"order": 1}})
    runtime = apply_plan(tiny_adapter.transformer, plan, plan_target(tiny_adapter, settings))
    seen = []
    hook = tiny_adapter.transformer.transformer_blocks[0].register_forward_hook(
        lambda *_: seen.append(len(runtime.block_residuals[0])))
    try:
        sample(tiny_adapter, [1], [0], settings)
    finally:
        hook.remove()
        remove_plan(tiny_adapter.transformer)
    # after each step: the block runs at 0, 1, 3, 4, 5; step 2 forecasts from 0 and 1, the last to read them
    assert seen == [1, 2, 0, 0, 0, 0]
    assert runtime.peak_cache_bytes == 2 * 2 * tiny_adapter.num_tokens * tiny_adapter.hidden_dim * 4
    assert not hasattr(tiny_adapter.transformer.transformer_blocks[0], "_diffusers_hook")


def test_a_block_cell_needs_an_earlier_computed_step(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    with pytest.raises(PlanError, match="uses 'reuse' at step 0, which reuses the block of an earlier step"):
        apply_plan(tiny_adapter.transformer, columns_plan(target, [["reuse", "full", "full", "full"]] * 2))
    assert get_runtime(tiny_adapter.transformer) is None


def test_block_cells_round_trip_through_a_plan_file(tiny_adapter, tiny_spec, tmp_path):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    plan = columns_plan(target, [["full", "reuse", "ast", "forecast"], ["full", "asc", "forecast", "reuse"]],
                        {"forecast": {"order": 2}})
    path = plan.save(tmp_path / "plan.yaml")
    assert "- full:1 reuse:1 ast:1 forecast:1" in path.read_text()
    assert load_plan(path) == plan


def test_plan_flops_of_skipped_blocks_equal_the_flop_counter(tiny_adapter, tiny_spec):
    """A skipped block costs nothing: the count over a sampling run equals what the kernels executed."""
    settings = tiny_spec.sampler.settings()
    plan = columns_plan(plan_target(tiny_adapter, settings),
                        [["full", "reuse", "full", "forecast"], ["full", "ast", "forecast", "full"]])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run_plan(tiny_adapter, plan, [1, 2], [0, 1], settings)
    assert plan_flops(tiny_adapter, plan, settings, batch=2).total == counter.get_total_flops()


def test_a_search_space_draws_block_cells_that_run(tiny_adapter, tiny_spec):
    import optuna

    from ditplan.plansearch.space import build_space

    settings = tiny_spec.sampler.settings()
    space = build_space(plan_target(tiny_adapter, settings), ["full", "reuse", "forecast", "ast"], layer_groups=2,
                        step_segments=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(12):
        trial = study.ask()
        plan = space.suggest(trial)
        assert space.params_for(plan) == trial.params
        drawn |= plan.strategies()
        run_plan(tiny_adapter, plan, [1], [0], settings)
        study.tell(trial, 0.0)
    assert {"reuse", "forecast"} <= drawn
