"""Sample an experiment's workload, dense or with a plan, to a PNG grid plus the raw samples."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torchvision.utils import save_image

from ditplan.atomic import atomic_write
from ditplan.files import naming
from ditplan.models.adapters import adapter_from_spec
from ditplan.strategies.apply import check_plan, sample_with_plan
from ditplan.plan import load_plan
from ditplan.spec import load_spec


def save_samples(samples: torch.Tensor, out: Path, nrow: int) -> None:
    """Write ``grid.png`` and ``samples.safetensors`` atomically into ``out``."""
    atomic_write(out / "grid.png", lambda tmp: save_image((samples[:, :3] + 1) / 2, tmp, nrow=nrow, format="png"))
    atomic_write(out / "samples.safetensors", lambda tmp: save_file({"samples": samples.contiguous()}, str(tmp)))


def generate(experiment: str | Path, out: str | Path, plan_path: str | Path | None = None) -> Path:
    spec = load_spec(experiment)
    plan = load_plan(plan_path) if plan_path else None
    with naming(experiment):
        adapter = adapter_from_spec(spec.model, spec.workload.all_conditions())
    if plan is not None:
        with naming(plan_path):
            check_plan(plan, adapter, spec.sampler.settings())
    samples, _ = sample_with_plan(adapter, plan, spec.workload.conditions(), spec.workload.seeds(),
                                  spec.sampler.settings(), show_progress=True)
    nrow = len(spec.workload.classes or spec.workload.prompts or [])
    save_samples(samples, Path(out), nrow=max(1, min(nrow, 16)))
    return Path(out)
