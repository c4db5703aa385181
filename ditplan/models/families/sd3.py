"""Stable Diffusion 3 / 3.5 (stabilityai, diffusers ``SD3Transformer2DModel``): a flow-matching transformer
with joint attention over image and text tokens (image first), MMDiT blocks (``transformer_blocks``, the last
one keeps no text stream), an image-only second attention in SD3.5's dual-attention layers. Runs in
``StableDiffusion3Pipeline``, which batches classifier-free guidance as ``[uncond; cond]``.

What runs on its blocks is the joint-attention families' (:class:`~ditplan.models.family.JointAttentionFamily`);
a plan's attention cells are the joint ``attn``, not SD3.5's second attention. Prompts come through the
pipeline's own text encoders or as stored embeddings: ``<prompt>.embeds`` (L, 4096: CLIP and T5 joined) and
``<prompt>.pooled`` (2048: both CLIPs) for every prompt and for the empty prompt "" (the unconditional one).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from ditplan.models.family import (
    JointAttentionFamily,
    linear_flops,
    register_family,
    timestep_embedding_flops,
)


@register_family
class SD3Adapter(JointAttentionFamily):
    """``prompt_embeddings`` maps a prompt to ``(embeds (L, D), pooled (P,))``, the empty prompt "" included."""

    name = "sd3"
    transformer_class = SD3Transformer2DModel
    scheduler_class = FlowMatchEulerDiscreteScheduler
    pipelines = {StableDiffusion3Pipeline: "uncond-cond"}
    text_first = False  # its joint attention puts the image tokens first

    @classmethod
    def encode_one(cls, pipe: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device="cpu",
                                                  do_classifier_free_guidance=False)
        return embeds[0], pooled[0]

    # --- sampling ------------------------------------------------------------------------------
    def set_timesteps(self, scheduler: Any, num_steps: int, device: torch.device) -> None:
        """StableDiffusion3Pipeline's schedule: the scheduler's own, shifted by the token count when it shifts
        dynamically."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        config = scheduler.config
        mu = None
        if config.get("use_dynamic_shifting"):
            mu = calculate_shift(self.num_tokens, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.16))
        retrieve_timesteps(scheduler, num_steps, device, **({"mu": mu} if mu is not None else {}))

    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.transformer(hidden_states=latents, timestep=timestep, return_dict=False, **inputs)[0]

    # --- FLOPs, per sample ---------------------------------------------------------------------
    def _block(self, layer: int) -> torch.nn.Module:
        return self.transformer.transformer_blocks[layer]

    def joint_attention_flops(self, layer: int, text_tokens: int, pairs: int | None = None) -> int:
        """The block's joint attention (``attn``): q, k, v of both streams, the scores over the joint sequence,
        the image's output projection and the text's (but in the last block)."""
        block, c, n = self._block(layer), self.hidden_dim, self.num_tokens
        pairs = (n + text_tokens) ** 2 if pairs is None else pairs
        flops = 4 * linear_flops(n, c, c) + 3 * linear_flops(text_tokens, c, c) + 2 * 2 * pairs * c
        if not block.context_pre_only:
            flops += linear_flops(text_tokens, c, c)
        return flops

    def other_flops(self, text_tokens: int = 0, tokens: int | None = None, layer: int = 0) -> tuple[int, int]:
        block, c, n, cfg = self._block(layer), self.hidden_dim, self.num_tokens, self.transformer.config
        mlp = linear_flops(n, c, 4 * c) + linear_flops(n, 4 * c, c)
        norm = linear_flops(1, c, (9 if block.attn2 is not None else 6) * c)  # SD35AdaLayerNormZeroX or AdaLayerNormZero
        if block.context_pre_only:  # AdaLayerNormContinuous, no text MLP
            context = linear_flops(1, c, 2 * c)
        else:
            context = linear_flops(1, c, 6 * c) + linear_flops(text_tokens, c, 4 * c) + linear_flops(text_tokens, 4 * c, c)
        if block.attn2 is not None:  # SD3.5's second, image-only attention: not the plan's attention module
            context += 4 * linear_flops(n, c, c) + 2 * 2 * n * n * c
        p2 = cfg.patch_size**2
        once = (
            linear_flops(n, p2 * cfg.in_channels, c)  # patch embedding (a strided conv)
            + timestep_embedding_flops(c) + linear_flops(1, cfg.pooled_projection_dim, c) + linear_flops(1, c, c)
            + linear_flops(text_tokens, cfg.joint_attention_dim, cfg.caption_projection_dim)  # context_embedder
            + linear_flops(1, c, 2 * c)  # norm_out
            + linear_flops(n, c, p2 * cfg.out_channels)  # proj_out
        )
        return norm + mlp + context, once
