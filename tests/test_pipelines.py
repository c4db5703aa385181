"""Plans in stock diffusers pipelines: ``ditplan.apply_plan(pipe, plan)`` then ``pipe(...)``.

Tiny random DiT (latent, with a tiny VAE) and PixArt pipelines are saved with ``save_pretrained`` and
loaded back with ``from_pretrained``, as a user's own would be; the embedded digit DiT runs in a stock
``DiTPipeline`` for the SparseDiT plan.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.hooks import MagCacheConfig, apply_mag_cache
from safetensors.torch import load_file

import ditplan
from ditplan.cli import main
from ditplan.models.adapters import load_adapter
from ditplan.models.embedded import EMBEDDED_PATH
from ditplan.models.families.pixart import PixArtAdapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanError
from ditplan.plansearch.space import LayoutCaching, layout_columns
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import get_runtime, run_plan, step_hook
from ditplan.strategies.curves import Constant
from ditplan.strategies.diffusers_cache import calibrated_config
from ditplan.strategies.finetune_sparse import layout_plan
from ditplan.strategies.retarget import retarget_to_steps
from ditplan.strategies.sdtm import SparseLayout
from tests.conftest import DATA, tiny_vae

README = Path(__file__).parent.parent / "README.md"
DIT = SamplerSettings(scheduler="dpmsolver++", num_steps=4, guidance_scale=3.0, batch_size=8)
PIXART = SamplerSettings(scheduler="ddim", num_steps=3, guidance_scale=4.5, batch_size=8)
# every attention strategy, in both layers, after a dense first step
MIXED = [["full", "full"], ["ast", "asc"], ["wars", "wars+asc"], ["asc", "wars"]]


@pytest.fixture(scope="module", params=[PixArtAlphaPipeline, PixArtSigmaPipeline], ids=lambda cls: cls.__name__)
def pixart_folder(request, tmp_path_factory) -> tuple[type, Path]:
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                           num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                           caption_channels=32, norm_num_groups=4)
    folder = tmp_path_factory.mktemp("pipelines") / "tiny-pixart"
    request.param(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                  scheduler=DDIMScheduler()).save_pretrained(folder)
    return request.param, folder


def dit_pipe(folder: Path) -> DiTPipeline:
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def run_dit(pipe: DiTPipeline, labels: list[int], seeds: list[int], **kwargs) -> np.ndarray:
    args = {"num_inference_steps": DIT.num_steps, "guidance_scale": DIT.guidance_scale, **kwargs}
    return pipe(class_labels=labels, generator=generators(seeds), output_type="np", **args).images  # (N, H, W, 3)


def as_pipeline_images(samples: torch.Tensor) -> np.ndarray:
    """ditplan's samples (N, C, H, W) in [-1, 1] → what a pipeline returns for output_type="np"."""
    return (samples / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def plan_for(adapter, settings: SamplerSettings, rows: list[list[str]]) -> Plan:
    return Plan(plan_target(adapter, settings), tuple(tuple(r) for r in rows))


def test_a_dit_pipeline_runs_a_plan_as_ditplan_generate_does(dit_folder, tmp_path):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plan_path = plan_for(adapter, DIT, MIXED).save(tmp_path / "plan.yaml")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        f"name: tiny\nmodel: {{kind: dit, source: {dit_folder}, vae: {dit_folder}, device: cpu}}\n"
        "sampler: {scheduler: dpmsolver++, num_steps: 4, guidance_scale: 3.0, batch_size: 8}\n"
        "workload: {classes: [1, 2, 3], samples_per_condition: 1, seed: 5}\n"
    )
    main(["generate", "--experiment", str(experiment), "--plan", str(plan_path), "--out", str(tmp_path / "g")])
    ours = load_file(tmp_path / "g" / "samples.safetensors")["samples"]

    pipe = dit_pipe(dit_folder)
    ditplan.apply_plan(pipe, plan_path)
    images = run_dit(pipe, [1, 2, 3], [5, 6, 7])
    np.testing.assert_allclose(images, as_pipeline_images(ours), rtol=0, atol=1e-5)
    dense = run_dit(dit_pipe(dit_folder), [1, 2, 3], [5, 6, 7])
    assert np.abs(images - dense).max() > 1e-3  # the plan really changed the computation


