"""The identity of a model's weights: plans and cached references are keyed by it."""

from __future__ import annotations

import hashlib

import torch


def weights_hash(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights: plans and caches are keyed by it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def network_hash(transformer: torch.nn.Module, merges: torch.nn.ModuleList | None) -> str:
    """The identity of a network: its transformer's weights, plus its SDTM merges when fine-tuned."""
    if merges is None:
        return weights_hash(transformer)
    return weights_hash(torch.nn.ModuleDict({"transformer": transformer, "merges": merges}))
