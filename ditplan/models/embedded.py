"""The embedded default model: a small class-conditional DiT trained by ditplan on real digits.

The weights live inside the package in diffusers' ``save_pretrained`` layout (``transformer/`` and
``scheduler/``), so they load through ``from_pretrained`` exactly like a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler, DiTTransformer2DModel

from ditplan.models.digits import IMAGE_SIZE, NUM_CLASSES

EMBEDDED_PATH = Path(__file__).parent / "embedded"

# 6 layers × 128 wide, 4 heads of 32; 32×32 pixels in 2×2 patches → 256 tokens; ≈ 2.1 M parameters.
# Sized so that sampling stays cheap on 2 CPU cores (plan searches sample thousands of times).
EMBEDDED_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,  # the label table has one more row: the null class for CFG
}

# v-prediction converges much faster than ε-prediction on this model (see shared/NOTES-embedded.md).
EMBEDDED_SCHEDULER_CONFIG: dict[str, Any] = {"prediction_type": "v_prediction"}


def new_embedded_transformer() -> DiTTransformer2DModel:
    """A freshly initialised (untrained) transformer of the embedded shape."""
    return DiTTransformer2DModel(**EMBEDDED_TRANSFORMER_CONFIG)


def new_embedded_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**EMBEDDED_SCHEDULER_CONFIG)
