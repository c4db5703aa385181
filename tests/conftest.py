from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ditplan.spec import load_spec

DATA = Path(__file__).parent / "data"
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
