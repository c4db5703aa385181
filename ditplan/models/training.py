"""What ditplan's two training loops (the embedded model, SparseDiT fine-tuning) share."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup

from ditplan.atomic import atomic_write
from ditplan.models.digits import load_digits
from ditplan.progress import progress_bar


@dataclass(frozen=True)
class LoopConfig:
    """The optimisation loop of a training run; each kind of run (:data:`DEFAULTS`) gives its own defaults.

    steps: optimiser steps of the whole run (a resumed run continues towards this number).
    batch_size: samples per step.
    lr: peak AdamW learning rate, reached after ``warmup_steps`` and decayed to 0 on a cosine.
    save_every: steps between checkpoints.
    seed: seeds initialisation, batches and noise.
    """

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    save_every: int
    seed: int = 0

    DEFAULTS: ClassVar[dict[str, Any]] = {}

    @classmethod
    def make(cls, **given: Any) -> Any:
        """This kind of run's config: ``given`` over its :data:`DEFAULTS`."""
        return cls(**{**cls.DEFAULTS, **given})


def start_run(run_dir: str | Path, seed: int, data_npz: str | Path | None, image_size: int,
              device: str | torch.device) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Create ``run_dir``, seed the global RNG and load the training digits onto ``device``:
    ``(run_dir, images (N, 1, S, S), labels (N,))``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    images, labels = load_digits("train", data_npz, image_size)
    return run_dir, images.to(device), labels.to(device)


def bf16_autocast(device: str | torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA; on any other device a context that changes nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def new_optimiser(params: Iterable[torch.nn.Parameter], config: LoopConfig, **adamw: Any
                  ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay (``adamw``: its other options) and its learning-rate schedule: warm-up over
    ``config.warmup_steps``, then a cosine decay to 0 at ``config.steps``."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, **adamw)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)


def state_dicts(**parts: Any) -> dict[str, Any]:
    """``{name: part.state_dict()}`` of each of ``parts``, in order (for a checkpoint)."""
    return {name: part.state_dict() for name, part in parts.items()}


def load_states(state: dict[str, Any], **parts: Any) -> None:
    """Load each of ``parts`` from ``state[name]``, in order (from a checkpoint)."""
    for name, part in parts.items():
        part.load_state_dict(state[name])


def restore_generator(generator: torch.Generator, saved: torch.Tensor, device: str | torch.device) -> None:
    """Put ``generator`` back in the state ``saved`` (loaded onto ``device``; a CPU generator takes a CPU tensor)."""
    generator.set_state(saved.cpu() if torch.device(device).type == "cpu" else saved)


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a process stopped mid-write leaves the old checkpoint."""
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


def train_loop(train_step: Callable[[], torch.Tensor], save: Callable[[int], None], config: LoopConfig, step: int, *,
               description: str, started: float, max_minutes: float | None, log_every: int,
               loss_format: str) -> tuple[int, torch.Tensor | None]:
    """Call ``train_step`` (one optimiser step; returns its loss) from ``step`` until ``config.steps`` under a
    progress bar that shows the loss every ``log_every`` steps, checkpointing with ``save(step)`` as
    :func:`checkpoint_and_stop` says; return the step reached and the last loss (None when no step ran)."""
    loss = None
    with progress_bar(total=config.steps, description=description, completed=step) as bar:
        while step < config.steps:
            loss = train_step()
            step += 1
            bar.update(1, loss=format(loss.item(), loss_format) if step % log_every == 0 else None)
            if checkpoint_and_stop(step, config.steps, config.save_every, started, max_minutes, lambda: save(step)):
                break
    return step, loss


def check_finite(loss: torch.Tensor | None, step: int, what: str) -> None:
    """Raise when the last loss of ``what`` (a training run, reaching ``step``) is not finite."""
    if loss is not None and not math.isfinite(loss.item()):
        raise RuntimeError(f"{what} diverged at step {step} (loss {loss.item()})")
