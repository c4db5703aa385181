"""A small CNN digit classifier: judges class agreement of samples and supplies FID features.

Trained by ditplan on the training split of the embedded digits; its 128-d penultimate activations
play the role Inception's pool features play for ImageNet FID ("domain FID"). They are class
features: trained to tell digits apart, they can stay put while strokes and texture change. The
first block's activations (``low_features``: 32 edge/stroke detectors pooled over 4 × 4 cells of 8 × 8
pixels, 512-d) see those strokes and textures, and where on the image they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ditplan.models.digits import NUM_CLASSES, load_digits
from ditplan.models.embedded import EMBEDDED_PATH
from ditplan.progress import progress_bar

CLASSIFIER_PATH = EMBEDDED_PATH / "digit_classifier" / "model.safetensors"
FEATURE_DIM = 128
LOW_CELLS = 4  # low-level features pooled to LOW_CELLS × LOW_CELLS cells


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


INPUT_SIZE = 32


def to_classifier_size(x: torch.Tensor) -> torch.Tensor:
    """Digits of another size (the 64 × 64 embedded model's) area-downsampled to the classifier's 32 × 32:
    averaging each 2 × 2 cell undoes the bilinear 2× upsampling those digits were made with, up to blur."""
    if x.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return x
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")


class DigitClassifier(nn.Module):
    """Input (N, 1, H, W) in [-1, 1], downsampled to 32 × 32 when larger; ``features`` → (N, 128),
    ``forward`` → logits (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(1, 32), _conv(32, 32), nn.MaxPool2d(2),  # (N, 32, 16, 16)
            _conv(32, 64), _conv(64, 64), nn.MaxPool2d(2),  # (N, 64, 8, 8)
            _conv(64, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, 128)
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(to_classifier_size(x))

    def low_features(self, x: torch.Tensor) -> torch.Tensor:
        """The first block's stroke and texture detectors, average-pooled: (N, 32 · 4 · 4) = (N, 512)."""
        first = self.body[:3](to_classifier_size(x))  # (N, 32, 16, 16): two 3 × 3 convolutions and a 2 × 2 max-pool
        return F.adaptive_avg_pool2d(first, LOW_CELLS).flatten(1)  # (N, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ±2 pixels (the only augmentation digits need)."""
    padded = F.pad(batch, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + batch.shape[-2], dx : dx + batch.shape[-1]]


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    preds = torch.cat([model(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return (preds == labels).float().mean().item()


def train_digit_classifier(
    dest: str | Path = CLASSIFIER_PATH, epochs: int = 40, device: str = "cpu", seed: int = 0,
    data_npz: str | Path | None = None,
) -> float:
    """Train on the training split, save to ``dest``; return held-out accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits("train", data_npz)
    held_images, held_labels = load_digits("held_out", data_npz)
    model = DigitClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batches_per_epoch = len(images) // 128
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * batches_per_epoch)
    with progress_bar(total=epochs, description="classifier") as bar:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(images), generator=generator)
            for b in range(batches_per_epoch):
                idx = order[b * 128 : (b + 1) * 128]
                x = _shift(images[idx], generator).to(device)
                loss = F.cross_entropy(model(x), labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            bar.update(1, loss=f"{loss.item():.3f}")
    model = model.cpu()
    held_acc = accuracy(model, held_images, held_labels)
    from ditplan.atomic import atomic_write

    atomic_write(dest, lambda tmp: save_file(model.state_dict(), str(tmp)))
    return held_acc


def load_digit_classifier(path: str | Path = CLASSIFIER_PATH) -> DigitClassifier:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"digit classifier weights not found at {path}; train them with `ditplan train-embedded --classifier-only`"
        )
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
