"""Sample an experiment's workload, dense or with a plan, to a PNG grid plus the raw samples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torchvision.utils import save_image

from ditplan.atomic import atomic_write
from ditplan.errors import UserError
from ditplan.models.families import FAMILIES
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan
from ditplan.spec import ExperimentSpec, WorkloadSpec, format_error
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


def with_workload(spec: ExperimentSpec, classes: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                  seed: int | None = None, num: int | None = None) -> ExperimentSpec:
    """A copy of ``spec`` whose plain workload samples ``classes`` (class-conditional models) or ``prompts``
    (text models), from seed ``seed``, ``num`` samples per condition; what is not given stays as the
    experiment has it. ``spec`` itself is left as it is."""
    by_class = FAMILIES.get_entry(spec.model.kind, "model.kind").conditioning_kind == "classes"
    if classes and not by_class or prompts and by_class:
        wanted = "class labels" if by_class else "prompts"
        raise UserError(f"the experiment's {spec.model.kind} model is conditioned on {wanted}; give {wanted} instead")
    given = {"classes": classes, "prompts": prompts, "seed": seed, "samples_per_condition": num}
    update = {key: list(value) if key in ("classes", "prompts") else value
              for key, value in given.items() if value is not None}
    try:
        workload = WorkloadSpec.model_validate({**spec.workload.model_dump(), **update})
    except ValidationError as err:
        raise UserError(format_error(f"experiment {spec.name} with the samples asked for", err)) from None
    return spec.model_copy(update={"workload": workload})
