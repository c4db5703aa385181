"""Train the embedded digit DiT: v-prediction, min-SNR-5 weighting, warm-up + cosine LR, EMA.

Training checkpoints every ``save_every`` steps (atomically: temporary file, then ``os.replace``) and
resumes from the last checkpoint, because a session can end mid-training. ``export`` writes the EMA
weights and the noise schedule in diffusers' ``save_pretrained`` layout.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from ditplan.atomic import atomic_folder, atomic_write_text
from ditplan.models.digits import load_digits
from ditplan.models.embedded import embedded_model, new_embedded_scheduler, new_embedded_transformer
from ditplan.models.training import atomic_save, checkpoint_and_stop, optimiser_step
from ditplan.progress import progress_bar

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """How the embedded model is trained.

    steps: total optimiser steps of the whole run (a resumed run continues towards this number).
    batch_size: digits per step; 64 costs ≈ 1.1 s a step on 2 CPU cores.
    lr: peak AdamW learning rate, reached after ``warmup_steps`` and decayed to 0 on a cosine.
    min_snr_gamma: min-SNR loss weighting; lower values flatten the weight of easy (low-noise) steps.
    ema_decay: final EMA decay; EMA warms up (decay grows with the step) so early weights fade fast.
    save_every: steps between checkpoints.
    seed: seeds initialisation, batches and noise.
    """

    steps: int = 20_000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 200
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    save_every: int = 500
    seed: int = 0



def train_embedded(
    run_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    device: str = "cpu",
    max_minutes: float | None = None,
    data_npz: str | Path | None = None,
    model_name: str = "embedded",
) -> int:
    """Train (or resume) the embedded model ``model_name`` in ``run_dir``; return the step reached. Stops
    early after ``max_minutes``. On CUDA the forward and backward passes run in bfloat16 autocast."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    images, labels = load_digits("train", data_npz, embedded_model(model_name).image_size)
    images, labels = images.to(device), labels.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")

    model = new_embedded_transformer(model_name).to(device).train()
    scheduler = new_embedded_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)  # (T,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    # v-prediction with min-SNR-γ: weight = min(snr, γ) / (snr + 1)
    loss_weight = torch.clamp(snr, max=config.min_snr_gamma) / (snr + 1)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=3 / 4)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    step = 0

    ckpt_path = run_dir / CHECKPOINT_NAME
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        ema.load_state_dict(state["ema"])
        ema.to(device)
        generator.set_state(state["generator"].cpu() if device == "cpu" else state["generator"])
        # NOTE: label dropout draws from the global RNG, so it is restored too (exact resume).
        if "cpu_rng" in state:
            torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.device(device).type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        step = state["step"]

    def save() -> None:
        rng = {"cpu_rng": torch.get_rng_state()}
        if torch.device(device).type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        atomic_save(
            {
                **rng,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(),
                "ema": ema.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "config": asdict(config),
            },
            ckpt_path,
        )

    started = time.monotonic()
    num_train_timesteps = scheduler.config.num_train_timesteps
    with progress_bar(total=config.steps, description="training", completed=step) as bar:
        while step < config.steps:
            idx = torch.randint(0, len(images), (config.batch_size,), device=device, generator=generator)
            x0, y = images[idx], labels[idx]  # (B, 1, S, S), (B,)
            t = torch.randint(0, num_train_timesteps, (config.batch_size,), device=device, generator=generator)
            noise = torch.randn(x0.shape, device=device, generator=generator)
            xt = scheduler.add_noise(x0, noise, t)
            target = scheduler.get_velocity(x0, noise, t)
            # Label dropout for classifier-free guidance happens inside diffusers' LabelEmbedding in
            # train mode (10% of labels become the null class).
            with autocast:
                pred = model(xt, timestep=t, class_labels=y).sample.float()
            per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * loss_weight[t]).mean()
            optimiser_step(loss, optimizer, model.parameters(), lr_schedule)
            ema.step(model.parameters())
            step += 1
            bar.update(1, loss=f"{loss.item():.4f}" if step % 50 == 0 else None)
            if checkpoint_and_stop(step, config.steps, config.save_every, started, max_minutes, save):
                break
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"training diverged at step {step} (loss {loss.item()})")
    return step


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
