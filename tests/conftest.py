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


@pytest.fixture(scope="session")
def embedded_adapter():
    from ditplan.models.adapters import load_adapter

    return load_adapter("dit", "embedded")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance per test module (2 CPUs, no dashboard); workers can import tests.*."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd(), "RAY_USAGE_STATS_ENABLED": "0"}})
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
