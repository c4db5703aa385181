"""The Evaluator contract: samples of a plan + dense reference samples (same seeds) → named metrics."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ditplan.registry import Direction


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
