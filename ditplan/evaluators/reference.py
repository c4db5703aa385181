"""The dense reference samples of a workload, computed once and cached on disk by content hash.

The key covers the model weights, the sampler settings and the workload (conditions and seeds), so
a changed experiment never reads a stale reference and an unchanged one never recomputes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ditplan.atomic import atomic_write
from ditplan.models.family import ModelAdapter
from ditplan.models.sampling import sample
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import get_runtime


def reference_key(adapter: ModelAdapter, settings: SamplerSettings, conditions: Sequence[Any], seeds: Sequence[int]) -> str:
    description = {
        "weights": adapter.weights_hash,
        "schedule": adapter.scheduler_config,
        "settings": [settings.scheduler, settings.num_steps, settings.guidance_scale,
                     *([settings.true_cfg_scale] if settings.true_cfg_scale != 1.0 else [])],
        "conditions": [str(c) for c in conditions],
        "seeds": [int(s) for s in seeds],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:20]


def dense_reference(
    adapter: ModelAdapter,
    settings: SamplerSettings,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    cache_dir: str | Path,
    show_progress: bool = False,
) -> torch.Tensor:
    """Dense samples (N, C, H, W) of the workload: read from ``cache_dir`` or sampled and stored."""
    if get_runtime(adapter.transformer) is not None:
        raise RuntimeError("the dense reference needs the model without a plan; remove_plan(transformer) first")
    path = Path(cache_dir) / f"dense-{reference_key(adapter, settings, conditions, seeds)}.safetensors"
    if path.exists():
        return load_file(str(path))["samples"]
    samples = sample(adapter, conditions, seeds, settings, show_progress=show_progress)
    atomic_write(path, lambda tmp: save_file({"samples": samples.contiguous()}, str(tmp)))
    return samples
