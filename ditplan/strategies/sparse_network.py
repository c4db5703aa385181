"""SparseDiT's fine-tuned networks (``ditplan finetune-sparse``, :mod:`ditplan.strategies.finetune_sparse`):
model folders inside the base model's (``<base>/sparse/<layout name>/``) that carry, beside ``transformer/``
and ``scheduler/``, the SDTM merge weights (:data:`MERGES_FILE`) and their layout and provenance
(:data:`LAYOUT_FILE`).

Here: the merges a layout starts from (:func:`new_merges`) and those a network carries (:func:`load_merges`);
the networks next to a base model (:func:`sparse_networks`); and loading one with its merges — the network a
plan names, as an adapter like the base model's (:func:`load_for_plan`, :func:`load_sparse_network`) or as a
bare transformer (:func:`load_sparse_folder`), or a network's own folder as a model (:func:`load_tuned_adapter`).
The models layer loads plain models and knows none of this: an adapter holds the merges in its ``merges`` slot,
which its weights hash includes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from ditplan.models.adapters import load_adapter, load_transformer, model_folder
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan, PlanError

MERGES_FILE = "sparse_merge.safetensors"
LAYOUT_FILE = "sparse_layout.yaml"


def new_merges(num_modules: int, dim: int) -> torch.nn.ModuleList:
    """The merge of each module at its start: ``up`` = identity, ``skip`` = zero."""
    merges = torch.nn.ModuleList()
    for _ in range(num_modules):
        merge = torch.nn.ModuleDict({"up": torch.nn.Linear(dim, dim, bias=False), "skip": torch.nn.Linear(dim, dim, bias=False)})
        with torch.no_grad():
            merge["up"].weight.copy_(torch.eye(dim))
            merge["skip"].weight.zero_()
        merges.append(merge)
    return merges


def load_merges(folder: Path, transformer: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The SDTM merges a fine-tuned SparseDiT folder carries (``ditplan finetune-sparse``), frozen, else None."""
    path = folder / MERGES_FILE
    if not path.exists():
        return None
    state = load_file(path)
    count = len({key.split(".")[0] for key in state})
    merges = new_merges(count, transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    merges.load_state_dict(state)
    return merges.eval().requires_grad_(False)


def load_tuned_adapter(kind: str, folder: str | Path, **load_kwargs: Any) -> ModelAdapter:
    """A fine-tuned SparseDiT network's own folder loaded as a model (``load_kwargs``: :func:`load_adapter`'s),
    with its SDTM merges."""
    adapter = load_adapter(kind, str(folder), **load_kwargs)
    adapter.merges = load_merges(Path(folder), adapter.transformer)
    return adapter


def load_for_plan(adapter: ModelAdapter, plan: Plan) -> ModelAdapter:
    """The model ``plan`` runs on: ``adapter`` itself, or the fine-tuned SparseDiT network the plan names
    in ``sparse.weights``."""
    weights = (plan.sparse or {}).get("weights")
    if not weights or adapter.merges is not None and adapter.weights_hash == plan.target.weights_hash:
        return adapter
    return load_sparse_network(adapter, weights)


def load_sparse_network(adapter: ModelAdapter, weights: str) -> ModelAdapter:
    """The fine-tuned SparseDiT network ``weights`` (a folder inside the base model's) as an adapter like
    ``adapter`` (same conditioning, schedule, VAE, device); loaded once per adapter."""
    networks = adapter.__dict__.setdefault("_sparse_networks", {})
    if weights not in networks:
        folder, transformer, merges = load_sparse_folder(type(adapter.transformer), model_folder(adapter.model_id), weights,
                                                         adapter.dtype)
        tuned = copy.copy(adapter)
        tuned.__dict__.pop("identity", None)
        tuned.__dict__.pop("_sparse_networks", None)
        tuned.transformer = transformer.eval().requires_grad_(False)
        tuned.merges = merges
        tuned.model_id = str(folder)
        networks[weights] = tuned.to(next(adapter.transformer.parameters()).device, adapter.dtype)
    return networks[weights]


def load_sparse_folder(transformer_cls: type[torch.nn.Module], base: Path, weights: str,
                       dtype: torch.dtype | None = None) -> tuple[Path, torch.nn.Module, torch.nn.ModuleList | None]:
    """The fine-tuned SparseDiT network ``weights`` inside the base model's folder ``base``: (its folder,
    its transformer in ``dtype``, its SDTM merges)."""
    folder = sparse_network_folder(base, weights)
    transformer = load_transformer(transformer_cls, folder, dtype)
    return folder, transformer, load_merges(folder, transformer)


def sparse_network_folder(base: Path, weights: str) -> Path:
    """The folder of the fine-tuned SparseDiT network a plan names (``sparse.weights``, relative to the base
    model's folder ``base``); a path that leaves ``base`` or holds no network is refused."""
    folder = (Path(base) / weights).resolve()
    if Path(weights).is_absolute() or not folder.is_relative_to(Path(base).resolve()):
        raise PlanError(f"plan's sparse.weights {weights!r} leaves the model folder {base}; a fine-tuned network must "
                        "lie inside it, e.g. sparse/p1-s1_5")
    if not (folder / "transformer").is_dir():
        raise PlanError(f"plan needs the fine-tuned SparseDiT network {weights!r}, but {folder} holds none; make it "
                        "with `ditplan finetune-sparse` for this model")
    return folder


def sparse_networks(base_folder: Path) -> dict[str, dict]:
    """The fine-tuned SparseDiT networks next to a base model: relative folder → its ``sparse_layout.yaml``."""
    out = {}
    for info in sorted((base_folder / "sparse").glob(f"*/{LAYOUT_FILE}")):
        out[str(info.parent.relative_to(base_folder))] = yaml.safe_load(info.read_text())
    return out
