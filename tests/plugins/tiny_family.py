"""A model family registered the way a third party registers one (importing this module registers it as
``square-dit``): a DiT whose transformer is its own class, whose blocks a plan counts in reverse depth order
and which takes the square of a class label's index as its condition. One file; ``--plugin`` loads it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DiTTransformer2DModel

from ditplan.models.families.dit import DiTAdapter
from ditplan.models.family import register_family


class SquareDiTTransformer(DiTTransformer2DModel):
    """A DiT transformer by another class name (what ditplan tells families apart by)."""


@register_family
class SquareDiT(DiTAdapter):
    name = "square-dit"
    transformer_class = SquareDiTTransformer
    pipelines: dict = {}  # runs in ditplan's own loop only

    @classmethod
    def blocks(cls, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)[::-1]

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        super().check_conditions([int(c) ** 2 for c in conditions])

    def conditioning(self, conditions: Sequence[Any], device: torch.device):  # noqa: ANN201
        return super().conditioning([int(c) ** 2 for c in conditions], device)
