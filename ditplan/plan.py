"""The Plan: which strategy each self-attention layer uses at each denoising step, plus the
strategies' parameters, what the plan was made for, and how it was found.

Plan files are YAML (read with a safe loader only: ``ditplan.files.read_yaml``). The step × layer grid is stored
run-length encoded, one line per layer, e.g. ``"full:2 ast:3 wars:15"``.
"""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ditplan.atomic import atomic_write_text
from ditplan.errors import UserError
from ditplan.files import read_yaml
from ditplan.models.identity import DTYPES, HALF_DTYPES, Binding, binding, warn_cast
from ditplan.registry import did_you_mean

SCHEMA_VERSION = 1


class PlanError(UserError):
    """A plan file is malformed, or does not fit the model/sampler it is applied to."""


@dataclass(frozen=True)
class PlanTarget:
    """What a plan was made for; a plan applied elsewhere is refused (see :meth:`Plan.check_fits`).

    ``dtype``: what the weights computed in when the plan was measured; ``cast_hashes``: their hash cast to
    each other half-precision dtype, so that the same weights in that dtype take the plan (see
    :func:`ditplan.models.identity.binding`). Plans written before these were recorded have neither.
    ``schedule``: the normalised time (timestep / training timesteps, 1 = noise) of each of its steps, by which it
    is re-targeted to another step count (:mod:`ditplan.strategies.retarget`); empty in older plans."""

    model: str
    weights_hash: str
    num_layers: int
    num_tokens: int
    scheduler: str
    num_steps: int
    guidance_scale: float
    dtype: str | None = None
    cast_hashes: Mapping[str, str] = field(default_factory=dict, hash=False)
    true_cfg_scale: float = 1.0  # CFG on top of a guidance-distilled model (FLUX.1's true CFG); 1: none
    schedule: tuple[float, ...] = ()

    def differences(self, other: PlanTarget) -> list[str]:
        """Human-readable mismatches, ignoring the model id and the dtype (the weights decide identity)."""
        names = {
            "num_layers": "layers",
            "num_tokens": "tokens",
            "scheduler": "scheduler",
            "num_steps": "steps",
            "guidance_scale": "guidance scale",
            "true_cfg_scale": "true CFG scale",
        }
        found = []
        for key, label in names.items():
            if getattr(self, key) != getattr(other, key):
                hint = f" (ditplan retarget PLAN --steps {other.num_steps} re-targets it)" if key == "num_steps" else ""
                found.append(f"{label}: plan has {getattr(self, key)!r}, target has {getattr(other, key)!r}{hint}")
        if binding(self, other) is Binding.OTHER:
            found.insert(0, f"model weights (hash): plan has {self.weights_hash!r}, target has {other.weights_hash!r}")
        return found

    def to_dict(self) -> dict[str, Any]:
        """The target as a plan file holds it; one without a dtype (an older plan's) as it was written."""
        data = {key: value for key, value in self.__dict__.items()
                if key not in ("dtype", "cast_hashes", "true_cfg_scale", "schedule")}
        if self.true_cfg_scale != 1.0:
            data["true_cfg_scale"] = self.true_cfg_scale
        if self.schedule:
            data["schedule"] = list(self.schedule)
        if self.dtype is not None:
            data.update(dtype=self.dtype, cast_hashes=dict(self.cast_hashes))
        return data


def encode_runs(row: Sequence[str]) -> str:
    """``["full", "full", "ast"]`` → ``"full:2 ast:1"``."""
    runs: list[list[Any]] = []
    for name in row:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return " ".join(f"{name}:{count}" for name, count in runs)


def decode_runs(text: str, max_length: int | None = None, what: str = "plan grid line") -> list[str]:
    """The row a run-length line encodes; a row longer than ``max_length`` is refused before it is built."""
    if not isinstance(text, str):
        raise PlanError(f"{what} {text!r} is not a string of runs NAME:COUNT, e.g. 'full:20'")
    row: list[str] = []
    for token in text.split():
        name, sep, count = token.rpartition(":")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise PlanError(f"bad run {token!r} in {what} {text[:60]!r}; write runs as NAME:COUNT, e.g. 'full:20'")
        if max_length is not None and len(row) + int(count) > max_length:
            raise PlanError(f"{what} {text[:60]!r} is longer than the {max_length} steps its target says")
        row.extend([name] * int(count))
    return row


_TARGET_TYPES = {"model": str, "weights_hash": str, "num_layers": int, "num_tokens": int, "scheduler": str,
                 "num_steps": int, "guidance_scale": (int, float)}
_DTYPE_KEYS = ("dtype", "cast_hashes")  # optional: plans written before they were recorded lack them
# true_cfg_scale: written only when FLUX.1's true CFG is on; schedule: by plans that record it
_OPTIONAL_KEYS = (*_DTYPE_KEYS, "true_cfg_scale", "schedule")
_TYPE_NAMES = {str: "string", int: "whole number"}
MAX_GRID = 10_000  # layers or steps of any plan


