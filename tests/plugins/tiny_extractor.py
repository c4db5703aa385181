"""A feature extractor registered in torch-fidelity the way a user registers their own (importing this
module registers it as ``tiny-colour``): each channel's mean and standard deviation (6-d ``pool``
features: a full-rank FID from a handful of samples) and 4 class ``logits`` from a fixed linear map of
them. Deterministic, no weights file, any image size: an experiment names it in
``evaluation.feature_extractor``."""

from __future__ import annotations

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

NAME = "tiny-colour"
FEATURE_DIM = 6  # 3 channels × (mean, std)


class TinyColourExtractor(FeatureExtractorBase):
    def __init__(self, name: str, features_list: list[str], **_: object) -> None:
        super().__init__(name, features_list)
        self.register_buffer("head", torch.linspace(-1, 1, FEATURE_DIM * 4).view(FEATURE_DIM, 4))

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = x.float() / 255.0  # uint8 (N, 3, H, W) → [0, 1]
        pixels = images.flatten(2)  # (N, 3, H·W)
        pool = torch.cat([pixels.mean(-1), pixels.std(-1)], dim=1)  # (N, 6)
        features = {"pool": pool, "logits": pool @ self.head}
        return tuple(features[name] for name in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, TinyColourExtractor)
