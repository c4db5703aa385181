"""What ditplan's two training loops (the embedded model, SparseDiT fine-tuning) share."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a session ending mid-write leaves the old checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def optimiser_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                   lr_schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backward, clip the gradient norm to 1, step the optimiser and the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    lr_schedule.step()