def test_an_all_full_plan_is_bit_identical_to_no_plan_and_removal_restores_the_pipeline(dit_folder):
    pipe = dit_pipe(dit_folder)
    processors = [block.attn1.processor for block in pipe.transformer.transformer_blocks]
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    before = run_dit(pipe, [4, 9], [0, 1])
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    ditplan.apply_plan(pipe, plan_for(adapter, DIT, [["full", "full"]] * 4))
    assert np.array_equal(run_dit(pipe, [4, 9], [0, 1]), before)
    ditplan.remove_plan(pipe)
    ditplan.apply_plan(pipe, plan_for(adapter, DIT, MIXED))
    assert not np.array_equal(run_dit(pipe, [4, 9], [0, 1]), before)
    ditplan.remove_plan(pipe)
    assert type(pipe) is DiTPipeline and "_ditplan_original_class" not in pipe.__dict__
    assert not hasattr(pipe.transformer, "_diffusers_hook") and "forward" not in pipe.transformer.__dict__
    assert [block.attn1.processor for block in pipe.transformer.transformer_blocks] == processors
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())
    assert np.array_equal(run_dit(pipe, [4, 9], [0, 1]), before)


def pixart_call(pipe: PixArtAlphaPipeline | PixArtSigmaPipeline, prompts: list[str], seeds: list[int], embeddings: dict) -> np.ndarray:
    def stack(names: list[str], part: int) -> torch.Tensor:
        return torch.stack([embeddings[p][part] for p in names])

    return pipe(negative_prompt=None, prompt_embeds=stack(prompts, 0), prompt_attention_mask=stack(prompts, 1),
                negative_prompt_embeds=stack([""] * len(prompts), 0),
                negative_prompt_attention_mask=stack([""] * len(prompts), 1),
                num_inference_steps=PIXART.num_steps, guidance_scale=PIXART.guidance_scale,
                generator=generators(seeds), use_resolution_binning=False, output_type="np").images


def test_asc_in_a_pixart_pipeline_shares_the_conditional_half(pixart_folder, monkeypatch):
    """PixArt batches [uncond; cond], ditplan's own loop [cond; uncond]: both must share the conditional half,
    so the pipeline equals ditplan's loop; with the halves swapped it does not."""
    pipeline_cls, folder = pixart_folder
    embeddings = PixArtAdapter.read_embeddings(str(DATA / "tiny-pixart-prompts.safetensors"))
    adapter = load_adapter("pixart", str(folder), vae=str(folder), prompt_embeddings=embeddings)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    plan = plan_for(adapter, PIXART, [["full", "full"], ["asc", "asc"], ["asc", "wars+asc"]])
    ours = as_pipeline_images(run_plan(adapter, plan, prompts, seeds, PIXART).samples)
    pipe = pipeline_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ditplan.apply_plan(pipe, plan)
    np.testing.assert_allclose(pixart_call(pipe, prompts, seeds, embeddings), ours, rtol=0, atol=1e-5)
    ditplan.remove_plan(pipe)

    monkeypatch.setattr(PixArtAdapter, "pipelines", {**PixArtAdapter.pipelines, pipeline_cls: "cond-uncond"})
    ditplan.apply_plan(pipe, plan)
    assert np.abs(pixart_call(pipe, prompts, seeds, embeddings) - ours).max() > 1e-3
    ditplan.remove_plan(pipe)


def test_mag_ratios_are_what_diffusers_calibration_prints_in_the_stock_pipeline(dit_folder, capsys):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    ratios = calibrated_config("mag", adapter, DIT, [1, 2], [0, 1])["mag_ratios"]
    pipe = dit_pipe(dit_folder)
    apply_mag_cache(pipe.transformer, MagCacheConfig(num_inference_steps=DIT.num_steps, calibrate=True))
    capsys.readouterr()
    run_dit(pipe, [1, 2], [0, 1])
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # "Copy these values …", then them
    assert len(ratios) == DIT.num_steps and ratios == pytest.approx(printed, rel=1e-5)


