"""Text alignment of prompt-conditioned samples: CLIP score from local CLIP weights.

CLIP score = 100 · mean over samples of max(cos(image embedding, prompt embedding), 0), as in
torchmetrics. The weights come from a local folder (``CLIPModel.save_pretrained`` layout, e.g. a
downloaded ``openai/clip-vit-base-patch32``); nothing is downloaded. Without configured weights the
metric is skipped with a note rather than failing the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ditplan.errors import UserError
from ditplan.evaluators.base import Metric


def _projected(features: object) -> torch.Tensor:
    """transformers 4 returns the projected embeddings; 5 returns an output whose pooler_output holds them."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output  # type: ignore[attr-defined]


class ClipScorer:
    """Loads CLIP once; ``score(images, prompts)`` is called per evaluated plan."""

    def __init__(self, weights_path: str | Path) -> None:
        if not Path(weights_path).is_dir():
            raise UserError(
                f"CLIP weights folder {weights_path} not found; save one with CLIPModel/CLIPProcessor.save_pretrained "
                "on a machine with internet and set evaluation.clip_weights_path"
            )
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError:
            raise UserError("CLIP score needs the transformers package: pip install 'ditplan[text]'") from None
        self.model = CLIPModel.from_pretrained(str(weights_path)).eval()
        self.processor = CLIPProcessor.from_pretrained(str(weights_path))

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> Metric:
        """``images`` (N, C, H, W) in [-1, 1], one prompt per image."""
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        inputs = self.processor(text=list(prompts), images=list(pixels), return_tensors="pt", padding=True)
        image = _projected(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _projected(self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        return Metric("clip_score", float(100 * cosine.clamp(min=0).mean()), "maximize")
