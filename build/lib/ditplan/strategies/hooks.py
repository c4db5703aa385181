"""Helpers for the diffusers hooks ditplan installs."""

from __future__ import annotations

import torch


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove diffusers hook ``name`` from ``module`` and, when it was the last, every trace of the
    registry (diffusers keeps the registry and an instance-level ``forward``)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if not registry.hooks:
        del module._diffusers_hook
        module.__dict__.pop("forward", None)
