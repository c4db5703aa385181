"""The embedded models: small class-conditional DiTs trained by ditplan on real digits.

Their weights live inside the package in diffusers' ``save_pretrained`` layout (``transformer/`` and
``scheduler/``), so they load through ``from_pretrained`` exactly like a hub checkpoint. An experiment
names one by its key in :data:`EMBEDDED_MODELS` as ``model.source``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin

from ditplan.models.digits import NUM_CLASSES
from ditplan.models.families import FAMILIES
from ditplan.registry import Registry

PACKAGE_FOLDER = Path(__file__).parent
EMBEDDED_FAMILY = "dit"  # the model family (model.kind) of every embedded model

# v-prediction converges much faster than ε-prediction on these models (see shared/NOTES-embedded.md).
EMBEDDED_SCHEDULER_CONFIG: dict[str, Any] = {"prediction_type": "v_prediction"}


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where its weights live, its transformer's shape and the digit size it draws.

    image_size: pixels per side; the digits are padded to 32 × 32 and, for 64, upsampled bilinearly 2×.
    storage_dtype: the dtype its weights are saved in (they load as float32 unless ``model.dtype`` says
    otherwise).
    """

    folder: Path
    image_size: int
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    storage_dtype: torch.dtype = torch.float32

    def transformer_config(self) -> dict[str, Any]:
        return {
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": 1,
            "out_channels": 1,
            "num_layers": self.num_layers,
            "sample_size": self.image_size,
            "patch_size": 2,
            "num_embeds_ada_norm": NUM_CLASSES,  # the label table has one more row: the null class for CFG
        }


EMBEDDED_MODELS: Registry[EmbeddedModel] = Registry("embedded model", {
    # 6 layers × 128 wide, 4 heads of 32; 32×32 pixels in 2×2 patches → 256 tokens; ≈ 2.1 M parameters.
    # Sized so that sampling stays cheap on 2 CPU cores (plan searches sample thousands of times).
    "embedded": EmbeddedModel(PACKAGE_FOLDER / "embedded", 32, 6, 4, 32),
    # 8 layers × 256 wide, 4 heads of 64; 64×64 pixels in 2×2 patches → 1,024 tokens; ≈ 10.7 M parameters,
    # stored in float16. Trained on a GPU: the size where window attention and token sparsity pay.
    "embedded-1024": EmbeddedModel(PACKAGE_FOLDER / "embedded_1024", 64, 8, 4, 64, storage_dtype=torch.float16),
})
EMBEDDED_PATH = EMBEDDED_MODELS["embedded"].folder


def embedded_model(name: str = "embedded", where: str = "") -> EmbeddedModel:
    """The embedded model ``name``; another name is one line naming the embedded models."""
    return EMBEDDED_MODELS.get_entry(name, where)


def new_embedded_transformer(name: str = "embedded") -> torch.nn.Module:
    """A freshly initialised (untrained) transformer of the embedded model ``name``'s shape."""
    return FAMILIES[EMBEDDED_FAMILY].transformer_class(**EMBEDDED_MODELS[name].transformer_config())


def new_embedded_scheduler() -> SchedulerMixin:
    return FAMILIES[EMBEDDED_FAMILY].scheduler_class(**EMBEDDED_SCHEDULER_CONFIG)