def test_a_plan_for_another_sampler_is_refused_at_the_first_call_in_one_line(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    pipe = dit_pipe(dit_folder)
    plan = plan_for(adapter, DIT, MIXED)
    ditplan.apply_plan(pipe, replace(plan, target=replace(plan.target, schedule=())))  # an older plan's target
    with pytest.raises(PlanError, match="steps: plan has 4, call has num_inference_steps=5, and it records no schedule "
                                        r"\(made by an older ditplan\): `ditplan retarget") as err:
        run_dit(pipe, [1], [0], num_inference_steps=5)
    assert "\n" not in str(err.value)
    with pytest.raises(PlanError, match="guidance scale: plan has 3.0, call has guidance_scale=2.0"):
        run_dit(pipe, [1], [0], guidance_scale=2.0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(PlanError, match="scheduler: plan has 'dpmsolver\\+\\+', pipeline has DDIMScheduler"):
        run_dit(pipe, [1], [0])
    assert get_runtime(pipe.transformer).caches == [{}, {}]  # a refused call leaves nothing behind
    ditplan.remove_plan(pipe)


def test_a_call_at_another_step_count_runs_the_plan_re_targeted_as_ditplans_loop_runs_it(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plan = plan_for(adapter, DIT, MIXED)
    pipe = dit_pipe(dit_folder)
    ditplan.apply_plan(pipe, plan)
    with pytest.warns(UserWarning, match="plan made for 4 steps runs re-targeted to 7 steps"):
        images = run_dit(pipe, [1, 2], [5, 6], num_inference_steps=7)
    retargeted = retarget_to_steps(plan, adapter, 7)
    assert retargeted.num_steps == 7 and get_runtime(pipe.transformer).plan == plan  # the applied plan is back
    ours = run_plan(adapter, retargeted, [1, 2], [5, 6], replace(DIT, num_steps=7)).samples
    np.testing.assert_allclose(images, as_pipeline_images(ours), rtol=0, atol=1e-5)
    np.testing.assert_allclose(run_dit(pipe, [1, 2], [5, 6]), as_pipeline_images(
        run_plan(adapter, plan, [1, 2], [5, 6], DIT).samples), rtol=0, atol=1e-5)  # and at its own steps as before
    ditplan.remove_plan(pipe)


def dtype_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("made_in, run_in", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_the_same_weights_in_another_dtype_take_the_plan_with_one_warning(dit_folder, made_in, run_in):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder)).to("cpu", made_in)
    plan = plan_for(adapter, DIT, MIXED)
    assert plan.target.dtype == dtype_of(made_in)
    pipe = dit_pipe(dit_folder).to(run_in)  # the VAE too: the pipeline decodes in the transformer's dtype
    dense = run_dit(pipe, [1, 2], [0, 1])
    with pytest.warns(UserWarning) as record:
        ditplan.apply_plan(pipe, plan)
    made, run = dtype_of(made_in), dtype_of(run_in)
    expected = (f"plan was measured in {made} and runs here in {run}: its quality and speed figures were measured in "
                f"{made}; make a plan in {run} for figures of this dtype")
    assert [str(w.message) for w in record if "measured in" in str(w.message)] == [expected]
    images = run_dit(pipe, [1, 2], [0, 1])
    ditplan.remove_plan(pipe)
    assert np.isfinite(images).all() and np.abs(images - dense).max() > 1e-3  # the plan ran


def test_other_weights_are_refused_in_one_line_in_either_dtype(dit_folder):
    plan = plan_for(load_adapter("dit", str(dit_folder), vae=str(dit_folder)), DIT, MIXED)
    pipe = dit_pipe(dit_folder)
    with torch.no_grad():
        pipe.transformer.pos_embed.proj.bias.add_(1.0)  # another model
    for dtype in (torch.float32, torch.bfloat16):
        pipe.to(dtype)
        with pytest.raises(PlanError, match=r"plan was made for weights \w+ \(.*\), but this transformer's weights are "
                                            r"\w+; make a plan for this model") as err:
            ditplan.apply_plan(pipe, plan)
        assert "\n" not in str(err.value) and get_runtime(pipe.transformer) is None


def apply_recording_warnings(pipe: DiTPipeline, plan: Plan | Path) -> list[warnings.WarningMessage]:
    """The warnings ``apply_plan(pipe, plan)`` gives, every one of them recorded."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ditplan.apply_plan(pipe, plan)
    return record


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plan_on_its_own_weights_in_its_own_dtype_gives_no_warning(dit_folder, dtype):
    plan = plan_for(load_adapter("dit", str(dit_folder), vae=str(dit_folder)).to("cpu", dtype), DIT, MIXED)
    pipe = dit_pipe(dit_folder).to(dtype)
    assert apply_recording_warnings(pipe, plan) == []
    assert np.isfinite(run_dit(pipe, [1, 2], [0, 1])).all()
    ditplan.remove_plan(pipe)


def test_a_plan_file_without_a_dtype_binds_as_before(dit_folder, tmp_path):
    """Plans written before plans recorded their dtype: their own weights take them with no warning, the same
    weights in another dtype are refused."""
    path = plan_for(load_adapter("dit", str(dit_folder), vae=str(dit_folder)), DIT, MIXED).save(tmp_path / "plan.yaml")
    data = yaml.safe_load(path.read_text())
    del data["target"]["dtype"], data["target"]["cast_hashes"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert ditplan.load_plan(path).target.dtype is None
    pipe = dit_pipe(dit_folder)
    assert apply_recording_warnings(pipe, path) == []
    assert np.isfinite(run_dit(pipe, [1, 2], [0, 1])).all()
    ditplan.remove_plan(pipe)
    with pytest.raises(PlanError, match="make a plan for this model"):
        ditplan.apply_plan(pipe.to(torch.bfloat16), path)


def test_calls_that_do_not_follow_the_schedule_fail_in_one_line(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    pipe = dit_pipe(dit_folder)
    ditplan.apply_plan(pipe, plan_for(adapter, DIT, MIXED))
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 1000])
    with pytest.raises(PlanError, match="call the pipeline"):
        pipe.transformer(x, timestep=torch.tensor([999, 999]), class_labels=labels)
    clock = step_hook(pipe.transformer).clock
    clock.start(cfg=True)  # as the pipeline's call does
    pipe.scheduler.set_timesteps(DIT.num_steps)
    first = pipe.scheduler.timesteps[0].expand(2)
    pipe.transformer(x, timestep=first, class_labels=labels)
    with pytest.raises(PlanError, match="called for step 0 .* after step 0 .* one transformer call per step"):
        pipe.transformer(x, timestep=first, class_labels=labels)
    with pytest.raises(PlanError, match="timestep 998.5, which the scheduler's 4 timesteps do not hold"):
        pipe.transformer(x, timestep=torch.tensor([998.5, 998.5]), class_labels=labels)
    ditplan.remove_plan(pipe)


def test_a_bare_transformer_in_a_users_own_loop_is_told_the_step(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plan = plan_for(adapter, DIT, MIXED)
    expected = run_plan(adapter, plan, [2, 8], [0, 1], DIT).samples

    transformer, vae = adapter.transformer, adapter.vae
    ditplan.apply_plan(transformer, plan)
    with pytest.raises(PlanError, match="denoising step is unknown"):
        transformer(torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 1]), class_labels=torch.tensor([2, 1000]))
    scheduler = DPMSolverMultistepScheduler.from_config(adapter.scheduler_config)
    scheduler.set_timesteps(DIT.num_steps)
    x = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    labels = torch.tensor([2, 8, 1000, 1000])  # [cond; uncond]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            with ditplan.denoising_step(i, len(scheduler.timesteps), cfg="cond-uncond"):
                out = transformer(torch.cat([x, x]), timestep=t.expand(4), class_labels=labels).sample[:, :4]
            cond, uncond = out.chunk(2)
            x = scheduler.step(uncond + DIT.guidance_scale * (cond - uncond), t, x).prev_sample
        images = vae.decode(x / vae.config.scaling_factor).sample
    ditplan.remove_plan(transformer)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


CACHING = LayoutCaching("reuse", every=2, stop=1.0, blocks="all")


@pytest.mark.parametrize(("caching", "guidance"), [(None, None), (CACHING, None), (CACHING, ("full", "reuse", "full", "off"))])
def test_a_sparsedit_plan_swaps_in_its_network_in_a_stock_pipeline_and_removal_restores_the_weights(embedded_adapter,
                                                                                                       caching, guidance):
    """caching: the network's blocks (its SDTM module as a whole and its Poolingformer layer) reuse at step 3;
    guidance: the unconditional branch reuses step 0's at step 1 and is off at step 3 (its module reuses step 2's)."""
    from ditplan.models.pipelines import embedded_pipeline

    settings = SamplerSettings(num_steps=4, guidance_scale=4.0)
    layout = SparseLayout(modules=((1, 5),), curve=Constant(0.75), weights="sparse/p1-s1_5", pool_layers=1)
    plan = layout_plan(embedded_adapter, layout, settings)
    columns = layout_columns(layout, 4, caching)
    plan = Plan(plan.target, tuple(tuple(columns[l][s] if l in columns else "full" for l in range(6)) for s in range(4)),
                sparse=plan.sparse, guidance=guidance)
    assert (caching is not None) == ("reuse" in plan.strategies())
    labels, seeds = [0, 7], [10, 11]
    ours = as_pipeline_images(run_plan(embedded_adapter, plan, labels, seeds, settings).samples)
    if guidance is not None:  # the skipped steps changed the samples
        unguided = run_plan(embedded_adapter, replace(plan, guidance=None), labels, seeds, settings).samples
        assert np.abs(as_pipeline_images(unguided) - ours).max() > 1e-3

    pipe = embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    call = {"class_labels": labels, "num_inference_steps": 4, "guidance_scale": 4.0, "output_type": "np"}
    before = pipe(generator=generators(seeds), **call).images
    ditplan.apply_plan(pipe, plan)
    assert not torch.equal(pipe.transformer.pos_embed.proj.weight, state["pos_embed.proj.weight"])
    np.testing.assert_allclose(pipe(generator=generators(seeds), **call).images, ours, rtol=0, atol=1e-5)
    ditplan.remove_plan(pipe)
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())
    assert np.array_equal(pipe(generator=generators(seeds), **call).images, before)


def test_a_plan_naming_a_network_outside_the_model_folder_is_refused(embedded_adapter, tmp_path):
    from ditplan.models.pipelines import embedded_pipeline

    layout = SparseLayout(modules=((1, 5),), curve=Constant(0.75), weights="sparse/p1-s1_5", pool_layers=1)
    plan = layout_plan(embedded_adapter, layout, SamplerSettings(num_steps=4))
    pipe = embedded_pipeline()
    outside = tmp_path / "network"
    (outside / "transformer").mkdir(parents=True)  # looks like a network, but lies outside the model folder
    for weights in (os.path.relpath(outside, EMBEDDED_PATH), str(outside)):
        with pytest.raises(PlanError, match="leaves the model folder"):
            ditplan.apply_plan(pipe, Plan(plan.target, plan.grid, sparse={**plan.sparse, "weights": weights}))
    assert get_runtime(pipe.transformer) is None


def test_the_readme_snippet_runs_as_written(dit_folder, tmp_path, monkeypatch):
    """The README's "Run an exported plan in your own diffusers pipeline" block, on the tiny pipeline (in the
    folder the snippet names as a hub id: a local folder comes first) and a plan for it where export writes."""
    text = README.read_text()
    snippet = re.search(r"## Run an exported plan in your own diffusers pipeline.*?```python\n(.*?)```", text,
                        re.S).group(1)
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    settings = SamplerSettings(num_steps=4, guidance_scale=4.0)
    monkeypatch.chdir(tmp_path)
    Path("facebook").mkdir()
    Path("facebook/DiT-XL-2-512").symlink_to(dit_folder)
    plan_for(adapter, settings, MIXED).save("runs/dit-xl-512/exported/dit-xl-512-knee.yaml")
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert len(namespace["images"]) == 2 and namespace["images"][0].size == (16, 16)
    assert get_runtime(namespace["pipe"].transformer) is None


@pytest.mark.parametrize("method, config", [("first_block", {"threshold": 0.2}), ("mag", {"threshold": 0.06}),
                                            ("forecast_cache", {"threshold": 0.2, "bn": 0})])
def test_a_plan_with_one_of_diffusers_caches_runs_in_the_pipeline_as_in_ditplans_loop(dit_folder, method, config):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    measured = calibrated_config(method, adapter, DIT, [3, 4], [5, 6])  # MagCache's ratios, from a dense run
    plan = Plan.uniform(plan_target(adapter, DIT), cache={"method": method, "config": {**config, **measured}})
    ours = as_pipeline_images(run_plan(adapter, plan, [1, 2], [0, 1], DIT).samples)
    pipe = dit_pipe(dit_folder)
    dense = run_dit(pipe, [1, 2], [0, 1])
    runtime = ditplan.apply_plan(pipe, plan)
    np.testing.assert_allclose(run_dit(pipe, [1, 2], [0, 1]), ours, rtol=0, atol=1e-5)
    assert sum(runtime.executed.counts["block"]) < 2 * DIT.num_steps  # it skipped blocks
    ditplan.remove_plan(pipe)
    assert np.array_equal(run_dit(pipe, [1, 2], [0, 1]), dense)


def test_the_forecast_cache_in_a_pixart_pipeline_runs_as_in_ditplans_loop_and_skips_the_cross_attention(pixart_folder):
    pipeline_cls, folder = pixart_folder  # 2 blocks: block 0 decides, block 1 is the middle
    embeddings = PixArtAdapter.read_embeddings(str(DATA / "tiny-pixart-prompts.safetensors"))
    adapter = load_adapter("pixart", str(folder), vae=str(folder), prompt_embeddings=embeddings)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    plan = Plan.uniform(plan_target(adapter, PIXART), cache={"method": "forecast_cache",
                                                         "config": {"threshold": 1e9, "bn": 0, "warmup": 1}})
    ours = run_plan(adapter, plan, prompts, seeds, PIXART)
    assert ours.executed.counts == {"block": [3, 1], "self_attention": [3, 1], "cross_attention": [3, 1]}
    pipe = pipeline_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ditplan.apply_plan(pipe, plan)
    np.testing.assert_allclose(pixart_call(pipe, prompts, seeds, embeddings), as_pipeline_images(ours.samples), rtol=0,
                               atol=1e-5)
    ditplan.remove_plan(pipe)


def test_a_guided_plan_runs_in_pixart_pipelines_whose_batch_puts_the_unconditional_half_first(pixart_folder):
    from ditplan.models.families.pixart import PixArtAdapter
    from tests.conftest import DATA
    from tests.test_pipelines import PIXART, pixart_call

    pipeline_cls, folder = pixart_folder
    embeddings = PixArtAdapter.read_embeddings(str(DATA / "tiny-pixart-prompts.safetensors"))
    adapter = load_adapter("pixart", str(folder), vae=str(folder), prompt_embeddings=embeddings)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    plan = replace(plan_for(adapter, PIXART, [["full", "full"], ["asc", "ast"], ["ast", "wars+asc"]]),
                   guidance=("full", "reuse", "off"))
    ours = as_pipeline_images(run_plan(adapter, plan, prompts, seeds, PIXART).samples)
    pipe = pipeline_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ditplan.apply_plan(pipe, plan)
    np.testing.assert_allclose(pixart_call(pipe, prompts, seeds, embeddings), ours, rtol=0, atol=1e-5)
