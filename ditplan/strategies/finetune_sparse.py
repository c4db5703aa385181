"""``ditplan finetune-sparse``: distil a SparseDiT layout from the dense model.

The student is the dense model with the layout installed (Poolingformer bottom layers, SDTMs with
identity merges); it learns to reproduce the dense teacher's prediction on noised training digits.
Every batch draws its pruning rate uniformly from ``[r_min, r_max]``, so one network serves every
pruning curve inside that range. Checkpoints are atomic and a run resumes where it stopped. The
result is a model folder in diffusers layout next to the base weights
(``<base>/sparse/<layout name>/``: ``transformer/``, ``scheduler/``, the merges and
``sparse_layout.yaml``), which plans reference by that relative path.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors.torch import save_file

from ditplan.atomic import atomic_folder
from ditplan.errors import UserError
from ditplan.models.adapters import (
    LAYOUT_FILE,
    MERGES_FILE,
    DiTAdapter,
    ModelAdapter,
    load_sparse_network,
    network_hash,
    new_merges,
)
from ditplan.models.context import StepContext, step_context
from ditplan.models.digits import load_digits
from ditplan.models.sampling import SamplerSettings, plan_target
from ditplan.models.training import atomic_save, checkpoint_and_stop, optimiser_step
from ditplan.plan import Plan, PlanTarget
from ditplan.progress import progress_bar
from ditplan.strategies.apply import apply_plan, remove_plan
from ditplan.strategies.sdtm import SparseLayout

CHECKPOINT_NAME = "finetune.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """How a SparseDiT layout is distilled.

    r_min, r_max: the pruning rates drawn per batch; plans may use any curve inside this range.
    steps: optimiser steps of the whole run (a resumed run continues towards it); batch 64 costs
      about 1 s a step on 2 CPU cores for the embedded model with one SDTM.
    lr: peak AdamW learning rate (short warm-up, cosine decay); low, as the student starts as the teacher.
    save_every: steps between checkpoints.
    """

    r_min: float = 0.5
    r_max: float = 0.875
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 50
    save_every: int = 100
    seed: int = 0


def layout_plan(adapter: ModelAdapter, layout: SparseLayout, settings: SamplerSettings | None = None) -> Plan:
    """A plan that installs ``layout`` (pool layers + SDTMs), every other cell ``full``, made for the
    network the layout runs on (``layout.weights``, else ``adapter``) and ``settings`` (default: the
    one-step target fine-tuning uses)."""
    if settings is None:
        target = PlanTarget(adapter.model_id, adapter.weights_hash, adapter.num_layers, adapter.num_tokens, "train", 1, 1.0)
    else:
        network = load_sparse_network(adapter, layout.weights) if layout.weights else adapter
        target = plan_target(network, settings)
    row = tuple(["pool"] * layout.pool_layers + ["full"] * (adapter.num_layers - layout.pool_layers))
    return Plan(target=target, grid=(row,) * target.num_steps, sparse=layout.to_dict())



def finetune_sparse(
    teacher: ModelAdapter,
    layout: SparseLayout,
    run_dir: str | Path,
    config: FinetuneConfig = FinetuneConfig(),
    max_minutes: float | None = None,
    data_npz: str | Path | None = None,
) -> int:
    """Distil ``layout`` from ``teacher`` (a DiT adapter on the digits) in ``run_dir``; return the step reached."""
    if not isinstance(teacher, DiTAdapter):
        raise UserError("finetune-sparse distils class-conditional DiT models on the embedded digits; "
                        "this model is not one")
    layout.validate(teacher.num_layers, teacher.num_tokens)
    if not 0.0 <= config.r_min <= config.r_max < 1.0:
        raise UserError(f"rates r_min={config.r_min}, r_max={config.r_max} must satisfy 0 ≤ r_min ≤ r_max < 1")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = next(teacher.transformer.parameters()).device
    torch.manual_seed(config.seed)
    images, labels = load_digits("train", data_npz, teacher.latent_size)
    images, labels = images.to(device), labels.to(device)
    noise_schedule = DDPMScheduler.from_config(teacher.scheduler_config)

    student = copy.deepcopy(teacher.transformer).requires_grad_(True)  # eval mode: labels are dropped by us
    merges = new_merges(len(layout.modules), teacher.hidden_dim).to(device)
    params = [*student.parameters(), *merges.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    step, elapsed = 0, 0.0  # elapsed: seconds spent in earlier sessions of this run
    ckpt = run_dir / CHECKPOINT_NAME
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["layout"] != layout.to_dict() or state["config"] != asdict(config):
            raise UserError(f"{ckpt} belongs to another layout or configuration; use another run directory")
        student.load_state_dict(state["student"])
        merges.load_state_dict(state["merges"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
        step, elapsed = state["step"], state["elapsed_s"]

    def save() -> None:
        atomic_save({"student": student.state_dict(), "merges": merges.state_dict(), "optimizer": optimizer.state_dict(),
                      "lr_schedule": lr_schedule.state_dict(), "generator": generator.get_state(), "step": step,
                      "elapsed_s": elapsed + time.monotonic() - started, "device": str(device),
                      "layout": layout.to_dict(), "config": asdict(config)}, ckpt)

    plan = layout_plan(teacher, layout)
    runtime = apply_plan(student, plan, merges=merges)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    null_class = teacher.num_classes
    started = time.monotonic()
    loss = torch.zeros(())
    try:
        with step_context(StepContext(step=0, num_steps=1, cfg=False)), \
                progress_bar(total=config.steps, description=f"fine-tuning {layout.name}", completed=step) as bar:
            while step < config.steps:
                n = config.batch_size
                idx = torch.randint(0, len(images), (n,), device=device, generator=generator)
                x0, y = images[idx], labels[idx]
                # 10 % null labels, as in the base model's training: the student must serve CFG
                drop = torch.rand(n, device=device, generator=generator) < 0.1
                y = torch.where(drop, torch.full_like(y, null_class), y)
                t = torch.randint(0, noise_schedule.config.num_train_timesteps, (n,), device=device, generator=generator)
                noise = torch.randn(x0.shape, device=device, generator=generator)
                xt = noise_schedule.add_noise(x0, noise, t)
                rate = config.r_min + (config.r_max - config.r_min) * torch.rand((), generator=generator, device=device).item()
                with torch.no_grad(), autocast:
                    target = teacher.transformer(xt, timestep=t, class_labels=y).sample.float()
                with runtime.sparse.rate(rate), autocast:  # type: ignore[union-attr]
                    pred = student(xt, timestep=t, class_labels=y).sample.float()
                loss = F.mse_loss(pred, target)
                optimiser_step(loss, optimizer, params, lr_schedule)
                step += 1
                bar.update(1, loss=f"{loss.item():.5f}" if step % 20 == 0 else None)
                if checkpoint_and_stop(step, config.steps, config.save_every, started, max_minutes, save):
                    break
    finally:
        remove_plan(student)
    if not torch.isfinite(loss):
        raise RuntimeError(f"fine-tuning diverged at step {step} (loss {loss.item()})")
    return step


def export_sparse(teacher: ModelAdapter, base_folder: Path, layout: SparseLayout, run_dir: str | Path,
                  dest: str | Path | None = None, storage_dtype: torch.dtype = torch.float32) -> Path:
    """Write the fine-tuned network of ``run_dir`` as a model folder (default ``<base>/sparse/<name>``), its
    transformer's weights in ``storage_dtype`` (the hash is that of the weights as stored)."""
    state = torch.load(Path(run_dir) / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    dest = Path(dest) if dest is not None else base_folder / "sparse" / layout.name
    student = copy.deepcopy(teacher.transformer).cpu()
    student.load_state_dict(state["student"])
    student.to(storage_dtype).float()  # the network plans will load: rounded to the storage dtype
    merges = new_merges(len(layout.modules), teacher.hidden_dim)
    merges.load_state_dict(state["merges"])
    info = {
        "layout": {**layout.to_dict(), "curve": None, "weights": None},
        "rate_range": [state["config"]["r_min"], state["config"]["r_max"]],
        "base_weights_hash": teacher.weights_hash,
        "weights_hash": network_hash(student, merges),
        "fine_tuning": {**state["config"], "steps_done": state["step"], "device": state["device"],
                        "minutes": round(state["elapsed_s"] / 60, 1)},
    }
    with atomic_folder(dest) as tmp:
        student.to(storage_dtype).save_pretrained(tmp / "transformer", safe_serialization=True)
        shutil.copytree(base_folder / "scheduler", tmp / "scheduler")
        save_file({k: v.contiguous() for k, v in state["merges"].items()}, tmp / MERGES_FILE)
        (tmp / LAYOUT_FILE).write_text(yaml.safe_dump(info, sort_keys=False))
    return dest
