import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditplan.evaluators.cost import ideal_flops_ratio, plan_flops
from ditplan.models.adapters import adapter_from_spec
from ditplan.models.context import StepContext, step_context
from ditplan.models.sampling import guided_prediction, plan_target, sample
from ditplan.plan import Plan, PlanError
from ditplan.spec import load_spec
from ditplan.strategies import apply_plan, remove_plan
from ditplan.strategies.apply import CachePlanner, build_strategies, get_runtime
from ditplan.strategies.attention import window_keys
from tests.conftest import DATA


def grid_plan(target, columns, params=None):
    """columns[layer] = list of method names over steps."""
    grid = tuple(tuple(col[s] for col in columns) for s in range(target.num_steps))
    return Plan(target, grid, params=params or {})


def run(adapter, spec, plan=None):
    settings = spec.sampler.settings()
    if plan is not None:
        apply_plan(adapter.transformer, plan, plan_target(adapter, settings))
    try:
        return sample(adapter, spec.workload.conditions(), spec.workload.seeds(), settings)
    finally:
        remove_plan(adapter.transformer)


def test_window_covering_all_tokens_is_full_attention_in_sampling(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    tokens = tiny_adapter.num_tokens
    plan = grid_plan(target, [["full", "wars", "wars", "wars"]] * 2, {"wars": {"window_size": tokens - 1}})
    assert torch.equal(run(tiny_adapter, tiny_spec, plan), run(tiny_adapter, tiny_spec))


def _layer_call(adapter, layer, x, step, cfg=True, num_steps=4):
    with step_context(StepContext(step=step, num_steps=num_steps, cfg=cfg)):
        return adapter.self_attention_layers()[layer](x)


def test_ast_at_a_step_where_nothing_changed_equals_recomputation(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    x = torch.randn(4, tiny_adapter.num_tokens, tiny_adapter.hidden_dim)
    dense = _layer_call(tiny_adapter, 0, x, step=0)  # no plan applied: the original processor
    apply_plan(tiny_adapter.transformer, grid_plan(target, [["full", "ast", "ast", "full"]] * 2), target)
    try:
        first = _layer_call(tiny_adapter, 0, x, step=0)
        shared = _layer_call(tiny_adapter, 0, torch.randn_like(x), step=1)  # input ignored: output is shared
    finally:
        remove_plan(tiny_adapter.transformer)
    assert torch.equal(first, dense)
    assert torch.equal(shared, dense)


def test_asc_with_identical_halves_equals_full_attention(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    half = torch.randn(2, tiny_adapter.num_tokens, tiny_adapter.hidden_dim)
    x = torch.cat([half, half])
    dense = _layer_call(tiny_adapter, 1, x, step=0)
    apply_plan(tiny_adapter.transformer, grid_plan(target, [["full", "asc", "asc", "asc"]] * 2), target)
    try:
        shared = _layer_call(tiny_adapter, 1, x, step=2)
    finally:
        remove_plan(tiny_adapter.transformer)
    torch.testing.assert_close(shared, dense, rtol=0, atol=1e-6)
    assert torch.equal(shared[:2], shared[2:])


def test_wars_asc_uses_the_conditional_window_for_both_halves(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    plan = grid_plan(target, [["full", "wars+asc", "wars", "full"]] * 2, {"wars+asc": {"window_size": 2}, "wars": {"window_size": 2}})
    x = torch.randn(4, tiny_adapter.num_tokens, tiny_adapter.hidden_dim)
    apply_plan(tiny_adapter.transformer, plan, target)
    try:
        _layer_call(tiny_adapter, 0, x, step=0)
        residual = get_runtime(tiny_adapter.transformer).caches[0]["residual"]
        y = torch.cat([x[:2], torch.randn_like(x[:2])])  # the unconditional half must not matter
        out = _layer_call(tiny_adapter, 0, y, step=1)
        expected_cond = _layer_call(tiny_adapter, 0, torch.cat([x[:2], x[:2]]), step=1)
    finally:
        remove_plan(tiny_adapter.transformer)
    assert residual.shape == x.shape and residual.abs().sum() > 0
    torch.testing.assert_close(out, expected_cond, rtol=0, atol=1e-6)


def test_caches_are_kept_only_while_a_later_step_reads_them(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    plan = grid_plan(target, [["full", "ast", "full", "wars"], ["full", "asc", "full", "full"]], {"wars": {"window_size": 2}})
    planner = CachePlanner(plan, build_strategies(plan))
    assert planner.wants(0, 0) == {"output"}  # step 1 shares it
    assert planner.wants(1, 0) == frozenset()  # ast writes nothing
    assert planner.wants(2, 0) == {"residual"}  # step 3's WA-RS reads it
    assert all(planner.wants(s, 1) == frozenset() for s in range(4))
    run(tiny_adapter, tiny_spec, plan)  # caches are emptied at the end of every run
    apply_plan(tiny_adapter.transformer, plan, target)
    assert get_runtime(tiny_adapter.transformer).cache_bytes() == 0
    remove_plan(tiny_adapter.transformer)


@pytest.mark.parametrize("column, message", [
    (["wars", "full", "full", "full"], "uses 'wars' at step 0, which reuses the residual"),
    (["ast", "full", "full", "full"], "uses 'ast' at step 0, which reuses the output"),
])
def test_a_plan_reusing_what_was_never_computed_is_refused(tiny_adapter, tiny_spec, column, message):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    with pytest.raises(PlanError, match=message):
        apply_plan(tiny_adapter.transformer, grid_plan(target, [column, ["full"] * 4]), target)
    assert get_runtime(tiny_adapter.transformer) is None


def test_window_size_is_validated_against_the_token_count(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    plan = grid_plan(target, [["full", "wars", "wars", "wars"]] * 2, {"wars": {"window_size": 16}})
    with pytest.raises(PlanError, match="window_size 16 does not fit 16 tokens; use 1 … 15"):
        apply_plan(tiny_adapter.transformer, plan, target)
    with pytest.raises(PlanError, match="has no parameter 'window'"):
        apply_plan(tiny_adapter.transformer, Plan(plan.target, plan.grid, {"wars": {"window": 3}}), target)


@pytest.mark.parametrize("experiment", ["tiny-dit.yaml", "tiny-pixart.yaml"])
def test_dense_flops_match_torch_flop_counter(experiment):
    spec = load_spec(DATA / experiment)
    adapter = adapter_from_spec(spec.model)
    settings = spec.sampler.settings()
    conditions = spec.workload.conditions()[:3]
    inputs = adapter.conditioning(conditions, torch.device("cpu")).for_batch(settings.cfg)
    x = torch.randn(3, adapter.latent_channels, adapter.latent_size, adapter.latent_size)
    # NOTE: the math backend decomposes SDPA into matmuls the flop counter sees on CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        guided_prediction(adapter, x, torch.tensor(10), inputs, settings)
    text_tokens = inputs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in inputs else 0
    one_step = type(settings)(settings.scheduler, 1, settings.guidance_scale, settings.batch_size)
    assert plan_flops(adapter, None, one_step, batch=3, text_tokens=text_tokens).total == counter.get_total_flops()
    assert adapter.text_tokens == text_tokens  # what every report counts by default: PixArt's text on both sides
    assert plan_flops(adapter, None, one_step, batch=3).total == counter.get_total_flops()


@pytest.mark.parametrize("count", ["executed", "ideal"])
def test_plan_flops_count_windows_residual_passes_and_sharing(tiny_adapter, tiny_spec, count):
    settings = tiny_spec.sampler.settings()
    target = plan_target(tiny_adapter, settings)
    n, c, rows = tiny_adapter.num_tokens, tiny_adapter.hidden_dim, 2  # batch 1 with CFG
    linear, dense_core = 2 * n * c * c, 4 * n * n * c
    dense = rows * (4 * linear + dense_core)
    w = 3
    # the masked band kernel runs 2 blocks of 8 queries over spans of 8 + 2w keys; the ideal band has fewer
    pairs = {"executed": 2 * 8 * (8 + 2 * w), "ideal": window_keys(n, w)}[count]
    window_core = 4 * pairs * c
    plan = grid_plan(target, [["full", "wars", "ast", "asc"], ["full", "wars+asc", "full", "full"]],
                     {"wars": {"window_size": w, "window_shape": "band"}, "wars+asc": {"window_size": w, "window_shape": "band"}})
    expected = (
        (dense + rows * window_core) + rows * (4 * linear + window_core) + 0 + dense / 2  # layer 0
        + (dense + rows * window_core) + (3 * linear + window_core + rows * linear) + dense + dense  # layer 1
    )
    assert plan_flops(tiny_adapter, plan, settings, batch=1, window_count=count).attention == expected
    assert plan_flops(tiny_adapter, None, settings, batch=1, window_count=count).attention == 8 * dense
    if count == "executed":
        assert plan_flops(tiny_adapter, plan, settings, batch=1).attention == expected  # the default count


@pytest.mark.parametrize("window_shape", ["band", "blocks"])
def test_the_ideal_flops_ratio_counts_the_ideal_window(tiny_adapter, tiny_spec, window_shape):
    settings = tiny_spec.sampler.settings()
    window = {"window_size": 3, "window_shape": window_shape}
    plan = grid_plan(plan_target(tiny_adapter, settings), [["full", "wars", "wars", "full"], ["full"] * 4], {"wars": window})
    dense = plan_flops(tiny_adapter, None, settings).total
    executed = plan_flops(tiny_adapter, plan, settings).total / dense
    ideal = ideal_flops_ratio(tiny_adapter, plan, settings, executed)
    assert ideal == plan_flops(tiny_adapter, plan, settings, window_count="ideal").total / dense
    assert (ideal < executed) if window_shape == "band" else (ideal == executed)
    assert ideal_flops_ratio(tiny_adapter, None, settings, 1.0) == 1.0


def test_poolingformer_equals_attention_with_a_uniform_softmax(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    attn = tiny_adapter.self_attention_layers()[0]
    x = torch.randn(4, tiny_adapter.num_tokens, tiny_adapter.hidden_dim)
    # uniform softmax: all queries zero → every score equal → the mean of the values
    from ditplan.strategies.attention import merge_heads, project_out, project_qkv

    _, k, v = project_qkv(attn, x)
    uniform = torch.nn.functional.scaled_dot_product_attention(torch.zeros_like(k), k, v)
    expected = project_out(attn, merge_heads(uniform))
    apply_plan(tiny_adapter.transformer, grid_plan(target, [["pool"] * 4, ["full"] * 4]), target)
    try:
        out = _layer_call(tiny_adapter, 0, x, step=2)
    finally:
        remove_plan(tiny_adapter.transformer)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[:, 0], out[:, -1])  # one vector for every token


def test_poolingformer_flops_count_only_the_value_and_pooled_output_projections(tiny_adapter, tiny_spec):
    settings = tiny_spec.sampler.settings()
    target = plan_target(tiny_adapter, settings)
    n, c, rows = tiny_adapter.num_tokens, tiny_adapter.hidden_dim, 2
    plan = grid_plan(target, [["pool"] * 4, ["full"] * 4])
    dense = rows * (4 * 2 * n * c * c + 4 * n * n * c)
    assert plan_flops(tiny_adapter, plan, settings, batch=1).attention == 4 * rows * (2 * n * c * c + 2 * c * c) + 4 * dense
