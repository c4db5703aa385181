from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditplan.spec import load_spec

DATA = Path(__file__).parent / "data"
RAY = str(Path(sys.executable).parent / "ray")
# NOTE: loopback test cluster; Ray's token auth would need the token propagated to every node.
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_spec():
    return load_spec(DATA / "tiny-dit.yaml")


@pytest.fixture()
def tiny_adapter(tiny_spec):
    from ditplan.models.adapters import adapter_from_spec

    return adapter_from_spec(tiny_spec.model)


def tiny_vae():
    """A tiny random VAE (3-channel images, 4 latent channels, 2× downsampling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16)


def save_tiny_dit_pipeline(folder: Path) -> Path:
    """A latent DiT pipeline (16 tokens, 1000 classes as DiTPipeline assumes, the tiny VAE) saved like a hub
    model into ``folder``."""
    from diffusers import DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                        num_attention_heads=2, attention_head_dim=8, num_embeds_ada_norm=1000)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory) -> Path:
    """The tiny latent DiT pipeline folder (see :func:`save_tiny_dit_pipeline`)."""
    return save_tiny_dit_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-dit")


@pytest.fixture(scope="session")
def embedded_adapter():
    from ditplan.models.adapters import load_adapter

    return load_adapter("dit", "embedded")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance per test module (2 CPUs, no dashboard); workers can import tests.*."""
    import ray

    from ditplan.plansearch.ray_tasks import ray_init_options

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, **ray_init_options())
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def loopback_cluster():
    """A Ray head (1 CPU, 2 logical GPUs) plus a second node (1 CPU) on loopback; yields its address."""
    port = free_port()
    head = [RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=2", "--include-dashboard=false"]
    try:
        for command in (head, [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"]):
            started = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, f"{' '.join(command[1:])} failed: {started.stderr[-2000:]}"
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)
