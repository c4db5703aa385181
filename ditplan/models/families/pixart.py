"""PixArt-α/Σ (diffusers ``PixArtTransformer2DModel``): prompt-conditioned through cross-attention to T5
embeddings, one shared adaLN-single modulation. Runs in ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``,
which batch CFG as ``[uncond; cond]``. Runs offline from prompt embeddings (a safetensors file).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import (
    DDPMScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)

from ditplan.models.family import (
    PromptFamily,
    linear_flops,
    register_family,
    timestep_embedding_flops,
)

@register_family
class PixArtAdapter(PromptFamily):
    """Prompt-conditioned PixArt; runs offline from prompt embeddings + attention masks.

    ``prompt_embeddings`` maps a prompt to ``(embeds (L, D), mask (L,))``; the empty prompt "" is the
    unconditional one. A user with the T5 encoder fills it with :meth:`encode_prompts`.
    """

    name = "pixart"
    transformer_class = PixArtTransformer2DModel
    scheduler_class = DDPMScheduler
    pipelines = {PixArtAlphaPipeline: "uncond-cond", PixArtSigmaPipeline: "uncond-cond"}
    second_name = "mask"
    second_input = "encoder_attention_mask"
    per_token = True
    encodes_prompts = True

    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            # NOTE: PixArt-α 1024 is conditioned on image size and aspect ratio, as in its pipeline.
            size = float(self.latent_size * 8)
            n = latents.shape[0]
            added = {
                "resolution": torch.tensor([[size, size]], device=latents.device).repeat(n, 1),
                "aspect_ratio": torch.tensor([[1.0]], device=latents.device).repeat(n, 1),
            }
        return self.transformer(latents, timestep=timestep, added_cond_kwargs=added, **inputs).sample

    @staticmethod
    def encode_prompts(source: str, prompts: Sequence[str], max_length: int = 300) -> dict:
        """Encode prompts with the pipeline's T5 encoder (needs ``ditplan[text]`` and the weights)."""
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise ImportError("encoding prompts needs the transformers package: pip install 'ditplan[text]'") from None

        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        encoder = T5EncoderModel.from_pretrained(source, subfolder="text_encoder").eval()
        out = {}
        for prompt in [*prompts, ""]:
            tokens = tokenizer(prompt, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
            with torch.no_grad():
                embeds = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0][0]
            out[prompt] = (embeds, tokens.attention_mask[0])
        return out

    def cross_attention_block_flops(self, text_tokens: int, tokens: int | None = None) -> int:
        c = self.hidden_dim
        tokens = self.num_tokens if tokens is None else tokens
        return (
            linear_flops(tokens, c, c) + 2 * linear_flops(text_tokens, c, c) + linear_flops(tokens, c, c)  # q, k, v, out
            + 2 * 2 * tokens * text_tokens * c  # scores and weighted sum
        )

    def other_flops(self, text_tokens: int = 0, tokens: int | None = None, layer: int = 0) -> tuple[int, int]:
        c, n, cfg = self.hidden_dim, self.num_tokens, self.transformer.config
        tokens = n if tokens is None else tokens
        p2 = cfg.patch_size**2
        per_block = (self.cross_attention_block_flops(text_tokens, tokens)
                     + linear_flops(tokens, c, 4 * c) + linear_flops(tokens, 4 * c, c))
        once = (
            linear_flops(n, p2 * cfg.in_channels, c)
            + timestep_embedding_flops(c) + linear_flops(1, c, 6 * c)  # adaln_single
            + linear_flops(text_tokens, cfg.caption_channels, c) + linear_flops(text_tokens, c, c)  # caption projection
            + linear_flops(n, c, p2 * cfg.out_channels)
        )
        return per_block, once
