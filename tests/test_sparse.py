"""SparseDiT: SDTM exactness and removal, pruning curves, the cost model, fine-tuning and its plans."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditplan.evaluators.cost import plan_flops
from ditplan.models.adapters import adapter_from_spec, load_adapter
from ditplan.models.context import StepContext, step_context
from ditplan.models.sampling import guided_prediction, plan_target
from ditplan.plan import Plan, PlanError, load_plan
from ditplan.spec import SamplerSettings, load_spec
from ditplan.strategies import apply_plan, remove_plan, run_plan
from ditplan.strategies.curves import CURVES, curve_from_dict
from ditplan.strategies.finetune_sparse import (
    FinetuneConfig,
    export_sparse,
    finetune_sparse,
)
from ditplan.strategies.sdtm import SparseLayout
from ditplan.strategies.sparse_network import load_tuned_adapter, sparse_networks
from tests.conftest import DATA

# 4 blocks on a 4×4 token grid of 32×32 one-channel digits: room for pool + one SDTM, fast to train
SMALL_DIT = {"sample_size": 32, "patch_size": 8, "in_channels": 1, "out_channels": 1, "num_layers": 4,
             "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 10}


def sparse_plan(target, pool_layers=0, modules=((0, 2),), curve=None, weights=None):
    layout = {"pool_layers": pool_layers, "modules": [list(m) for m in modules],
              "curve": curve or {"name": "constant", "r": 0.0}, "weights": weights}
    row = ["pool"] * pool_layers + ["full"] * (target.num_layers - pool_layers)
    return Plan(target, tuple(tuple(row) for _ in range(target.num_steps)), sparse=layout)


def one_forward(adapter, settings, x, inputs, step=0):
    with torch.no_grad(), step_context(StepContext(step, settings.num_steps, settings.cfg)):
        return guided_prediction(adapter, x, torch.tensor(500), inputs, settings)


@pytest.mark.parametrize("experiment", ["tiny-dit.yaml", "tiny-pixart.yaml"])
def test_sdtm_keeping_every_token_with_the_initial_merge_is_the_dense_model(experiment):
    spec = load_spec(DATA / experiment)
    adapter = adapter_from_spec(spec.model)
    settings = spec.sampler.settings()
    inputs = adapter.conditioning(spec.workload.conditions()[:2], torch.device("cpu")).for_batch(settings.cfg)
    x = torch.randn(2, adapter.latent_channels, adapter.latent_size, adapter.latent_size)
    dense = one_forward(adapter, settings, x, inputs)
    apply_plan(adapter.transformer, sparse_plan(plan_target(adapter, settings)))  # r = 0: M = N, W_up = I, W_skip = 0
    try:
        assert torch.equal(one_forward(adapter, settings, x, inputs), dense)
    finally:
        remove_plan(adapter.transformer)


def test_removing_an_sdtm_plan_restores_the_model_exactly():
    adapter = load_adapter("dit", config=SMALL_DIT)
    settings = SamplerSettings(num_steps=4, guidance_scale=3.0, batch_size=4)
    inputs = adapter.conditioning([1, 2], torch.device("cpu")).for_batch(True)
    x = torch.randn(2, 1, 32, 32)
    before_state = {k: v.clone() for k, v in adapter.transformer.state_dict().items()}
    before_out = one_forward(adapter, settings, x, inputs)
    plan = sparse_plan(plan_target(adapter, settings), pool_layers=1, modules=((1, 4),), curve={"name": "constant", "r": 0.75})
    apply_plan(adapter.transformer, plan)
    sparse_out = one_forward(adapter, settings, x, inputs)
    remove_plan(adapter.transformer)
    assert not torch.equal(sparse_out, before_out)  # the plan did change the computation
    assert torch.equal(one_forward(adapter, settings, x, inputs), before_out)
    assert all(torch.equal(v, before_state[k]) for k, v in adapter.transformer.state_dict().items())
    for block in adapter.transformer.transformer_blocks:
        assert not hasattr(block, "_diffusers_hook") and "forward" not in block.__dict__


def test_sdtm_runs_the_middle_blocks_on_the_pooled_token_count():
    adapter = load_adapter("dit", config=SMALL_DIT)
    settings = SamplerSettings(num_steps=4, guidance_scale=3.0)
    seen = []
    hook = adapter.transformer.transformer_blocks[2].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    plan = sparse_plan(plan_target(adapter, settings), modules=((1, 4),), curve={"name": "linear", "r_start": 0.75, "r_end": 0.0})
    try:
        run_plan(adapter, plan, [1], [0], settings)
    finally:
        hook.remove()
    assert seen == [4, 9, 9, 16]  # r 0.75 → 2×2, 0.5 → 3×3 (√8 rounds to 3), 0.25 → 3×3, 0 → all 16


@pytest.mark.parametrize("name", sorted(CURVES))
def test_every_curve_stays_in_range_at_every_step(name):
    space = CURVES[name].search_space()
    for values in zip(*(v for v in space.values())):  # walk the choices in lockstep
        curve = curve_from_dict({"name": name, **dict(zip(space, values))})
        bounds = [getattr(curve, f) for f in space if f.startswith("r")]
        for steps in (1, 2, 7, 20):
            for step in range(steps):
                assert min(bounds) - 1e-12 <= curve.rate(step, steps) <= max(bounds) + 1e-12


def test_the_paper_schedule_is_r_min_for_the_last_quarter_and_r_max_at_pure_noise():
    curve = curve_from_dict({"name": "paper", "r_min": 0.5, "r_max": 0.9})
    rates = [curve.rate(s, 21) for s in range(21)]
    assert rates[0] == pytest.approx(0.9)
    assert all(r == 0.5 for r in rates[15:])  # progress ≥ 0.75
    assert all(a > b for a, b in zip(rates[:15], rates[1:16]))  # strictly falling before
    with pytest.raises(ValueError, match="r_max=1.5 is outside"):
        curve_from_dict({"name": "paper", "r_max": 1.5})
    with pytest.raises(ValueError, match="unknown pruning curve 'zigzag'"):
        curve_from_dict({"name": "zigzag"})


def test_sdtm_flops_match_torch_flop_counter():
    adapter = load_adapter("dit", config=SMALL_DIT)
    settings = SamplerSettings(num_steps=1, guidance_scale=3.0)
    inputs = adapter.conditioning([1, 2, 3], torch.device("cpu")).for_batch(True)
    x = torch.randn(3, 1, 32, 32)
    plan = sparse_plan(plan_target(adapter, settings), pool_layers=1, modules=((1, 4),), curve={"name": "constant", "r": 0.75})
    apply_plan(adapter.transformer, plan)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            one_forward(adapter, settings, x, inputs)
    finally:
        remove_plan(adapter.transformer)
    flops = plan_flops(adapter, plan, settings, batch=3)
    assert flops.total == counter.get_total_flops()
    assert flops.total < plan_flops(adapter, None, settings, batch=3).total


def test_sdtm_blocks_and_pool_layers_are_checked_in_the_grid(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    plan = sparse_plan(target)
    bad = Plan(target, (("ast", "full"),) + plan.grid[1:], sparse=plan.sparse)
    with pytest.raises(PlanError, match="layer 0 uses 'ast' at step 0, but the plan's sparse layout p0-s0_2 needs 'full'"):
        apply_plan(tiny_adapter.transformer, bad, target)
    with pytest.raises(PlanError, match=r"SDTM module \[1, 2\) must cover at least two"):
        apply_plan(tiny_adapter.transformer, sparse_plan(target, modules=((1, 2),)), target)


def test_fine_tuning_resumes_exactly_and_its_plans_refuse_the_base_model(tmp_path):
    teacher = load_adapter("dit", config=SMALL_DIT)
    base = tmp_path / "base"
    teacher.transformer.save_pretrained(base / "transformer")
    from diffusers import DDPMScheduler

    DDPMScheduler(prediction_type="v_prediction").save_pretrained(base / "scheduler")
    teacher = load_adapter("dit", str(base))
    layout = SparseLayout(modules=((1, 4),), curve=curve_from_dict({"name": "constant"}), pool_layers=1)
    config = FinetuneConfig.make(steps=4, batch_size=4, warmup_steps=1, save_every=2)
    assert finetune_sparse(teacher, layout, tmp_path / "straight", config) == 4
    torch.manual_seed(123)  # resuming must not depend on the global RNG
    finetune_sparse(teacher, layout, tmp_path / "resumed", FinetuneConfig(**{**config.__dict__, "steps": 2}))
    with pytest.raises(Exception, match="another layout or configuration"):
        finetune_sparse(teacher, layout, tmp_path / "resumed", config)

    # the step-2 checkpoint of a 4-step run resumes to the same weights as the straight run
    import shutil

    shutil.rmtree(tmp_path / "resumed")
    assert finetune_sparse(teacher, layout, tmp_path / "resumed", config, max_minutes=0.0) == 1
    assert finetune_sparse(teacher, layout, tmp_path / "resumed", config) == 4
    straight = torch.load(tmp_path / "straight" / "finetune.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "finetune.pt", weights_only=True)
    for key in ("student", "merges"):
        assert all(torch.equal(v, resumed[key][k]) for k, v in straight[key].items())

    folder = export_sparse(teacher, base, layout, tmp_path / "straight")
    assert folder == base / "sparse" / "p1-s1_4"
    info = sparse_networks(base)["sparse/p1-s1_4"]
    tuned = load_tuned_adapter("dit", folder)
    assert tuned.merges is not None and tuned.weights_hash == info["weights_hash"] != teacher.weights_hash

    settings = SamplerSettings(num_steps=2, guidance_scale=3.0)
    plan = sparse_plan(plan_target(tuned, settings), pool_layers=1, modules=((1, 4),),
                       curve={"name": "paper", "r_min": 0.5, "r_max": 0.75}, weights="sparse/p1-s1_4")
    plan.save(tmp_path / "plan.yaml")
    plan = load_plan(tmp_path / "plan.yaml")
    samples = run_plan(tuned, plan, [1, 2], [0, 1], settings).samples
    assert samples.shape == (2, 1, 32, 32) and torch.isfinite(samples).all()
    # given the base model, sampling finds the fine-tuned network next to it ...
    assert torch.equal(run_plan(teacher, plan, [1, 2], [0, 1], settings).samples, samples)
    # ... but the plan never runs on the base weights
    with pytest.raises(PlanError, match="plan runs on the fine-tuned SparseDiT network 'sparse/p1-s1_4'"):
        apply_plan(teacher.transformer, plan, plan_target(teacher, settings))
    with pytest.raises(PlanError, match="no merge weights came with this model"):
        apply_plan(teacher.transformer, plan)
    with pytest.raises(PlanError, match="holds none; make it with `ditplan finetune-sparse`"):
        run_plan(teacher, Plan(plan.target, plan.grid, sparse={**plan.sparse, "weights": "sparse/p9"}), [1], [0], settings)
    assert math.isfinite(float(info["fine_tuning"]["minutes"]))


def module_cached_plan(target, columns, r=0.0):
    """An SDTM module over both blocks of the tiny DiT; columns[layer] = its cells over the steps."""
    layout = {"pool_layers": 0, "modules": [[0, 2]], "curve": {"name": "constant", "r": r}, "weights": None}
    return Plan(target, tuple(tuple(col[s] for col in columns) for s in range(target.num_steps)), sparse=layout)


def test_a_module_skipped_as_a_whole_adds_the_modules_residual_to_its_input(tiny_adapter, tiny_spec):
    """Reusing an SDTM module: its input at this step plus (its output − its input) at the last computed step.
    With r = 0 and the identity merge the module is the dense blocks, so the same input as that step gives
    that step's output, and the module's blocks, hooks and state are gone after removal."""
    settings = tiny_spec.sampler.settings()
    target = plan_target(tiny_adapter, settings)
    plan = module_cached_plan(target, [["full", "reuse", "full", "full"]] * 2)
    x = torch.randn(2, 4, 16, 16)
    kwargs = {"timestep": torch.tensor([500, 500]), "class_labels": torch.tensor([3, 10])}
    transformer = tiny_adapter.transformer
    with torch.no_grad():
        dense = transformer(x, **kwargs).sample
        runtime = apply_plan(transformer, plan, target)
        try:
            with step_context(StepContext(0, 4, False)):
                first = transformer(x, **kwargs).sample
            with step_context(StepContext(1, 4, False)):
                reused = transformer(x, **kwargs).sample
            assert len(runtime.block_residuals[0]) == 0 and not runtime.block_residuals[1]  # read by its last reader
            assert not runtime.unit_inputs and not runtime.sparse.dense
        finally:
            remove_plan(transformer)
    assert torch.equal(first, dense)
    torch.testing.assert_close(reused, dense, rtol=1e-6, atol=1e-6)
    assert not any(hasattr(block, "_diffusers_hook") for block in transformer.transformer_blocks)


def test_a_module_caching_plan_differs_from_the_plan_without_it_and_costs_what_the_kernels_ran(tiny_adapter, tiny_spec):
    settings = tiny_spec.sampler.settings()
    target = plan_target(tiny_adapter, settings)
    cached = module_cached_plan(target, [["full", "reuse", "full", "forecast"]] * 2, r=0.75)
    plain = module_cached_plan(target, [["full"] * 4] * 2, r=0.75)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        images = run_plan(tiny_adapter, cached, [1, 2], [0, 1], settings).samples
    assert plan_flops(tiny_adapter, cached, settings, batch=2).total == counter.get_total_flops()
    assert not torch.equal(images, run_plan(tiny_adapter, plain, [1, 2], [0, 1], settings).samples)


def test_a_module_computes_or_is_skipped_as_a_whole(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    mixed = module_cached_plan(target, [["full", "reuse", "full", "full"], ["full"] * 4])
    with pytest.raises(PlanError, match=r"SDTM module \[0, 2\) mixes \['full', 'reuse'\] at step 1; a module computes"):
        apply_plan(tiny_adapter.transformer, mixed, target)
    attention = module_cached_plan(target, [["full", "ast", "full", "full"]] * 2)
    with pytest.raises(PlanError, match=r"needs 'full' there at every step, or a block-caching cell \(forecast, reuse\)"):
        apply_plan(tiny_adapter.transformer, attention, target)
