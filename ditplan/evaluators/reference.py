"""The dense reference samples of a workload, computed once and cached on disk by content hash; so are the
config values of diffusers' caches measured on a dense run (MagCache's magnitude ratios).

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

from ditplan.atomic import atomic_write, atomic_write_text
from ditplan.models.family import ModelAdapter
from ditplan.models.sampling import sample
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import get_runtime
from ditplan.strategies.diffusers_cache import CACHE_METHODS, calibrated_config


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
    _check_no_plan(adapter, "the dense reference")
    path = Path(cache_dir) / f"dense-{reference_key(adapter, settings, conditions, seeds)}.safetensors"
    if path.exists():
        return load_file(str(path))["samples"]
    samples = sample(adapter, conditions, seeds, settings, show_progress=show_progress)
    atomic_write(path, lambda tmp: save_file({"samples": samples.contiguous()}, str(tmp)))
    return samples


def cached_calibration(
    method: str,
    adapter: ModelAdapter,
    settings: SamplerSettings,
    conditions: Sequence[Any],
    seeds: Sequence[int],
    cache_dir: str | Path,
) -> dict[str, Any]:
    """The config fields of diffusers' cache ``method`` measured on the model
    (:func:`~ditplan.strategies.diffusers_cache.calibrated_config`) on this workload: read from ``cache_dir`` or
    measured and stored; {} for a cache that needs none."""
    if not CACHE_METHODS[method].calibrated:
        return {}
    _check_no_plan(adapter, f"calibrating diffusers' {method!r} cache")
    path = Path(cache_dir) / f"calibration-{method}-{reference_key(adapter, settings, conditions, seeds)}.json"
    if path.exists():
        return json.loads(path.read_text())
    config = calibrated_config(method, adapter, settings, conditions, seeds)
    atomic_write_text(path, json.dumps(config))
    return config


def _check_no_plan(adapter: ModelAdapter, what: str) -> None:
    if get_runtime(adapter.transformer) is not None:
        raise RuntimeError(f"{what} needs the model without a plan; remove_plan(transformer) first")
