"""DiT (facebookresearch/DiT, diffusers ``DiTTransformer2DModel``): class-conditional, one adaLN-Zero
modulation per block, no text. Runs in ``DiTPipeline``, which batches CFG as ``[cond; uncond]``; the null
class (CFG) is the extra row of the label table. ditplan's embedded digit models are of this family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from ditplan.errors import UserError
from ditplan.models.family import (
    Conditioning,
    ModelAdapter,
    linear_flops,
    register_family,
    timestep_embedding_flops,
)


@register_family
class DiTAdapter(ModelAdapter):
    name = "dit"
    transformer_class = DiTTransformer2DModel
    scheduler_class = DDPMScheduler
    pipelines = {DiTPipeline: "cond-uncond"}
    conditioning_kind = "classes"

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        bad = [c for c in conditions if not 0 <= int(c) < self.num_classes]
        if bad:
            raise UserError(f"workload.classes has {bad[0]}, but the model knows classes 0…{self.num_classes - 1}")

    def conditioning(self, conditions: Sequence[Any], device: torch.device) -> Conditioning:
        labels = torch.tensor([int(c) for c in conditions], device=device)
        null = torch.full_like(labels, self.num_classes)
        return Conditioning({"class_labels": labels}, {"class_labels": null})

    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.transformer(latents, timestep=timestep, class_labels=inputs["class_labels"]).sample

    def block_modulation_flops(self) -> int:
        """Each block's own AdaLayerNormZero: timestep embedding + modulation (C → 6C)."""
        c = self.hidden_dim
        return timestep_embedding_flops(c) + linear_flops(1, c, 6 * c)

    def other_flops(self, text_tokens: int = 0, tokens: int | None = None, layer: int = 0) -> tuple[int, int]:
        c, n, cfg = self.hidden_dim, self.num_tokens, self.transformer.config
        tokens = n if tokens is None else tokens
        p2 = cfg.patch_size**2
        # each block: its own modulation; MLP C → 4C → C
        per_block = self.block_modulation_flops() + linear_flops(tokens, c, 4 * c) + linear_flops(tokens, 4 * c, c)
        once = (
            linear_flops(n, p2 * cfg.in_channels, c)  # patch embedding (a strided conv)
            + timestep_embedding_flops(c) + linear_flops(1, c, 2 * c)  # final modulation
            + linear_flops(n, c, p2 * self.transformer.out_channels)  # unpatchify projection
        )
        return per_block, once