def _target(data: Any) -> PlanTarget:
    if not isinstance(data, dict) or not set(_TARGET_TYPES) <= set(data) <= {*_TARGET_TYPES, *_OPTIONAL_KEYS}:
        raise PlanError(f"plan target is malformed; it is a mapping of exactly {list(_TARGET_TYPES)}, plus optionally "
                        f"{', '.join(_OPTIONAL_KEYS)}")
    true_cfg = data.get("true_cfg_scale", 1.0)
    if not isinstance(true_cfg, (int, float)) or isinstance(true_cfg, bool):
        raise PlanError(f"plan target.true_cfg_scale = {true_cfg!r} is not a number")
    for key, kind in _TARGET_TYPES.items():
        value = data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise PlanError(f"plan target.{key} = {value!r} is not a {_TYPE_NAMES.get(kind, 'number')}")
    for key in ("num_layers", "num_steps"):
        if not 0 < data[key] <= MAX_GRID:
            raise PlanError(f"plan target.{key} = {data[key]} is outside 1…{MAX_GRID}")
    dtype, casts = _target_dtype(data)
    schedule = data.get("schedule", [])
    if not isinstance(schedule, list) or len(schedule) not in (0, data["num_steps"]) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 1 for t in schedule):
        raise PlanError(f"plan target.schedule is not {data['num_steps']} normalised times between 0 and 1, one per "
                        "step; drop it, or write the plan again with ditplan")
    return PlanTarget(**{key: data[key] for key in _TARGET_TYPES}, dtype=dtype, cast_hashes=casts,
                      true_cfg_scale=float(true_cfg), schedule=tuple(float(t) for t in schedule))


def _target_dtype(data: dict) -> tuple[str | None, dict[str, str]]:
    """A target's ``dtype`` and ``cast_hashes``, checked: both absent (an older plan), or the dtype the plan
    was measured in and its weights' hash cast to the other half-precision dtypes."""
    dtype, casts = data.get("dtype"), data.get("cast_hashes")
    if dtype is not None and dtype not in DTYPES:
        raise PlanError(f"plan target.dtype = {str(dtype)[:60]!r} is not one of {', '.join(DTYPES)}; write the dtype "
                        "the plan was measured in")
    if casts is None:
        return dtype, {}
    if dtype is None:
        raise PlanError("plan target.cast_hashes needs target.dtype, the dtype the plan was measured in; give both or "
                        "neither")
    others = [name for name in HALF_DTYPES if name != dtype]
    if not isinstance(casts, dict) or not all(key in others and isinstance(value, str) for key, value in casts.items()):
        raise PlanError(f"plan target.cast_hashes = {str(casts)[:60]!r} is not a mapping of {' or '.join(others)} to "
                        "a weights hash (a string)")
    return dtype, dict(casts)


def _mapping(data: dict, key: str, optional: bool = False) -> dict:
    value = data.get(key)
    if value is None:
        return None if optional else {}  # type: ignore[return-value]
    if not isinstance(value, dict):
        raise PlanError(f"plan {key} = {str(value)[:60]!r} is not a mapping")
    return value


