"""Sample an experiment's workload, dense or with a plan, to a PNG grid plus the raw samples."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchvision.utils import save_image

from ditplan.models.adapters import adapter_from_spec
from ditplan.strategies.apply import sample_with_plan
from ditplan.plan import load_plan
from ditplan.spec import load_spec


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
    samples, _ = sample_with_plan(adapter, plan, spec.workload.conditions(), spec.workload.seeds(),
                                  spec.sampler.settings(), show_progress=True)
    nrow = len(spec.workload.classes or spec.workload.prompts or [])
    save_samples(samples, Path(out), nrow=max(1, min(nrow, 16)))
    return Path(out)
