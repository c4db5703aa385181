"""Loading models: an experiment's model section, a folder or hub id, or a random config → an adapter of
its family (:mod:`ditplan.models.families`). Every model loads plain: the extra weights a strategy adds to a
network (:attr:`ModelAdapter.merges`) are that strategy's to load.

Models load through diffusers' ``from_pretrained`` (a local folder in pipeline layout or a hub id) or are
built with random weights from a config dict (tests).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ditplan.errors import UserError
from ditplan.files import check_folder
from ditplan.models.embedded import EMBEDDED_FAMILY, EMBEDDED_MODELS
from ditplan.models.families import FAMILIES
from ditplan.models.family import ModelAdapter

if TYPE_CHECKING:
    from ditplan.plan import Plan
    from ditplan.spec import ExperimentSpec, ModelSpec


def load_adapter(
    kind: str,
    source: str | None = None,
    config: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    vae: str | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **adapter_kwargs: Any,
) -> ModelAdapter:
    """Load a model: ``source`` is ``"embedded"``, a local pipeline folder or a hub id (weights under
    ``transformer/``, schedule under ``scheduler/``); or ``config`` builds random weights (seeded).
    ``dtype``: loaded in it (diffusers' ``torch_dtype``); default as stored, float32 for random weights."""
    family = FAMILIES.get_entry(kind, "model.kind")
    transformer_cls = family.transformer_class
    if config is not None:
        transformer = random_transformer(family, config, seed)
        model_id = f"random-{kind}"
        base_schedule: dict[str, Any] = family.scheduler_class().config
    elif source is not None:
        if source not in EMBEDDED_MODELS and _looks_local(source):
            check_folder(source, "model.source folder", names=list(EMBEDDED_MODELS))
        path = str(model_folder(source))
        transformer = load_transformer(transformer_cls, Path(path), dtype)
        base_schedule = _from_pretrained(family.scheduler_class.load_config, path, "scheduler", "model.source")
        model_id = source
    else:
        raise ValueError("a model needs a source (a folder, a hub id or 'embedded') or a config dict; give one")
    schedule = {**base_schedule, **(scheduler_config or {})}
    vae_model = _from_pretrained(family.vae_class.from_pretrained, vae, "vae", "model.vae", low_cpu_mem_usage=False,
                                 **_torch_dtype(dtype)) if vae else None
    return family(transformer, schedule, model_id, vae=vae_model, **adapter_kwargs)


def recorded_adapter(plan: Plan) -> ModelAdapter | None:
    """The model ``plan`` records (``target.model``) when it is on this machine: an embedded model's name or a local
    pipeline folder (for a fine-tuned SparseDiT network, the base model it lies in); None for a hub id or random
    weights (nothing is downloaded), and for a prompt-conditioned family, which its experiment's prompts and image
    size complete."""
    model_id, weights = plan.target.model, (plan.sparse or {}).get("weights")
    if weights and model_id.endswith(weights):  # the network's folder inside its base model's
        model_id = model_id[: -len(weights)].rstrip("/")
    if model_id in EMBEDDED_MODELS:
        return load_adapter(EMBEDDED_FAMILY, model_id)
    config = Path(model_id) / "transformer" / "config.json"
    if not config.is_file():
        return None
    class_name = json.loads(config.read_text()).get("_class_name")
    kind = next((k for k, family in FAMILIES.items() if family.transformer_class.__name__ == class_name
                 and family.conditioning_kind == "classes"), None)
    return load_adapter(kind, model_id) if kind else None


def model_folder(source: str) -> Path:
    """The local folder of a model source (an embedded model's name is the package's own folder)."""
    return EMBEDDED_MODELS[source].folder if source in EMBEDDED_MODELS else Path(source)


MAX_RANDOM_PARAMETERS = 20_000_000_000  # beyond any DiT or PixArt: a typo, not a model
MAX_TOKENS = 1 << 16  # PixArt 4K at patch 2 has 65,536 tokens


def random_transformer(family: type[ModelAdapter], config: dict[str, Any], seed: int) -> torch.nn.Module:
    """A transformer of ``family`` with random (seeded) weights built from ``config`` (``model.config``), once the
    config is known to name the class's own arguments and to fit in memory."""
    transformer_cls = family.transformer_class
    import inspect

    known = set(inspect.signature(transformer_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"model.config: {transformer_cls.__name__} has no argument {unknown[0]!r}; "
                        f"it takes {', '.join(sorted(known))}")
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UserError(f"model.config.{key} = {value}: sizes and counts must be positive")
    defaults = {k: p.default for k, p in inspect.signature(transformer_cls.__init__).parameters.items()}
    try:
        parameters, tokens = family.estimate_size({**defaults, **config})
    except (TypeError, ValueError, KeyError):
        raise UserError("model.config: its sizes (heads, head width, layers, sample and patch size) must be whole "
                        "numbers") from None
    if parameters > MAX_RANDOM_PARAMETERS or tokens > MAX_TOKENS:
        raise UserError(f"model.config describes a transformer of about {parameters:.3g} parameters and {tokens:,} "
                        f"tokens; at most {MAX_RANDOM_PARAMETERS:.3g} and {MAX_TOKENS:,}")
    torch.manual_seed(seed)
    try:
        return transformer_cls(**config)
    except (TypeError, ValueError, RuntimeError, AttributeError, ZeroDivisionError) as err:
        raise UserError(f"model.config does not build a {transformer_cls.__name__}: {' '.join(str(err).split())}") from None


def _looks_local(source: str) -> bool:
    """Whether a model source is meant as a local folder: it exists, or it is written as a path (a hub id
    is ``owner/name``)."""
    return Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") != 1


def _from_pretrained(load: Any, source: str, subfolder: str, field: str, **kwargs: Any) -> Any:
    """``load(source, subfolder=...)``; a folder that is missing or incomplete, or a hub id that cannot be
    fetched, is a one-line :class:`UserError` naming ``field``."""
    if _looks_local(source) and source not in EMBEDDED_MODELS:
        folder = check_folder(source, f"{field} folder")
        if not (folder / subfolder).is_dir():
            raise UserError(f"{field} folder {folder} has no {subfolder}/ subfolder; give a model folder in diffusers "
                            "pipeline layout (save_pretrained)")
    try:
        return load(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{field} {source!r}: cannot load its {subfolder}/ (not a complete local folder, and not on a "
                        f"reachable hub): {first.strip()}") from None


def load_transformer(transformer_cls: type[torch.nn.Module], folder: Path, dtype: torch.dtype | None = None
                     ) -> torch.nn.Module:
    """The transformer of a model folder in diffusers layout (``<folder>/transformer``), in ``dtype``."""
    # NOTE: low_cpu_mem_usage needs accelerate (not a dependency); without it diffusers warns each load
    return _from_pretrained(transformer_cls.from_pretrained, str(folder), "transformer", "model.source",
                            low_cpu_mem_usage=False, **_torch_dtype(dtype))


def _torch_dtype(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: none keeps diffusers' default (float32)."""
    return {} if dtype is None else {"torch_dtype": dtype}


def adapter_from_spec(spec: ModelSpec, conditions: Sequence[Any] = ()) -> ModelAdapter:
    """Load the model an experiment file describes, on its device; ``conditions`` (every class label or
    prompt the workload draws) are checked against it."""
    kwargs = FAMILIES.get_entry(spec.kind, "model.kind").load_kwargs(spec, conditions)
    dtype = spec.torch_dtype()
    adapter = load_adapter(spec.kind, spec.source, spec.config, vae=spec.vae, seed=spec.seed,
                           dtype=None if spec.config is not None else dtype, **kwargs)
    adapter.check_conditions(conditions)
    return adapter.to(spec.torch_device(), dtype)


_LOADED: dict[str, ModelAdapter] = {}


def experiment_adapter(spec: ExperimentSpec) -> ModelAdapter:
    """The experiment's model, loaded once per process (a Ray worker keeps it between trials), checked
    against the classes its workload draws."""
    key = json.dumps(spec.model.model_dump(), sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = adapter_from_spec(spec.model, spec.workload.all_conditions())
    _LOADED[key].check_conditions(spec.workload.all_conditions())  # NOTE: another workload may share the model
    return _LOADED[key]
