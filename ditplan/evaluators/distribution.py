"""Distribution quality through torch-fidelity: FID, IS, KID, precision/recall vs a reference set.

Feature extractors: ``digits`` (ditplan's digit classifier, registered in torch-fidelity here),
``inception-v3-compat`` (needs a local weights file: nothing is downloaded), or any other
extractor registered in torch-fidelity. Reference statistics are cached by torch-fidelity under
``cache_dir`` with a name derived from the reference's content hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import (
    FEATURE_EXTRACTORS_REGISTRY,
    register_feature_extractor,
)

from ditplan.errors import UserError
from ditplan.evaluators.base import Metric
from ditplan.evaluators.digit_classifier import CLASSIFIER_PATH, load_digit_classifier
from ditplan.models.digits import to_uint8_rgb

DIGITS_EXTRACTOR = "digits"


# Dimensions of the features FID fits a Gaussian to: fewer samples than this leave its covariance
# rank-deficient (FID biased upward; KID is unbiased at any count).
FID_FEATURE_DIMS = {DIGITS_EXTRACTOR: 128, "inception-v3-compat": 2048}

# The extractor layer that ``kid_low`` reads: low-level features, before any class-specific layer
# (Inception: its first pooled 64-channel block).
LOW_LEVEL_LAYERS = {DIGITS_EXTRACTOR: "low", "inception-v3-compat": "64"}


class DigitFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over ditplan's digit classifier: ``pool`` (128-d class features),
    ``logits`` and ``low`` (512-d first-block stroke and texture features)."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **_: Any):
        super().__init__(name, features_list)
        self.classifier = load_digit_classifier(feature_extractor_weights_path or CLASSIFIER_PATH)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pool", "logits", "low")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grey = x[:, :1].float() / 127.5 - 1.0  # uint8 (N, 3, H, W) → (N, 1, H, W) in [-1, 1]
        pool = self.classifier.features(grey)
        features = {"pool": pool, "logits": self.classifier.head(pool), "low": self.classifier.low_features(grey)}
        return tuple(features[name] for name in self.features_list)


if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DIGITS_EXTRACTOR, DigitFeatureExtractor)


class _Images(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as the dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def content_hash(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def folder_hash(folder: str | Path) -> str:
    """A hash of a reference folder's files — names, sizes and modification times — so that cached
    statistics follow the images in it, not the folder's name (reading every image to hash it would cost
    as much as the statistics)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def distribution_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor | str,
    extractor: str = DIGITS_EXTRACTOR,
    weights_path: str | None = None,
    metrics: tuple[str, ...] = ("fid", "kid", "isc", "prc"),
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    save_cpu_ram: bool = True,
) -> list[Metric]:
    """FID/KID/IS/precision/recall of ``samples`` against ``reference``: (N, C, H, W) in [-1, 1] like
    the samples, or a folder of real images; ``kid_low`` in ``metrics`` adds KID on the extractor's
    low-level layer (``LOW_LEVEL_LAYERS``). ``save_cpu_ram`` (torch-fidelity's switch) loads without
    worker processes: in-memory tensors gain nothing from them, and Ray workers must not fork."""
    out = []
    if "kid_low" in metrics:
        if extractor not in LOW_LEVEL_LAYERS:
            raise UserError(f"kid_low needs a low-level layer of {extractor!r}; known for {sorted(LOW_LEVEL_LAYERS)}")
        low = _fidelity(samples, reference, extractor, weights_path, ("kid",), cache_dir, device, save_cpu_ram,
                        feature_layer_kid=LOW_LEVEL_LAYERS[extractor])
        out = [Metric("kid_low", m.value, m.direction) for m in low]
    rest = tuple(m for m in metrics if m != "kid_low")
    return _fidelity(samples, reference, extractor, weights_path, rest, cache_dir, device, save_cpu_ram) + out if rest else out


def _fidelity(
    samples: torch.Tensor, reference: torch.Tensor | str, extractor: str, weights_path: str | None,
    metrics: tuple[str, ...], cache_dir: str | Path | None, device: str | torch.device, save_cpu_ram: bool,
    **layers: str,
) -> list[Metric]:
    """One torch-fidelity call; ``layers``: ``feature_layer_kid=…`` and the like."""
    if extractor == "inception-v3-compat" and not (weights_path and Path(weights_path).exists()):
        raise UserError(
            f"Inception weights file {weights_path!r} not found; download pt_inception-2015-12-05 once on a "
            "machine with internet (torch-fidelity's release page) and set evaluation.feature_extractor_weights_path"
        )
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise UserError(f"unknown feature extractor {extractor!r}; registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    if isinstance(reference, str):
        reference_input: Any = reference
        reference_id = folder_hash(reference)
        size = len(samples)
    else:
        reference_input = _Images(to_uint8_rgb(reference))
        reference_id = content_hash(reference)
        size = min(len(samples), len(reference))
    kwargs: dict[str, Any] = {
        "input1": _Images(to_uint8_rgb(samples)),
        "input2": reference_input,
        "cuda": torch.device(device).type == "cuda",
        "feature_extractor": extractor,
        "feature_extractor_weights_path": weights_path,
        "fid": "fid" in metrics,
        "kid": "kid" in metrics,
        "isc": "isc" in metrics,
        "prc": "prc" in metrics,
        "kid_subset_size": min(1000, size),
        "isc_splits": min(10, len(samples)),
        "samples_shuffle": False,
        "save_cpu_ram": save_cpu_ram,
        "verbose": False,
        **layers,
    }
    if cache_dir is not None:
        kwargs.update(cache_root=str(cache_dir), cache=True, input2_cache_name=f"ref-{extractor}-{reference_id}")
    else:
        kwargs.update(cache=False)
    raw = torch_fidelity.calculate_metrics(**kwargs)
    names = {
        "frechet_inception_distance": ("fid", "minimize"),
        "kernel_inception_distance_mean": ("kid", "minimize"),
        "inception_score_mean": ("is", "maximize"),
        "precision": ("precision", "maximize"),
        "recall": ("recall", "maximize"),
    }
    return [Metric(names[k][0], float(v), names[k][1]) for k, v in raw.items() if k in names]


@torch.no_grad()
def class_agreement(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples the digit classifier assigns to their requested class."""
    classifier = load_digit_classifier()
    predictions = torch.cat([classifier(samples[i : i + 500]).argmax(1) for i in range(0, len(samples), 500)])
    return (predictions == labels.cpu()).float().mean().item()
