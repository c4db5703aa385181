"""Window attention: band, dense 1-D blocks and 2-D tiles — exact keys, exact FLOPs, one window per residual."""

from dataclasses import replace

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditplan.errors import UserError
from ditplan.models.context import StepContext
from ditplan.models.sampling import plan_target
from ditplan.plan import PlanError, PlanTarget
from ditplan.plansearch.space import build_space
from ditplan.strategies import (
    AttentionCall,
    AttentionShape,
    apply_plan,
    get_strategy_class,
    remove_plan,
)
from ditplan.strategies.apply import build_strategies
from ditplan.strategies.attention import (
    _gathered_attention,
    _strided_block_attention,
    dense_attention,
    window_attention,
    window_layout,
)
from ditplan.strategies.joint import JointTokens
from ditplan.strategies.wars import WindowResidual
from tests.test_strategies import _layer_call, grid_plan


def reference_mask(shape, tokens, block, halo):
    """Which keys each query sees, written out from the definition (not from the kernel's indices)."""
    side = int(tokens**0.5) if shape == "tiles" else tokens
    width = block + 2 * halo

    def first_key(position):  # first key coordinate of the window of a query coordinate
        return ((position // block) * block - halo).clamp(0, side - width)

    i = torch.arange(tokens)
    if shape == "blocks":
        lo = first_key(i)[:, None]
        return (i[None, :] >= lo) & (i[None, :] < lo + width)
    y, x = i // side, i % side
    ylo, xlo = first_key(y)[:, None], first_key(x)[:, None]
    return (y[None, :] >= ylo) & (y[None, :] < ylo + width) & (x[None, :] >= xlo) & (x[None, :] < xlo + width)


CASES = [  # shape, tokens, window, block (None: derived); halos of 0, < 1 block, 1 block and several blocks
    ("blocks", 64, 10, None), ("blocks", 64, 10, 4), ("blocks", 60, 7, 5), ("blocks", 256, 32, None),
    ("blocks", 48, 3, 16), ("blocks", 64, 6, 8), ("tiles", 64, 6, None), ("tiles", 256, 32, None),
    ("tiles", 256, 60, 2), ("tiles", 144, 30, 3), ("tiles", 64, 12, 4),
]
# 1-D blocks whose size does not divide N (a shorter last block): strided only
RAGGED = [("blocks", 64, 10, 6), ("blocks", 64, 20, 24), ("blocks", 100, 8, 12), ("blocks", 1024, 128, 192),
          ("blocks", 60, 20, 50), ("blocks", 64, 10, 3)]


@pytest.mark.parametrize("shape, tokens, window, block, implementation",
                         [(*c, i) for c in CASES for i in ("strided", "gather")] + [(*c, "strided") for c in RAGGED])
def test_each_block_attends_over_exactly_the_keys_the_cost_model_counts(shape, tokens, window, block, implementation):
    layout = window_layout(shape, tokens, window, block)
    mask = reference_mask(shape, tokens, layout.block, layout.halo)
    assert torch.equal(layout.key_mask(), mask)
    assert layout.pairs() == int(mask.sum()) < tokens * tokens
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(window_attention(q, k, v, layout, implementation), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, tokens, window, block", RAGGED)
def test_blocks_that_do_not_divide_the_tokens_are_refused_by_the_gathered_kernel(shape, tokens, window, block):
    q, k, v = (torch.randn(1, 2, tokens, 4) for _ in range(3))
    with pytest.raises(ValueError, match=f"block size dividing the token count, not {block} of {tokens}"):
        window_attention(q, k, v, window_layout(shape, tokens, window, block), "gather")


def test_the_band_matches_its_masked_reference_and_count():
    layout = window_layout("band", 37, 5)
    q, k, v = (torch.randn(2, 3, 37, 8) for _ in range(3))
    i = torch.arange(37)
    band = (i[:, None] - i[None, :]).abs() <= 5
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    torch.testing.assert_close(window_attention(q, k, v, layout), reference, rtol=1e-5, atol=1e-6)
    assert layout.pairs("ideal") == int(band.sum())


@pytest.mark.parametrize("shape, tokens, block, halo", [("blocks", 48, 16, 16), ("tiles", 36, 2, 2), ("blocks", 60, 12, 24)])
def test_a_window_covering_every_block_equals_full_attention(shape, tokens, block, halo):
    layout = window_layout(shape, tokens, window=tokens, block=block)
    assert layout.covers_all() and layout.pairs() == tokens * tokens
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    dense = dense_attention(q, k, v)
    assert torch.equal(window_attention(q, k, v, layout), dense)  # computed as dense attention
    # the block kernels themselves, with a halo that just covers the axis, see every key as well
    exact = type(layout)(shape, tokens, block=block, halo=halo)
    assert exact.span == exact.side and bool(reference_mask(shape, tokens, block, halo).all())
    torch.testing.assert_close(_gathered_attention(q, k, v, exact), dense, rtol=1e-5, atol=1e-6)
    if shape == "blocks":
        torch.testing.assert_close(_strided_block_attention(q, k, v, exact), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, tokens, window, block, implementation",
                         [(*c, i) for c in CASES if c[1] in (64, 60) for i in ("strided", "gather")]
                         + [(*c, "strided") for c in RAGGED if c[1] < 1024])
def test_window_kernel_flops_equal_the_flop_counter(shape, tokens, window, block, implementation):
    layout = window_layout(shape, tokens, window, block)
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    # NOTE: the math backend decomposes SDPA into matmuls the flop counter sees on CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        window_attention(q, k, v, layout, implementation)
    assert counter.get_total_flops() == 2 * 3 * 2 * 2 * layout.pairs() * 8


@pytest.mark.parametrize("name", ["wars", "wars+asc"])
@pytest.mark.parametrize("params", [{"window_size": 3}, {"window_size": 3, "window_shape": "tiles"},
                                    {"window_size": 5, "window_shape": "band"}])
def test_wars_flops_equal_the_flop_counter_on_a_layer(tiny_adapter, name, params):
    attn = tiny_adapter.self_attention_layers()[0]
    n, c = tiny_adapter.num_tokens, tiny_adapter.hidden_dim
    strategy = get_strategy_class(name).from_params(params)
    strategy.validate(n)
    x = torch.randn(4, n, c)
    call = AttentionCall(attn, attn.processor, x, {}, StepContext(step=1, num_steps=2, cfg=True),
                         {"residual": torch.zeros_like(x)}, frozenset(), lambda _: None)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        strategy.attention(call)
    shape = AttentionShape(batch=4, tokens=n, dim=c, heads=attn.heads)
    assert counter.get_total_flops() == strategy.attention_flops(shape, True, frozenset())  # executed: the default
    ideal = strategy.attention_flops(replace(shape, window_count="ideal"), True, frozenset())
    if params.get("window_shape") == "band":  # the masked band computes its blocks' whole spans
        assert ideal < counter.get_total_flops()
    else:
        assert ideal == counter.get_total_flops()


@pytest.mark.parametrize("tokens, window", [(64, 10), (60, 7), (37, 5), (16, 3), (256, 32), (100, 1)])
def test_the_band_kernel_executes_its_counted_pairs_and_the_ideal_count_is_the_band(tokens, window):
    layout = window_layout("band", tokens, window)
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        window_attention(q, k, v, layout, "banded")
    assert counter.get_total_flops() == 2 * 3 * 2 * 2 * layout.pairs("executed") * 8
    i = torch.arange(tokens)
    assert layout.pairs("ideal") == int(((i[:, None] - i[None, :]).abs() <= window).sum()) < layout.pairs("executed")


@pytest.mark.parametrize("shape, tokens, window, block", [c for c in CASES if c[1] in (64, 60)])
def test_blocks_and_tiles_execute_exactly_their_window(shape, tokens, window, block):
    layout = window_layout(shape, tokens, window, block)
    assert layout.pairs("ideal") == layout.pairs("executed") == int(layout.key_mask().sum())


def test_one_residual_read_through_two_windows_is_refused(tiny_adapter, tiny_spec):
    """wars (w = 2) then wars+asc (w = 5) from one residual would return W₅ + (O − W₂), which is not WA-RS."""
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    windows = {"wars": {"window_size": 2}, "wars+asc": {"window_size": 5}}
    mixed = grid_plan(target, [["full", "wars", "wars+asc", "full"], ["full"] * 4], windows)
    with pytest.raises(PlanError, match="layer 0 reads one residual with 'wars' and, at step 2, with 'wars[+]asc'"):
        apply_plan(tiny_adapter.transformer, mixed, target)
    remove_plan(tiny_adapter.transformer)
    # a dense step between them makes a new residual, for the second window: accepted, and exact
    apart = grid_plan(target, [["full", "wars", "full", "wars+asc"], ["full"] * 4], windows)
    x = torch.randn(4, tiny_adapter.num_tokens, tiny_adapter.hidden_dim)
    apply_plan(tiny_adapter.transformer, apart, target)
    try:
        dense = _layer_call(tiny_adapter, 0, x, step=2)
        same_input = _layer_call(tiny_adapter, 0, torch.cat([x[:2], x[:2]]), step=3)  # W₅ + (O − W₅) = O
    finally:
        remove_plan(tiny_adapter.transformer)
    torch.testing.assert_close(same_input[:2], dense[:2], rtol=0, atol=1e-5)


def test_wars_and_wars_asc_share_one_window(tiny_adapter, tiny_spec):
    """Same window parameters: one residual serves both, and their outputs on the same input agree."""
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    same = {"window_size": 3, "window_shape": "blocks", "block_size": 2}
    plan = grid_plan(target, [["full", "wars", "wars+asc", "full"], ["full"] * 4], {"wars": same, "wars+asc": same})
    x = torch.cat([torch.randn(2, tiny_adapter.num_tokens, tiny_adapter.hidden_dim)] * 2)  # identical halves
    apply_plan(tiny_adapter.transformer, plan, target)
    try:
        dense = _layer_call(tiny_adapter, 0, x, step=0)
        outputs = [_layer_call(tiny_adapter, 0, x, step=s) for s in (1, 2)]
    finally:
        remove_plan(tiny_adapter.transformer)
    for out in outputs:  # W + (O − W) at the dense step's own input
        torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)


TARGET = PlanTarget("m", "base", num_layers=4, num_tokens=256, scheduler="ddim", num_steps=6, guidance_scale=4.0)


def test_a_search_draws_one_window_for_wars_and_wars_asc():
    space = build_space(TARGET, ["full", "wars", "wars+asc"], layer_groups=2, step_segments=2)
    assert space.params["wars"]["window_shape"] == ["band", "blocks", "tiles"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    shapes = set()
    for _ in range(30):
        trial = study.ask()
        plan = space.suggest(trial)
        if {"wars", "wars+asc"} <= plan.strategies():
            assert plan.params["wars"] == plan.params["wars+asc"]
        shapes.add(plan.params.get("wars", {}).get("window_shape"))
        assert space.params_for(plan) == trial.params
        build_strategies(plan)  # valid, including the one-window-per-residual check
        study.tell(trial, 0.0)
    assert {"band", "blocks", "tiles"} <= shapes
    with pytest.raises(UserError, match="wars[+]asc and wars share their parameters"):
        build_space(TARGET, ["wars", "wars+asc"], 1, 1, {"wars": {"window_size": [16]}})


@pytest.mark.parametrize("params, message", [
    ({"window_shape": "disc"}, "unknown window shape 'disc'; use one of"),
    ({"window_shape": "blocks", "block_size": 17}, "blocks block_size 17 is not between 1 and the token count 16"),
    ({"window_shape": "tiles", "block_size": 3}, "tiles block_size 3 does not divide the grid side 4"),
    ({"window_shape": "blocks", "block_size": 0}, "blocks block_size 0 is not between 1 and the token count 16"),
    ({"window_shape": "band", "block_size": 4}, "block_size 4 needs window_shape 'blocks' or 'tiles'"),
])
def test_bad_window_parameters_are_refused_by_name(tiny_adapter, tiny_spec, params, message):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    plan = grid_plan(target, [["full", "wars", "wars", "wars"]] * 2, {"wars": params})
    with pytest.raises(PlanError, match=message):
        apply_plan(tiny_adapter.transformer, plan, target)
    remove_plan(tiny_adapter.transformer)


def test_tiles_need_a_square_grid():
    with pytest.raises(ValueError, match="needs a square token grid, but 60 tokens are not one; use 'blocks'"):
        window_layout("tiles", 60, 8)


# --- joint attention: the window covers the image tokens; text tokens attend and are attended in full ----------
def joint_reference(q, k, v, mask, tokens, layout):
    """Joint attention written out as a masked dense attention: text queries see every (unmasked) key, image
    queries every unmasked text key and the image keys ``layout.key_mask()`` gives them."""
    text = q.shape[2] - tokens.image
    allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
    image_rows = slice(text, None) if tokens.text_first else slice(0, tokens.image)
    allowed[image_rows, image_rows] = layout.key_mask()
    key_mask = torch.ones(q.shape[0], 1, 1, q.shape[2], dtype=torch.bool) if mask is None else mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed & key_mask)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("shape", "window", "block"), [("blocks", 3, 4), ("tiles", 4, 2), ("band", 5, None)])
def test_a_joint_window_equals_its_masked_reference_and_covering_every_token_equals_joint_attention(
        text_first, masked, shape, window, block):
    generator = torch.Generator().manual_seed(0)
    image, text = 16, 5
    q, k, v = (torch.randn(2, 3, image + text, 8, generator=generator) for _ in range(3))
    mask = None
    if masked:  # the second sample's last two text tokens are padding (Qwen-Image's key mask)
        mask = torch.ones(2, 1, 1, image + text, dtype=torch.bool)
        mask[1, ..., (text - 2 if text_first else image + text - 2):(text if text_first else image + text)] = False
    tokens = JointTokens(image, text_first)
    strategy = get_strategy_class("wars").from_params({"window_size": window, "window_shape": shape, "block_size": block})
    strategy.validate(image)
    windowed = strategy.image_window(tokens, q, k, v, mask)
    reference = tokens.split(joint_reference(q, k, v, mask, tokens, strategy.layout))[1]
    torch.testing.assert_close(windowed, reference, rtol=0, atol=1e-6)
    dense = WindowResidual.from_params({"window_size": image - 1, "window_shape": shape})
    dense.validate(image)
    joint = tokens.split(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))[1]
    torch.testing.assert_close(dense.image_window(tokens, q, k, v, mask), joint, rtol=0, atol=1e-6)
