"""The FLUX family: a tiny random FLUX.1 pipeline (the sizes diffusers' own tests use, a tiny VAE, prompt
embeddings instead of text encoders) saved with ``save_pretrained`` and loaded back, as a user's own would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.hooks import HookRegistry
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditplan
from ditplan.cli import main
from ditplan.evaluators.cost import plan_flops
from ditplan.models.adapters import experiment_adapter, load_adapter
from ditplan.models.families.flux import read_flux_embeddings
from ditplan.models.sampling import plan_target, sample
from ditplan.plan import Plan, PlanError, load_plan
from ditplan.rundir import RunDir
from ditplan.spec import load_spec
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import run_plan
from tests.conftest import DATA

FLUX = SamplerSettings(scheduler="flow-euler", num_steps=4, guidance_scale=3.5, batch_size=8, guidance="embedded")
IMAGE_SIZE = 16  # pixels per side; the tiny VAE does not downsample: 16 × 16 latents, 64 image tokens
PROMPTS = ["a red circle", "a blue square"]
# dual-stream blocks 0-1, single-stream blocks 2-3: computed, reused and forecast in every block kind
MIXED = [["full"] * 4, ["full", "reuse", "full", "reuse"], ["reuse", "full", "forecast", "full"],
         ["forecast", "reuse", "reuse", "forecast"]]


def tiny_flux_pipeline() -> FluxPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    # FLUX.1-dev's scheduler: the shift grows with the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "tiny-flux"
    tiny_flux_pipeline().save_pretrained(folder)
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for prompt in PROMPTS:
        tensors[f"{prompt}.embeds"] = torch.randn(8, 32, generator=generator)
        tensors[f"{prompt}.pooled"] = torch.randn(32, generator=generator)
    save_file(tensors, folder / "prompts.safetensors")
    return folder


def flux_adapter(folder: Path, vae: bool = True):
    embeddings = read_flux_embeddings(str(folder / "prompts.safetensors"), PROMPTS)
    return load_adapter("flux", str(folder), vae=str(folder) if vae else None, prompt_embeddings=embeddings,
                        image_size=IMAGE_SIZE)


def plan_for(adapter, rows: list[list[str]]) -> Plan:
    return Plan(plan_target(adapter, FLUX), tuple(tuple(r) for r in rows))


def flux_pipe(folder: Path) -> FluxPipeline:
    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "feature_extractor", "image_encoder"])
    pipe = FluxPipeline.from_pretrained(folder, **none)  # the prompts come as embeddings
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_call(pipe: FluxPipeline, adapter, prompts: list[str], seeds: list[int], output_type: str) -> Any:
    embeds = torch.stack([adapter.prompt_embeddings[p][0] for p in prompts])
    pooled = torch.stack([adapter.prompt_embeddings[p][1] for p in prompts])
    return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=IMAGE_SIZE, width=IMAGE_SIZE,
                num_inference_steps=FLUX.num_steps, guidance_scale=FLUX.guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type=output_type).images


def pipeline_images(pipe: FluxPipeline, adapter, prompts: list[str], seeds: list[int]) -> np.ndarray:
    return flux_call(pipe, adapter, prompts, seeds, "np")  # (N, H, W, 3) in [0, 1]


def pipeline_latents(pipe: FluxPipeline, adapter, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """``pipe(...)``'s final latents, unpacked to (N, C, H, W) as ditplan's loop keeps them."""
    packed = flux_call(pipe, adapter, prompts, seeds, "latent")
    return FluxPipeline._unpack_latents(packed, IMAGE_SIZE, IMAGE_SIZE, 1)


def transformer_state(transformer: torch.nn.Module) -> tuple:
    processors = {name: id(p) for name, p in transformer.attn_processors.items()}
    hooks = sorted(name for name, m in transformer.named_modules() if getattr(m, "_diffusers_hook", None) is not None
                   and m._diffusers_hook.hooks)
    weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    return processors, hooks, type(transformer), weights


def test_a_flux_pipeline_runs_a_block_caching_plan_as_ditplan_generate_does(flux_folder, tmp_path):
    adapter = flux_adapter(flux_folder)
    plan_path = plan_for(adapter, MIXED).save(tmp_path / "plan.yaml")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        f"name: tiny\nmodel: {{kind: flux, source: {flux_folder}, vae: {flux_folder}, image_size: {IMAGE_SIZE}, "
        f"prompt_embeddings: {flux_folder / 'prompts.safetensors'}, device: cpu}}\n"
        "sampler: {scheduler: flow-euler, num_steps: 4, guidance_scale: 3.5, guidance: embedded, batch_size: 8}\n"
        f"workload: {{prompts: {PROMPTS}, samples_per_condition: 1, seed: 3}}\n"
    )
    main(["generate", "--experiment", str(experiment), "--plan", str(plan_path), "--out", str(tmp_path / "g")])
    ours = load_file(tmp_path / "g" / "samples.safetensors")["samples"]

    pipe = flux_pipe(flux_folder)
    ditplan.apply_plan(pipe, plan_path)
    images = pipeline_images(pipe, adapter, PROMPTS, [3, 4])
    ditplan.remove_plan(pipe)
    np.testing.assert_allclose(images, (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)
    assert np.abs(images - pipeline_images(pipe, adapter, PROMPTS, [3, 4])).max() > 1e-3  # the plan changed it


def test_an_all_full_plan_is_bit_identical_to_no_plan_and_removing_it_restores_the_pipeline(flux_folder):
    adapter = flux_adapter(flux_folder, vae=False)
    pipe = flux_pipe(flux_folder)
    before = transformer_state(pipe.transformer)
    stock = pipeline_latents(pipe, adapter, PROMPTS, [5, 6])
    ditplan.apply_plan(pipe, Plan.uniform(plan_target(adapter, FLUX)))
    planned = pipeline_latents(pipe, adapter, PROMPTS, [5, 6])
    ditplan.remove_plan(pipe)
    assert torch.equal(stock, planned)
    after = transformer_state(pipe.transformer)
    assert before[:3] == after[:3] and type(pipe) is FluxPipeline
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])
    assert torch.equal(pipeline_latents(pipe, adapter, PROMPTS, [5, 6]), stock)


def test_the_flops_of_a_sampling_run_are_what_flop_counter_mode_counts(flux_folder):
    adapter = flux_adapter(flux_folder, vae=False)
    for rows in (None, MIXED):
        plan = plan_for(adapter, rows) if rows else None
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # MATH: attention as counted matmuls
            run_plan(adapter, plan, PROMPTS, [1, 2], FLUX)
        assert counter.get_total_flops() == plan_flops(adapter, plan, FLUX, batch=2).total


def test_an_attention_strategy_is_refused_on_flux_in_one_line(flux_folder):
    adapter = flux_adapter(flux_folder, vae=False)
    plan = plan_for(adapter, [["full"] * 4, ["ast", "full", "full", "full"], ["full"] * 4, ["full"] * 4])
    with pytest.raises(PlanError, match="'ast' does not run on the flux family's attention") as err:
        run_plan(adapter, plan, PROMPTS, [1], FLUX)
    assert "\n" not in str(err.value)
    pipe = flux_pipe(flux_folder)
    with pytest.raises(PlanError, match="'ast' does not run"):
        ditplan.apply_plan(pipe, plan)
    assert not HookRegistry.check_if_exists_or_initialize(pipe.transformer).hooks  # nothing was installed


def test_flux_samples_decode_through_its_vae(flux_folder):
    adapter = flux_adapter(flux_folder)
    images = sample(adapter, PROMPTS[:1], [0], FLUX)
    assert images.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()


def test_ditplan_run_of_a_tiny_flux_experiment_goes_from_dense_to_exported_plans(tmp_path):
    experiment = tmp_path / "tiny-flux.yaml"
    text = (DATA / "tiny-flux.yaml").read_text().replace("tiny-flux-prompts.safetensors",
                                                         str(DATA / "tiny-flux-prompts.safetensors"))
    experiment.write_text(text + f"output_dir: {tmp_path / 'run'}\n")
    run = RunDir(ditplan.run(experiment, show_progress=False))
    greedy = list(run.greedy.plans().values())
    assert len(greedy) == 2 and all(p.strategies() <= {"full", "reuse"} for p in greedy)
    assert any("reuse" in p.strategies() for p in greedy)  # δ = 0.5 lets blocks be reused
    exported = sorted(run.exported.glob("*.yaml"))
    assert exported and all(load_plan(p).target.scheduler == "flow-euler" for p in exported)
    sides = {side.kind for side in run.load_held_out().sides}  # type: ignore[union-attr]
    assert {"dense", "greedy", "learned"} <= sides
    adapter = experiment_adapter(load_spec(experiment))
    plan = load_plan(exported[0])
    assert run_plan(adapter, plan, PROMPTS[:1], [9], FLUX).samples.shape == (1, 1, IMAGE_SIZE, IMAGE_SIZE)


def flux_experiment(tmp_path: Path, extra: str) -> Path:
    experiment = tmp_path / "tiny-flux.yaml"
    text = (DATA / "tiny-flux.yaml").read_text().replace("tiny-flux-prompts.safetensors",
                                                         str(DATA / "tiny-flux-prompts.safetensors"))
    experiment.write_text(text + extra)
    return experiment


@pytest.mark.parametrize(("change", "message"), [
    ({"search": {"space": {"methods": ["full", "ast", "reuse"]}}},
     "search.space: 'ast' does not run on the flux family's attention; plans for it use 'full' and block caching"),
    ({"sampler": {"scheduler": "dpmsolver++", "guidance": "embedded"}},
     "sampler.scheduler = 'dpmsolver++' does not sample a flux model; choose one of ['flow-euler']"),
    ({"sampler": {"scheduler": "flow-euler", "guidance": "cfg"}}, "sampler.guidance = 'cfg': a flux model takes 'embedded'"),
])
def test_what_the_flux_family_cannot_run_is_refused_in_one_line_before_any_work(tmp_path, capsys, change, message):
    experiment = flux_experiment(tmp_path, "")
    data = {**yaml.safe_load(experiment.read_text()), **change, "output_dir": str(tmp_path / "run")}
    experiment.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(experiment)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_family_is_refused_with_the_families_named(tmp_path, capsys):
    experiment = flux_experiment(tmp_path, "")
    experiment.write_text(experiment.read_text().replace("kind: flux", "kind: fluxx"))
    with pytest.raises(SystemExit):
        main(["run", str(experiment)])
    err = capsys.readouterr().err.strip()
    assert "model.kind: unknown model family 'fluxx' (did you mean 'flux'?); choose one of ['dit', 'flux', 'pixart']" in err


def test_a_flux_plan_on_another_familys_pipeline_is_refused_in_one_line(flux_folder, dit_folder):
    plan = Plan.uniform(plan_target(flux_adapter(flux_folder, vae=False), FLUX))
    pipe = DiTPipeline.from_pretrained(dit_folder)
    with pytest.raises(PlanError, match="plan is for 4 layers but this model has 2") as err:
        ditplan.apply_plan(pipe, plan)
    assert "\n" not in str(err.value)
