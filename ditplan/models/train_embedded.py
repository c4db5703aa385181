"""Train the embedded digit DiT: v-prediction, min-SNR-5 weighting, warm-up + cosine LR, EMA.

Training checkpoints every ``save_every`` steps (atomically: temporary file, then ``os.replace``) and
resumes from the last checkpoint, because a process can be stopped mid-training. ``export`` writes the EMA
weights and the noise schedule in diffusers' ``save_pretrained`` layout.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from ditplan.atomic import atomic_folder, atomic_write_text
from ditplan.models import training
from ditplan.models.embedded import (
    embedded_model,
    new_embedded_scheduler,
    new_embedded_transformer,
)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig(training.LoopConfig):
    """How the embedded model is trained (the loop: :class:`~ditplan.models.training.LoopConfig`; a batch of 64
    costs ≈ 1.1 s a step on 2 CPU cores).

    min_snr_gamma: min-SNR loss weighting; lower values flatten the weight of easy (low-noise) steps.
    ema_decay: final EMA decay; EMA warms up (decay grows with the step) so early weights fade fast.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"steps": 20_000, "batch_size": 128, "lr": 1e-3, "warmup_steps": 200,
                                          "save_every": 500}
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999


def train_embedded(
    run_dir: str | Path,
    config: TrainConfig | None = None,
    device: str = "cpu",
    max_minutes: float | None = None,
    data_npz: str | Path | None = None,
    model_name: str = "embedded",
) -> int:
    """Train (or resume) the embedded model ``model_name`` in ``run_dir``; return the step reached. Stops
    early after ``max_minutes``. On CUDA the forward and backward passes run in bfloat16 autocast. ``config``:
    default ``TrainConfig.make()``."""
    config = config or TrainConfig.make()
    run = _TrainingRun(run_dir, config, device, data_npz, model_name)
    step, loss = training.train_loop(run.train_step, run.save, config, run.resume(), description="training",
                                     started=time.monotonic(), max_minutes=max_minutes, log_every=50, loss_format=".4f")
    training.check_finite(loss, step, "training")
    return step


class _TrainingRun:
    """One training run of the embedded model: its data, network, noise schedule, optimiser, EMA and
    generator, and its checkpoint."""

    def __init__(self, run_dir: str | Path, config: TrainConfig, device: str, data_npz: str | Path | None,
                 model_name: str) -> None:
        """Seed the global RNG, then load the digits and build the run's parts (the model from that RNG)."""
        self.config, self.device = config, device
        run_dir, self.images, self.labels = training.start_run(run_dir, config.seed, data_npz,
                                                               embedded_model(model_name).image_size, device)
        self.ckpt_path = run_dir / CHECKPOINT_NAME
        self.autocast = training.bf16_autocast(device)
        self.model = new_embedded_transformer(model_name).to(device).train()
        self.scheduler = new_embedded_scheduler()
        self.loss_weight = _min_snr_weight(self.scheduler.alphas_cumprod.to(device), config.min_snr_gamma)  # (T,)
        self.optimizer, self.lr_schedule = training.new_optimiser(self.model.parameters(), config, betas=(0.9, 0.99))
        self.ema = EMAModel(self.model.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=3 / 4)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)

    def resume(self) -> int:
        """Load the run's checkpoint when there is one; the step it reached, else 0."""
        if not self.ckpt_path.exists():
            return 0
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        training.load_states(state, model=self.model, optimizer=self.optimizer, lr_schedule=self.lr_schedule,
                             ema=self.ema)
        self.ema.to(self.device)
        training.restore_generator(self.generator, state["generator"], self.device)
        # NOTE: label dropout draws from the global RNG, so it is restored too (exact resume).
        if "cpu_rng" in state:
            torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.device(self.device).type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        return state["step"]

    def save(self, step: int) -> None:
        """Checkpoint the run at ``step``, with the global RNGs."""
        rng = {"cpu_rng": torch.get_rng_state()}
        if torch.device(self.device).type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        parts = training.state_dicts(model=self.model, optimizer=self.optimizer, lr_schedule=self.lr_schedule,
                                     ema=self.ema)
        training.atomic_save({**rng, **parts, "generator": self.generator.get_state(), "step": step,
                              "config": asdict(self.config)}, self.ckpt_path)

    def train_step(self) -> torch.Tensor:
        """One optimiser step and EMA update on a random batch of noised digits; returns its loss."""
        config, device, generator = self.config, self.device, self.generator
        idx = torch.randint(0, len(self.images), (config.batch_size,), device=device, generator=generator)
        x0, y = self.images[idx], self.labels[idx]  # (B, 1, S, S), (B,)
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, num_train_timesteps, (config.batch_size,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        xt = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t)
        # Label dropout for classifier-free guidance happens inside diffusers' LabelEmbedding in
        # train mode (10% of labels become the null class).
        with self.autocast:
            pred = self.model(xt, timestep=t, class_labels=y).sample.float()
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * self.loss_weight[t]).mean()
        training.optimiser_step(loss, self.optimizer, self.model.parameters(), self.lr_schedule)
        self.ema.step(self.model.parameters())
        return loss


def _min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """The loss weight of each timestep (T,) for v-prediction with min-SNR-γ: min(snr, γ) / (snr + 1)."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=gamma) / (snr + 1)


def export_embedded(run_dir: str | Path, dest: str | Path, model_name: str = "embedded") -> Path:
    """Write the EMA weights of ``run_dir``'s checkpoint (in the model's storage dtype) + the noise schedule
    in diffusers layout."""
    run_dir, dest = Path(run_dir), Path(dest)
    state = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    model = new_embedded_transformer(model_name)
    model.load_state_dict(state["model"])
    ema = EMAModel(model.parameters())
    ema.load_state_dict(state["ema"])
    ema.copy_to(model.parameters())
    # each part replaced whole (the folder also holds the digit classifier and fine-tuned networks)
    with atomic_folder(dest / "transformer") as tmp:
        model.to(embedded_model(model_name).storage_dtype).save_pretrained(tmp, safe_serialization=True)
    with atomic_folder(dest / "scheduler") as tmp:
        new_embedded_scheduler().save_pretrained(tmp)
    atomic_write_text(dest / "training.txt",
                      f"trained_steps: {state['step']}\n" + "".join(f"{k}: {v}\n" for k, v in state["config"].items()))
    return dest
