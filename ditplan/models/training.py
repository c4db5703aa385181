"""What ditplan's two training loops (the embedded model, SparseDiT fine-tuning) share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ditplan.atomic import atomic_write


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a session ending mid-write leaves the old checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def optimiser_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                   lr_schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backward, clip the gradient norm to 1, step the optimiser and the learning-rate schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    lr_schedule.step()


def checkpoint_and_stop(step: int, total: int, save_every: int, started: float, max_minutes: float | None,
                        save: Callable[[], None]) -> bool:
    """After optimiser step ``step``: checkpoint every ``save_every`` steps and at the end; past
    ``max_minutes`` since ``started`` (``time.monotonic``), checkpoint and return True to stop."""
    stop = max_minutes is not None and time.monotonic() - started > max_minutes * 60
    if stop or step % save_every == 0 or step == total:
        save()
    return stop
