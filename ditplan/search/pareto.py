"""Pareto fronts and hypervolume on plain arrays (objectives as minimisation after sign flips)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from optuna._hypervolume import compute_hypervolume  # NOTE: private; wrapped here once and tested

Direction = str  # "minimize" | "maximize"


def as_losses(values: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """(n, k) objective values → losses (maximised objectives negated)."""
    signs = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    return np.asarray(values, dtype=float) * signs


def pareto_mask(values: np.ndarray, directions: Sequence[Direction]) -> np.ndarray:
    """True for the non-dominated rows of ``values`` (n, k)."""
    losses = as_losses(values, directions)
    keep = np.ones(len(losses), dtype=bool)
    for i, row in enumerate(losses):
        dominated = np.all(losses <= row, axis=1) & np.any(losses < row, axis=1)
        keep[i] = not dominated.any()
    return keep


def hypervolume(values: np.ndarray, directions: Sequence[Direction], reference: Sequence[float]) -> float:
    """Hypervolume dominated by ``values`` up to ``reference`` (given in the objectives' own units).
    Points not better than the reference in every objective contribute nothing."""
    losses = as_losses(values, directions)
    ref = as_losses(np.asarray([reference]), directions)[0]
    inside = losses[np.all(losses < ref, axis=1)] if len(losses) else losses
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, ref))
