"""Qwen-Image (Qwen, diffusers ``QwenImageTransformer2DModel``): a flow-matching MMDiT with joint attention over
text and image tokens (text first) in every block (``transformer_blocks``), RoPE positions, latents packed in
2 × 2 patches and a schedule shifted by the image's token count. Runs in ``QwenImagePipeline``, which runs
classifier-free guidance as **two transformer calls per step**, the conditional one first, and rescales the guided
prediction to the conditional one's norm; its scale is the pipeline's ``true_cfg_scale``, and guidance runs only
when a negative prompt is given.

A plan's layers are the blocks; what runs on them is the joint-attention families'
(:class:`~ditplan.models.family.JointAttentionFamily`), each guidance call with its own caches and ASC across the
two calls (the unconditional call takes the conditional call's attention output). Prompts come through the
pipeline's own text encoder (Qwen2.5-VL) or as stored embeddings: ``<prompt>.embeds`` (L, 3584: the encoder's last
hidden states) and ``<prompt>.mask`` (L,) for every prompt and for the empty prompt "" (the unconditional one),
padded to one length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)

from ditplan.models.family import (
    CfgMode,
    PackedLatentFamily,
    linear_flops,
    register_family,
    text_pipeline,
    timestep_embedding_flops,
)


@register_family
class QwenImageAdapter(PackedLatentFamily):
    """``prompt_embeddings`` maps a prompt to ``(embeds (L, D), mask (L,))``, the empty prompt "" included."""

    name = "qwen-image"
    transformer_class = QwenImageTransformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    vae_class = AutoencoderKLQwenImage
    pipelines = {QwenImagePipeline: "two-calls"}
    guidance_argument = "true_cfg_scale"
    second_name = "mask"
    second_input = "encoder_hidden_states_mask"
    per_token = True
    # no asc: QwenImagePipeline pads the prompt and the negative prompt each to its own length, and ASC cannot give
    # the unconditional call the conditional call's output there (it runs where the two are of one length)
    default_methods = ("full", "ast", "wars", "reuse", "forecast")
    default_image_size = 1328  # Qwen-Image's native resolution

    @classmethod
    def pipeline_guidance(cls, arguments: Mapping[str, Any], cfg_mode: CfgMode) -> tuple[float | None, bool, float]:
        """QwenImagePipeline guides when ``true_cfg_scale`` > 1 and a negative prompt (or its embeddings) is given."""
        scale = arguments.get(cls.guidance_argument)
        negative = arguments.get("negative_prompt") is not None or arguments.get("negative_prompt_embeds") is not None
        return scale, scale is not None and float(scale) > 1.0 and negative, 1.0

    @classmethod
    def encode_prompts(cls, source: str, prompts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The prompts and the empty one through the pipeline's own ``encode_prompt`` (its Qwen2.5-VL text encoder),
        in one batch padded to one length: ``(embeds (L, D), mask (L,))`` each."""
        pipe = text_pipeline(cls.pipeline_class(), source)
        names = list(dict.fromkeys([*prompts, ""]))
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(names, device="cpu")
        mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask  # None: no padding
        return {name: (embeds[i], mask[i]) for i, name in enumerate(names)}

    @classmethod
    def block_probe(cls, block: torch.nn.Module) -> torch.nn.Module:
        return block.img_mlp

    @classmethod
    def estimate_size(cls, config: dict[str, Any]) -> tuple[int, int]:
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return int(config["num_layers"]) * 12 * width**2, 0

    # --- shape ---------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2 per temporal-downsampling stage of its VAE, as the pipeline computes it."""
        return 2 ** len(self.vae.temperal_downsample) if self.vae is not None else 1

    # --- sampling ------------------------------------------------------------------------------
    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        n, _, h, w = latents.shape
        out = self.transformer(
            hidden_states=self.pack(latents),
            timestep=timestep.to(latents.dtype) / 1000,
            encoder_hidden_states_mask=inputs["encoder_hidden_states_mask"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            img_shapes=[[(1, h // 2, w // 2)]] * n,
            return_dict=False,
        )[0]
        return self.unpack(out)

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline's guidance: the usual combination, rescaled token by token (on the packed latents) to
        the conditional prediction's norm."""
        cond, uncond = self.pack(cond), self.pack(uncond)
        combined = uncond + scale * (cond - uncond)
        rescaled = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return self.unpack(rescaled)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] through its video-style VAE (one frame), un-normalised by the VAE's
        ``latents_mean``/``latents_std`` as the pipeline does."""
        if self.vae is None:
            return latents
        config, vae_dtype = self.vae.config, next(self.vae.parameters()).dtype
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, vae_dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, vae_dtype)
        frames = latents.unsqueeze(2).to(vae_dtype) / inverse_std + mean
        return self.vae.decode(frames, return_dict=False)[0][:, :, 0].float()

    # --- FLOPs, per sample ---------------------------------------------------------------------
    def joint_attention_flops(self, layer: int, text_tokens: int, pairs: int | None = None) -> int:
        """q, k, v and output projections of both streams, and the scores and weighted sum over the joint sequence."""
        c, n = self.hidden_dim, self.num_tokens
        pairs = (n + text_tokens) ** 2 if pairs is None else pairs
        return 4 * linear_flops(n, c, c) + 4 * linear_flops(text_tokens, c, c) + 2 * 2 * pairs * c

    def other_flops(self, text_tokens: int = 0, tokens: int | None = None, layer: int = 0) -> tuple[int, int]:
        c, n, cfg = self.hidden_dim, self.num_tokens, self.transformer.config
        # each stream: its modulation (C → 6C) and its MLP (C → 4C → C)
        per_block = sum(linear_flops(1, c, 6 * c) + linear_flops(k, c, 4 * c) + linear_flops(k, 4 * c, c)
                        for k in (n, text_tokens))
        once = (
            linear_flops(n, cfg.in_channels, c)  # img_in
            + linear_flops(text_tokens, cfg.joint_attention_dim, c)  # txt_in
            + timestep_embedding_flops(c)
            + linear_flops(1, c, 2 * c)  # norm_out
            + linear_flops(n, c, cfg.patch_size**2 * cfg.out_channels)  # proj_out
        )
        return per_block, once
