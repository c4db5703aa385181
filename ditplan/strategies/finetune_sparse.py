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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from ditplan.atomic import atomic_folder
from ditplan.errors import UserError
from ditplan.models import training
from ditplan.models.context import StepContext, step_context
from ditplan.models.families.dit import DiTAdapter
from ditplan.models.family import ModelAdapter
from ditplan.models.identity import network_hash
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanTarget
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import PlanRuntime, apply_plan, remove_plan
from ditplan.strategies.sdtm import SparseLayout
from ditplan.strategies.sparse_network import (
    LAYOUT_FILE,
    MERGES_FILE,
    load_sparse_network,
    new_merges,
)

CHECKPOINT_NAME = "finetune.pt"


@dataclass(frozen=True)
class FinetuneConfig(training.LoopConfig):
    """How a SparseDiT layout is distilled (the loop: :class:`~ditplan.models.training.LoopConfig`; a batch of 64
    costs about 1 s a step on 2 CPU cores for the embedded model with one SDTM; the learning rate is low, as the
    student starts as the teacher).

    r_min, r_max: the pruning rates drawn per batch; plans may use any curve inside this range.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"steps": 1200, "batch_size": 64, "lr": 2e-4, "warmup_steps": 50,
                                          "save_every": 100}
    r_min: float = 0.5
    r_max: float = 0.875


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
    config: FinetuneConfig | None = None,
    max_minutes: float | None = None,
    data_npz: str | Path | None = None,
) -> int:
    """Distil ``layout`` from ``teacher`` (a DiT adapter on the digits) in ``run_dir``; return the step reached.
    ``config``: default ``FinetuneConfig.make()``."""
    config = config or FinetuneConfig.make()
    _check_request(teacher, layout, config)
    distillation = _Distillation(teacher, layout, run_dir, config, data_npz)
    step, loss = distillation.train(distillation.resume(), max_minutes)
    training.check_finite(loss, step, "fine-tuning")
    return step


def _check_request(teacher: ModelAdapter, layout: SparseLayout, config: FinetuneConfig) -> None:
    """Refuse a teacher that is not a DiT, a layout that does not fit it, or rates outside [0, 1)."""
    if not isinstance(teacher, DiTAdapter):
        raise UserError("finetune-sparse distils class-conditional DiT models on the embedded digits; "
                        "this model is not one")
    layout.validate(teacher.num_layers, teacher.num_tokens)
    if not 0.0 <= config.r_min <= config.r_max < 1.0:
        raise UserError(f"rates r_min={config.r_min}, r_max={config.r_max} must satisfy 0 ≤ r_min ≤ r_max < 1")


class _Distillation:
    """One fine-tuning run: the teacher, the student (a copy of it) with the layout's merges, their optimiser,
    the data, the generator and the checkpoint."""

    def __init__(self, teacher: DiTAdapter, layout: SparseLayout, run_dir: str | Path, config: FinetuneConfig,
                 data_npz: str | Path | None) -> None:
        """Seed the global RNG, then load the digits and build the run's parts (the merges from that RNG)."""
        self.teacher, self.layout, self.config = teacher, layout, config
        self.device = device = next(teacher.transformer.parameters()).device
        run_dir, self.images, self.labels = training.start_run(run_dir, config.seed, data_npz, teacher.latent_size,
                                                               device)
        self.ckpt = run_dir / CHECKPOINT_NAME
        self.noise_schedule = teacher.scheduler_class.from_config(teacher.scheduler_config)
        self.student = copy.deepcopy(teacher.transformer).requires_grad_(True)  # eval mode: labels are dropped by us
        self.merges = new_merges(len(layout.modules), teacher.hidden_dim).to(device)
        self.params = [*self.student.parameters(), *self.merges.parameters()]
        self.optimizer, self.lr_schedule = training.new_optimiser(self.params, config)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.autocast = training.bf16_autocast(device)
        self.elapsed = 0.0  # seconds spent in earlier processes of this run (before a resume)
        self.started = 0.0  # time.monotonic() when this process's steps began (set by train)

    def resume(self) -> int:
        """Load the run's checkpoint when there is one (refusing one of another layout or configuration);
        the step it reached, else 0."""
        if not self.ckpt.exists():
            return 0
        state = torch.load(self.ckpt, map_location=self.device, weights_only=True)
        if state["layout"] != self.layout.to_dict() or state["config"] != asdict(self.config):
            raise UserError(f"{self.ckpt} belongs to another layout or configuration; use another run directory")
        training.load_states(state, student=self.student, merges=self.merges, optimizer=self.optimizer,
                             lr_schedule=self.lr_schedule)
        training.restore_generator(self.generator, state["generator"], self.device)
        self.elapsed = state["elapsed_s"]
        return state["step"]

    def save(self, step: int) -> None:
        """Checkpoint the run at ``step``, with the time it has taken in all processes."""
        parts = training.state_dicts(student=self.student, merges=self.merges, optimizer=self.optimizer,
                                     lr_schedule=self.lr_schedule)
        training.atomic_save({**parts, "generator": self.generator.get_state(), "step": step,
                              "elapsed_s": self.elapsed + time.monotonic() - self.started, "device": str(self.device),
                              "layout": self.layout.to_dict(), "config": asdict(self.config)}, self.ckpt)

    def train(self, step: int, max_minutes: float | None) -> tuple[int, torch.Tensor | None]:
        """Run the steps from ``step`` with the layout installed on the student (removed again after); the step
        reached and the last loss."""
        runtime = apply_plan(self.student, layout_plan(self.teacher, self.layout), merges=self.merges)
        self.started = time.monotonic()
        try:
            with step_context(StepContext(step=0, num_steps=1, cfg=False)):
                return training.train_loop(lambda: self.train_step(runtime), self.save, self.config, step,
                                           description=f"fine-tuning {self.layout.name}", started=self.started,
                                           max_minutes=max_minutes, log_every=20, loss_format=".5f")
        finally:
            remove_plan(self.student)

    def train_step(self, runtime: PlanRuntime) -> torch.Tensor:
        """One optimiser step: on a batch of noised digits, the student at a pruning rate drawn from
        ``[r_min, r_max]`` learns the teacher's prediction; returns the loss."""
        xt, t, y = self.noised_batch()
        r_min, r_max = self.config.r_min, self.config.r_max
        rate = r_min + (r_max - r_min) * torch.rand((), generator=self.generator, device=self.device).item()
        with torch.no_grad(), self.autocast:
            target = self.teacher.transformer(xt, timestep=t, class_labels=y).sample.float()
        with runtime.sparse.rate(rate), self.autocast:  # type: ignore[union-attr]
            pred = self.student(xt, timestep=t, class_labels=y).sample.float()
        loss = F.mse_loss(pred, target)
        training.optimiser_step(loss, self.optimizer, self.params, self.lr_schedule)
        return loss

    def noised_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A random batch of training digits, noised at random timesteps: ``(xt, t, labels)``."""
        n, device, generator = self.config.batch_size, self.device, self.generator
        idx = torch.randint(0, len(self.images), (n,), device=device, generator=generator)
        x0, y = self.images[idx], self.labels[idx]
        # 10 % null labels, as in the base model's training: the student must serve CFG
        drop = torch.rand(n, device=device, generator=generator) < 0.1
        y = torch.where(drop, torch.full_like(y, self.teacher.num_classes), y)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (n,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        return self.noise_schedule.add_noise(x0, noise, t), t, y


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
