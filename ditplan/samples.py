"""Sample an experiment's workload, dense or with a plan, to a PNG grid plus the raw samples."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torchvision.utils import save_image

from ditplan.atomic import atomic_write
from ditplan.models.adapters import ModelAdapter
from ditplan.plan import Plan
from ditplan.spec import ExperimentSpec
from ditplan.strategies.apply import run_plan


def save_samples(samples: torch.Tensor, out: Path, nrow: int) -> None:
    """Write ``grid.png`` and ``samples.safetensors`` atomically into ``out``."""
    atomic_write(out / "grid.png", lambda tmp: save_image((samples[:, :3] + 1) / 2, tmp, nrow=nrow, format="png"))
    atomic_write(out / "samples.safetensors", lambda tmp: save_file({"samples": samples.contiguous()}, str(tmp)))


def generate(spec: ExperimentSpec, adapter: ModelAdapter, out: str | Path, plan: Plan | None = None) -> Path:
    """Sample the experiment's workload under ``plan`` (dense when None) into ``out``."""
    run = run_plan(adapter, plan, spec.workload.conditions(), spec.workload.seeds(), spec.sampler.settings(),
                   show_progress=True)
    nrow = len(spec.workload.classes or spec.workload.prompts or [])
    save_samples(run.samples, Path(out), nrow=max(1, min(nrow, 16)))
    return Path(out)