@dataclass(frozen=True)
class Plan:
    """grid[step][layer] names a registered strategy; ``params`` maps a strategy name to its config;
    ``sparse`` is SparseDiT's global part (SDTM block ranges, pruning curve, fine-tuned weights; see
    :class:`ditplan.strategies.sdtm.SparseLayout`), or None; ``cache`` one of diffusers' caches with its
    config (see :mod:`ditplan.strategies.diffusers_cache`), or None; ``guidance`` what stands in for the
    unconditional branch of classifier-free guidance at each step, one name per step (see
    :mod:`ditplan.strategies.guidance`), or None: computed at every step."""

    target: PlanTarget
    grid: tuple[tuple[str, ...], ...]
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    sparse: Mapping[str, Any] | None = None
    cache: Mapping[str, Any] | None = None
    guidance: tuple[str, ...] | None = None

    @property
    def num_steps(self) -> int:
        return len(self.grid)

    @property
    def num_layers(self) -> int:
        return len(self.grid[0]) if self.grid else 0

    def method(self, step: int, layer: int) -> str:
        return self.grid[step][layer]

    def strategies(self) -> set[str]:
        return {name for row in self.grid for name in row}

    @classmethod
    def uniform(cls, target: PlanTarget, method: str = "full", **kwargs: Any) -> Plan:
        grid = tuple(tuple([method] * target.num_layers) for _ in range(target.num_steps))
        return cls(target=target, grid=grid, **kwargs)

    def with_provenance(self, **entries: Any) -> Plan:
        return replace(self, provenance={**copy.deepcopy(dict(self.provenance)), **entries})

    def check_fits(self, target: PlanTarget) -> None:
        """Refuse, in one line, a ``target`` the plan was not made for; the same weights in another dtype take
        it with a warning (:func:`~ditplan.models.identity.binding`)."""
        differences = self.target.differences(target)
        weights = (self.sparse or {}).get("weights")
        bound = binding(self.target, target)
        if weights and bound is Binding.OTHER:
            raise PlanError(
                f"plan runs on the fine-tuned SparseDiT network {weights!r} (weights {self.target.weights_hash}), not on "
                f"this model (weights {target.weights_hash}); load that network (ditplan.load_for_plan, or the "
                "experiment's model folder + the plan's sparse.weights), or make it with `ditplan finetune-sparse`"
            )
        if differences:
            raise PlanError(
                f"plan made for {self.target.model} does not fit this model/sampler: " + "; ".join(differences)
            )
        if bound is Binding.CAST:
            warn_cast(self.target, target)

    # --- YAML -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        columns = [[row[layer] for row in self.grid] for layer in range(self.num_layers)]
        return {
            "schema_version": SCHEMA_VERSION,
            "target": self.target.to_dict(),
            "params": copy.deepcopy({k: dict(v) for k, v in self.params.items()}),
            "sparse": copy.deepcopy(dict(self.sparse)) if self.sparse else None,
            **({"cache": copy.deepcopy(dict(self.cache))} if self.cache else {}),
            **({"guidance": encode_runs(self.guidance)} if self.guidance else {}),  # runs over steps
            "grid": [encode_runs(col) for col in columns],  # one line per layer, runs over steps
            "provenance": copy.deepcopy(dict(self.provenance)),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError("a plan file must be a YAML mapping with target, grid, params and provenance")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"plan schema_version {version!r} is not supported; this ditplan reads {SCHEMA_VERSION}")
        target = _target(data.get("target"))
        lines = data.get("grid") or []
        if not isinstance(lines, list):
            raise PlanError("plan grid is a list of lines of runs, one per layer, e.g. ['full:20', 'ast:5 full:15']")
        columns = [decode_runs(line, target.num_steps) for line in lines[: target.num_layers + 1]]
        if len(columns) != target.num_layers or any(len(c) != target.num_steps for c in columns):
            raise PlanError(
                f"plan grid is {len(columns)} layers × {[len(c) for c in columns][:1] or [0]} steps, but its target "
                f"says {target.num_layers} layers × {target.num_steps} steps"
            )
        grid = tuple(tuple(col[step] for col in columns) for step in range(target.num_steps))
        params = _mapping(data, "params")
        if not all(isinstance(v, dict) or v is None for v in params.values()):
            raise PlanError("plan params maps a strategy name to its config mapping, e.g. {wars: {window_size: 4}}")
        guidance = tuple(decode_runs(data["guidance"], target.num_steps, "plan guidance")) if data.get("guidance") is not None else None
        if guidance is not None and len(guidance) != target.num_steps:
            raise PlanError(f"plan guidance {data['guidance']!r} covers {len(guidance)} steps, but its target says "
                            f"{target.num_steps}; give one name per step, e.g. 'full:{target.num_steps}'")
        return cls(target=target, grid=grid, params=params, provenance=_mapping(data, "provenance"),
                   sparse=_mapping(data, "sparse", optional=True) or None, cache=_mapping(data, "cache", optional=True) or None,
                   guidance=guidance)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename): no half-written plan is ever left."""
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))


def load_plan(path: str | Path) -> Plan:
    """The plan in ``path``; any problem with the file is a one-line :class:`PlanError` naming it."""
    data = read_yaml(path, "plan file")
    try:
        return Plan.from_dict(data)
    except PlanError as err:
        raise PlanError(f"{path}: {err}") from None


# Plans shipped inside the package, made by the quickstart for the embedded model: ``shipped_plan("quickstart-knee")``.
SHIPPED_PLANS = Path(__file__).parent / "plans"


def shipped_plans() -> list[str]:
    """The names of the plans shipped inside the package."""
    return sorted(p.stem for p in SHIPPED_PLANS.glob("*.yaml"))


def shipped_plan(name: str) -> Plan:
    """The plan shipped inside the package under ``name``; an unknown name is one line with the closest."""
    if name not in shipped_plans():
        raise PlanError(f"no shipped plan {name!r}{did_you_mean(name, shipped_plans())}; "
                        f"shipped: {', '.join(shipped_plans())}")
    return load_plan(SHIPPED_PLANS / f"{name}.yaml")


def library_versions() -> dict[str, str]:
    """Versions recorded in a plan's provenance."""
    out = {}
    for name in ("ditplan", "torch", "diffusers", "optuna"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
