"""FLUX.1 (black-forest-labs, diffusers ``FluxTransformer2DModel``): a flow-matching transformer with joint
attention over text and image tokens (text first), dual-stream blocks (``transformer_blocks``) then
single-stream blocks (``single_transformer_blocks``), RoPE positions and, in FLUX.1-dev, distilled guidance
(the scale is an input: one call per step; true CFG on top, ``sampler.true_cfg_scale``, adds an unconditional call
with the empty prompt). Runs in ``FluxPipeline`` with ``FlowMatchEulerDiscreteScheduler``, whose schedule it shifts
by the image's token count as the pipeline does.

A plan's layers are the dual-stream blocks, then the single-stream ones; what runs on them is the joint-attention
families' (:class:`~ditplan.models.family.JointAttentionFamily`). Prompts come through the pipeline's own text
encoders or as stored embeddings: ``<prompt>.embeds`` (L, 4096: T5) and ``<prompt>.pooled`` (768: CLIP), and for
true CFG those of the empty prompt "".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)

from ditplan.models.family import (
    CfgMode,
    PackedLatentFamily,
    linear_flops,
    read_prompt_embeddings,
    register_family,
    timestep_embedding_flops,
)

if TYPE_CHECKING:
    from ditplan.spec import ExperimentSpec


@register_family
class FluxAdapter(PackedLatentFamily):
    """``prompt_embeddings`` maps a prompt to ``(embeds (L, D), pooled (P,))``; ``image_size``: pixels per side."""

    name = "flux"
    transformer_class = FluxTransformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    pipelines = {FluxPipeline: "distilled"}
    unconditional = False  # guidance-distilled: an unconditional call only with true CFG (sampler.true_cfg_scale)
    guidance_modes = ("embedded",)
    default_methods = ("full", "ast", "wars", "reuse", "forecast")  # no CFG halves to share
    attention_names = r"(single_)?transformer_blocks\.\d+\.attn"
    default_image_size = 1024  # FLUX.1's native resolution

    # --- structure ---------------------------------------------------------------------------
    @classmethod
    def blocks(cls, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    @classmethod
    def pipeline_guidance(cls, arguments: Mapping[str, Any], cfg_mode: CfgMode) -> tuple[float | None, bool, float]:
        """The distilled ``guidance_scale``; true CFG when ``true_cfg_scale`` > 1 and a negative prompt (or its
        embeddings and pooled embeddings) is given, as FluxPipeline decides."""
        negative = arguments.get("negative_prompt") is not None or (
            arguments.get("negative_prompt_embeds") is not None and arguments.get("negative_pooled_prompt_embeds") is not None)
        true_cfg = float(arguments.get("true_cfg_scale") or 1.0)
        true_cfg = true_cfg if negative and true_cfg > 1.0 else 1.0
        return arguments.get(cls.guidance_argument), true_cfg > 1.0, true_cfg

    @classmethod
    def check_spec(cls, spec: ExperimentSpec) -> None:
        """True CFG (``sampler.true_cfg_scale`` > 1) needs the empty prompt's embeddings, its unconditional prompt."""
        super().check_spec(spec)
        if spec.sampler.true_cfg_scale > 1.0 and spec.model.prompt_embeddings:
            read_prompt_embeddings(spec.model.prompt_embeddings, [], cls.second_name, cls.per_token, unconditional=True)

    @classmethod
    def block_probe(cls, block: torch.nn.Module) -> torch.nn.Module:
        return getattr(block, "ff", None) or block.proj_mlp  # a single-stream block's MLP is proj_mlp

    @classmethod
    def encode_one(cls, pipe: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device="cpu")
        return embeds[0], pooled[0]

    @classmethod
    def estimate_size(cls, config: dict[str, Any]) -> tuple[int, int]:
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return (int(config["num_layers"]) + int(config["num_single_layers"])) * 12 * width**2, 0

    # --- shape ---------------------------------------------------------------------------------
    @property
    def num_dual_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    # --- sampling ------------------------------------------------------------------------------
    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        n, _, h, w = latents.shape
        guidance = inputs.get("guidance") if self.transformer.config.guidance_embeds else None
        out = self.transformer(
            hidden_states=self.pack(latents),
            timestep=timestep.to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=inputs["pooled_projections"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            txt_ids=torch.zeros(inputs["encoder_hidden_states"].shape[1], 3, device=latents.device, dtype=latents.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, latents.dtype),
            return_dict=False,
        )[0]
        return self.unpack(out)

    # --- FLOPs, per sample ---------------------------------------------------------------------
    def joint_attention_flops(self, layer: int, text_tokens: int, pairs: int | None = None) -> int:
        """Dual-stream: q, k, v and out projections of each stream; single-stream: q, k, v over the joint
        sequence (its output projection is the block's proj_out); both: scores and weighted sum."""
        c, n = self.hidden_dim, self.num_tokens
        joint = n + text_tokens
        core = 2 * 2 * (joint * joint if pairs is None else pairs) * c  # the scores and weighted sum of its pairs
        if layer < self.num_dual_layers:
            return 4 * linear_flops(n, c, c) + 4 * linear_flops(text_tokens, c, c) + core
        return 3 * linear_flops(joint, c, c) + core

    def other_flops(self, text_tokens: int = 0, tokens: int | None = None, layer: int = 0) -> tuple[int, int]:
        c, n, cfg = self.hidden_dim, self.num_tokens, self.transformer.config
        joint = n + text_tokens
        if layer < self.num_dual_layers:  # two AdaLayerNormZero (C → 6C), two MLPs C → 4C → C
            per_block = 2 * linear_flops(1, c, 6 * c) + sum(linear_flops(k, c, 4 * c) + linear_flops(k, 4 * c, c)
                                                             for k in (n, text_tokens))
        else:  # AdaLayerNormZeroSingle (C → 3C), proj_mlp C → 4C, proj_out 5C → C over the joint sequence
            per_block = linear_flops(1, c, 3 * c) + linear_flops(joint, c, 4 * c) + linear_flops(joint, 5 * c, c)
        embeddings = timestep_embedding_flops(c) * (2 if cfg.guidance_embeds else 1)
        once = (
            linear_flops(n, cfg.in_channels, c)  # x_embedder
            + embeddings + linear_flops(1, cfg.pooled_projection_dim, c) + linear_flops(1, c, c)  # time, guidance, pooled
            + linear_flops(text_tokens, cfg.joint_attention_dim, c)  # context_embedder
            + linear_flops(1, c, 2 * c)  # norm_out
            + linear_flops(n, c, cfg.patch_size**2 * (cfg.out_channels or cfg.in_channels))  # proj_out
        )
        return per_block, once
