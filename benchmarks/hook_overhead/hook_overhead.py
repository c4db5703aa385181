"""What an installed plan costs when it changes nothing: an all-``full`` plan's hooks against no plan.

For each family, a stock diffusers pipeline with no plan and a copy of it with an all-``full`` plan
applied (``ditplan.apply_plan``) sample the same batch, taking turns in every round (rotated order, one
warm-up call each); the ratio is planned time / stock time in the same round: the median over
``--repeats`` rounds with its min–max band. Models:

- the embedded digit DiT in ``DiTPipeline`` (6 layers, 256 tokens);
- tiny random DiT, PixArt-Σ, FLUX.1, SD3.5 and Qwen-Image pipelines (the sizes diffusers' own tests use), where
  a call computes so little that the hooks' fixed cost per call shows most (Qwen-Image: guidance as two calls per
  step).

    python benchmarks/hook_overhead/hook_overhead.py [--repeats 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
from common import print_provenance, ratio_stats  # noqa: E402
from diffusers import (  # noqa: E402
    FluxPipeline,
    PixArtSigmaPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
)

import ditplan  # noqa: E402
from ditplan.evaluators.cost import interleaved_times  # noqa: E402
from ditplan.models.adapters import load_adapter  # noqa: E402
from ditplan.models.pipelines import IdentityDecoder, embedded_pipeline  # noqa: E402
from ditplan.models.sampling import make_scheduler, plan_target  # noqa: E402
from ditplan.plan import Plan  # noqa: E402
from ditplan.spec import SamplerSettings  # noqa: E402

TINY_DIT = {"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 2,
            "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 1000}
TINY_PIXART = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 2,
               "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16, "caption_channels": 32,
               "norm_num_groups": 4}
TINY_FLUX = {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
             "axes_dims_rope": [4, 4, 8], "guidance_embeds": True}
TINY_SD3 = {"sample_size": 8, "patch_size": 1, "in_channels": 4, "num_layers": 3, "attention_head_dim": 8,
            "num_attention_heads": 4, "caption_projection_dim": 32, "joint_attention_dim": 32,
            "pooled_projection_dim": 64, "out_channels": 4, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
TINY_QWEN = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 3, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (8, 4, 4)}


# (the model's adapter: what a plan for it records, its stock pipeline, the sampler, one pipeline call)
Case = tuple[Any, Any, SamplerSettings, Callable[[Any], Any]]


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


def dit_case(pipe: Any, steps: int, batch: int) -> Callable[[Any], Any]:
    return lambda p: p(class_labels=list(range(batch)), generator=generators(batch), num_inference_steps=steps,
                       guidance_scale=4.0, output_type="np")


def embedded(steps: int, batch: int) -> Case:
    pipe = embedded_pipeline()
    return load_adapter("dit", "embedded"), pipe, SamplerSettings("dpmsolver++", steps, 4.0), dit_case(pipe, steps, batch)


def tiny_dit(steps: int, batch: int) -> Case:
    adapter = load_adapter("dit", config=TINY_DIT)
    pipe = adapter.pipeline_class()(transformer=adapter.transformer, vae=IdentityDecoder(),
                                    scheduler=make_scheduler(adapter, "dpmsolver++"))
    return adapter, pipe, SamplerSettings("dpmsolver++", steps, 4.0), dit_case(pipe, steps, batch)


def tiny_pixart(steps: int, batch: int) -> Case:
    embeds = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, 8)
    adapter = load_adapter("pixart", config=TINY_PIXART, prompt_embeddings={"": (embeds[0], mask[0])})
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=adapter.transformer,
                               scheduler=make_scheduler(adapter, "dpmsolver++"))

    def call(p: Any) -> Any:
        return p(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=torch.zeros_like(embeds),
                 negative_prompt_attention_mask=mask, negative_prompt=None, height=64, width=64, num_inference_steps=steps,
                 guidance_scale=4.5, generator=generators(batch), output_type="latent", use_resolution_binning=False)

    return adapter, pipe, SamplerSettings("dpmsolver++", steps, 4.5), call


def tiny_flux(steps: int, batch: int) -> Case:
    embeds = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(0))
    pooled = torch.randn(batch, 32, generator=torch.Generator().manual_seed(1))
    adapter = load_adapter("flux", config=TINY_FLUX, prompt_embeddings={"": (embeds[0], pooled[0])}, image_size=32)
    pipe = FluxPipeline(scheduler=make_scheduler(adapter, "flow-euler"), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=adapter.transformer)

    def call(p: Any) -> Any:
        return p(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=128, width=128, num_inference_steps=steps,
                 guidance_scale=3.5, generator=generators(batch), output_type="latent")

    return adapter, pipe, SamplerSettings("flow-euler", steps, 3.5, guidance="embedded"), call


def tiny_sd3(steps: int, batch: int) -> Case:
    embeds = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(0))
    pooled = torch.randn(batch, 64, generator=torch.Generator().manual_seed(1))
    adapter = load_adapter("sd3", config=TINY_SD3, prompt_embeddings={"": (embeds[0], pooled[0])}, image_size=16)
    pipe = StableDiffusion3Pipeline(scheduler=make_scheduler(adapter, "flow-euler"), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=adapter.transformer)
    pipe.vae_scale_factor = 1  # no VAE: the latents are the image

    def call(p: Any) -> Any:
        return p(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(embeds),
                 negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=16, width=16, num_inference_steps=steps,
                 guidance_scale=4.0, generator=generators(batch), output_type="latent")

    return adapter, pipe, SamplerSettings("flow-euler", steps, 4.0), call


def tiny_qwen_image(steps: int, batch: int) -> Case:
    embeds = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, 8, dtype=torch.long)
    adapter = load_adapter("qwen-image", config=TINY_QWEN, prompt_embeddings={"": (embeds[0], mask[0])}, image_size=16)
    pipe = QwenImagePipeline(scheduler=make_scheduler(adapter, "flow-euler"), vae=None, text_encoder=None, tokenizer=None,
                             transformer=adapter.transformer)

    def call(p: Any) -> Any:
        return p(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=torch.zeros_like(embeds),
                 negative_prompt_embeds_mask=mask, height=128, width=128, num_inference_steps=steps,
                 true_cfg_scale=4.0, generator=generators(batch), output_type="latent")

    return adapter, pipe, SamplerSettings("flow-euler", steps, 4.0), call


CASES = {"embedded DiT": embedded, "tiny DiT": tiny_dit, "tiny PixArt-Σ": tiny_pixart, "tiny FLUX.1": tiny_flux,
         "tiny SD3.5": tiny_sd3, "tiny Qwen-Image": tiny_qwen_image}


def measure(name: str, steps: int, batch: int, repeats: int) -> tuple[float, float, float]:
    """Median, min and max of (all-full plan / stock) time over ``repeats`` interleaved rounds."""
    adapter, pipe, settings, call = CASES[name](steps, batch)
    pipe.set_progress_bar_config(disable=True)
    planned = copy.deepcopy(pipe)
    ditplan.apply_plan(planned, Plan.uniform(plan_target(adapter, settings)))
    runs = {"stock": lambda: call(pipe), "all-full plan": lambda: call(planned)}
    for run in runs.values():
        run()  # warm-up
    times = interleaved_times(runs, torch.device("cpu"), repeats)
    return ratio_stats(times, "all-full plan", dense="stock")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per model")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per call")
    parser.add_argument("--batch", type=int, default=4, help="samples per call")
    args = parser.parse_args()
    print_provenance()
    torch.set_num_threads(1)  # one core per call: the hooks' share is not hidden by thread scheduling
    print(f"\n{args.steps} steps, {args.batch} samples per call, {args.repeats} interleaved rounds, 1 CPU thread\n")
    print("| model | all-full plan / stock (median) | band (min–max) |\n|---|---|---|")
    for name in CASES:
        median, low, high = measure(name, args.steps, args.batch, args.repeats)
        print(f"| {name} | {median:.3f} | {low:.3f}–{high:.3f} |", flush=True)


if __name__ == "__main__":
    main()
