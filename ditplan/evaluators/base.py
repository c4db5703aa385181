"""The Evaluator contract: samples of a plan + dense reference samples (same seeds) → named metrics."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import torch

Direction = Literal["minimize", "maximize"]

# The direction of every metric ditplan computes, for objectives and constraints in experiment files.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "rel_l1": "minimize",
    "mse": "minimize",
    "psnr": "maximize",
    "ssim": "maximize",
    "flops_ratio": "minimize",  # window attention as its kernel executes it (evaluators.cost.FLOPS_COUNT)
    "ideal_flops_ratio": "minimize",  # window attention as its ideal window
    "attention_flops_ratio": "minimize",
    "latency_ratio": "minimize",
    "fid": "minimize",
    "kid": "minimize",
    "kid_low": "minimize",
    "class_agreement": "maximize",
}

# Hypervolume reference values used when an experiment gives none: dense cost for cost ratios, a
# clearly bad quality for fidelity metrics. Fixed values keep hypervolumes comparable across studies.
METRIC_REFERENCE: dict[str, float] = {
    "rel_l1": 0.5,
    "mse": 1.0,
    "psnr": 10.0,
    "ssim": 0.0,
    "flops_ratio": 1.0,
    "ideal_flops_ratio": 1.0,
    "attention_flops_ratio": 1.0,
    "latency_ratio": 1.0,
    "class_agreement": 0.0,
}


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    direction: Direction


class Evaluator(abc.ABC):
    """Quality evaluators compare a plan's samples with the dense reference samples of the same seeds
    (and, for distribution metrics, with a real reference set)."""

    name: str

    @abc.abstractmethod
    def evaluate(self, samples: torch.Tensor, reference: torch.Tensor) -> list[Metric]:
        """Called once per evaluated plan; ``samples`` and ``reference`` are (N, C, H, W) in [-1, 1]."""
