"""Pareto fronts and hypervolume on plain arrays (objectives as minimisation after sign flips)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from optuna._hypervolume import (
    compute_hypervolume,  # NOTE: private; wrapped here once and tested
)

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


def best_by_rank(values: np.ndarray, directions: Sequence[Direction], count: int) -> list[int]:
    """Indices of ``count`` rows of ``values`` (n, k): whole non-dominated ranks (the front, then the front
    of the rest, …) while they fit; of the rank that does not fit whole, rows evenly spaced along the first
    objective, both ends included."""
    left = np.arange(len(values))
    chosen: list[int] = []
    while len(chosen) < count and len(left):
        mask = pareto_mask(values[left], directions)
        rank, left = left[mask], left[~mask]
        room = count - len(chosen)
        if len(rank) > room:
            rank = rank[np.argsort(as_losses(values[rank], directions)[:, 0], kind="stable")]
            rank = rank[np.round(np.linspace(0, len(rank) - 1, room)).astype(int)]  # distinct: spacing > 1
        chosen += [int(i) for i in rank]
    return chosen
