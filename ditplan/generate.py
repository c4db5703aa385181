"""Sample an experiment's workload, dense or with a plan, to a PNG grid plus the raw samples."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchvision.utils import save_image

from ditplan.models.adapters import ModelAdapter, adapter_from_spec
from ditplan.models.sampling import plan_target, sample
from ditplan.plan import Plan, load_plan
from ditplan.spec import ExperimentSpec, load_spec
from ditplan.strategies import apply_plan, remove_plan


def sample_with_plan(
    adapter: ModelAdapter, spec: ExperimentSpec, plan: Plan | None, show_progress: bool = False
) -> torch.Tensor:
    """The workload's samples (N, C, H, W) in [-1, 1] under ``plan`` (dense when None)."""
    settings = spec.sampler.settings()
    if plan is not None:
        apply_plan(adapter.transformer, plan, plan_target(adapter, settings))
    try:
        return sample(adapter, spec.workload.conditions(), spec.workload.seeds(), settings, show_progress)
    finally:
        remove_plan(adapter.transformer)


def save_samples(samples: torch.Tensor, out: Path, nrow: int) -> None:
    """Write ``grid.png`` and ``samples.safetensors`` atomically into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, write in (
        ("grid.png", lambda p: save_image((samples[:, :3] + 1) / 2, p, nrow=nrow, format="png")),
        ("samples.safetensors", lambda p: save_file({"samples": samples.contiguous()}, p)),
    ):
        tmp = out / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, out / name)


def generate(experiment: str | Path, out: str | Path, plan_path: str | Path | None = None) -> Path:
    spec = load_spec(experiment)
    plan = load_plan(plan_path) if plan_path else None
    adapter = adapter_from_spec(spec.model, spec.workload.prompts or ())
    samples = sample_with_plan(adapter, spec, plan, show_progress=True)
    nrow = len(spec.workload.classes or spec.workload.prompts or [])
    save_samples(samples, Path(out), nrow=max(1, min(nrow, 16)))
    return Path(out)
