"""The identity of a network's weights: what binds a plan to its model, not to a dtype or a device.

A plan records the hash of the weights it was measured on (:func:`network_hash`), the dtype they computed
in, and the hashes of those weights cast to the other half-precision dtypes (:func:`cast_hashes`). A cast
rounds to nearest even, the same on every device, so float32 weights a user casts to bfloat16 hash to the
bfloat16 hash the plan recorded. :func:`binding` decides, exactly, whether weights take a plan.

Only the hashing needs torch, and imports it when it runs: :mod:`ditplan.plan` reads plan files without it.
"""

from __future__ import annotations

import enum
import hashlib
import warnings
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "float16", "bfloat16")  # the dtypes a model computes in (model.dtype) and a plan records
HALF_DTYPES = ("float16", "bfloat16")  # a plan records its weights' hash cast to each of these but its own


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``, as a plan records it."""
    return str(dtype).removeprefix("torch.")


def _state_hash(state: Mapping[str, torch.Tensor], dtype: str | None = None) -> str:
    """A short hash of a state dict's names and tensor bytes; ``dtype``: of its floating-point tensors cast to
    it first, one at a time, as ``module.to(dtype)`` casts them."""
    import torch  # NOTE: here, not at the top, so that plan files load without torch

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(getattr(torch, dtype))
        digest.update(name.encode())
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_hash(module: torch.nn.Module, dtype: str | None = None) -> str:
    """A short content hash of a module's weights (``dtype``: cast to it): plans and caches are keyed by it."""
    return _state_hash(module.state_dict(), dtype)


def network_hash(transformer: torch.nn.Module, merges: torch.nn.ModuleList | None, dtype: str | None = None) -> str:
    """The identity of a network: its transformer's weights, plus the extra weights a strategy's network adds
    (``merges``) when it has them (``dtype``: cast to it)."""
    if merges is None:
        return weights_hash(transformer, dtype)
    state = {f"transformer.{name}": tensor for name, tensor in transformer.state_dict().items()}
    state.update({f"merges.{name}": tensor for name, tensor in merges.state_dict().items()})
    return _state_hash(state, dtype)


def network_dtype(transformer: torch.nn.Module) -> str:
    """The dtype a transformer computes in, by name."""
    return dtype_name(next(transformer.parameters()).dtype)


def cast_hashes(transformer: torch.nn.Module, merges: torch.nn.ModuleList | None) -> dict[str, str]:
    """The network's hash cast to each half-precision dtype but its own: ``{"bfloat16": …}``. Each takes as
    long as :func:`network_hash`; the network is not copied."""
    own = network_dtype(transformer)
    return {dtype: network_hash(transformer, merges, dtype) for dtype in HALF_DTYPES if dtype != own}


class WeightsIdentity(Protocol):
    """What :func:`binding` compares: a :class:`~ditplan.plan.PlanTarget`, or a :class:`NetworkIdentity`."""

    weights_hash: str
    dtype: str | None  # None in plans written before plans recorded it
    cast_hashes: Mapping[str, str]


class NetworkIdentity:
    """The identity of a loaded network (a transformer and the extra weights a strategy's network adds, or
    None); its hashes are taken when first read."""

    def __init__(self, transformer: torch.nn.Module, merges: torch.nn.ModuleList | None = None) -> None:
        self.transformer = transformer
        self.merges = merges
        self.dtype = network_dtype(transformer)

    @cached_property
    def weights_hash(self) -> str:
        return network_hash(self.transformer, self.merges)

    @cached_property
    def cast_hashes(self) -> dict[str, str]:
        return cast_hashes(self.transformer, self.merges)


class Binding(enum.Enum):
    """How found weights relate to the weights a plan was measured on."""

    SAME = "the same weights in the same dtype"
    CAST = "the same weights cast to another dtype"
    OTHER = "other weights"


def binding(plan: WeightsIdentity, found: WeightsIdentity) -> Binding:
    """Whether ``found`` holds the weights ``plan`` was measured on: the same hash is SAME; the plan's hash
    cast to the found dtype, or the found hash cast to the plan's dtype, is CAST (the plan runs, with
    :func:`warn_cast`); anything else is OTHER (refused). Exact: no tolerance. The found side's cast hashes
    are read only when the first two tests fail."""
    if found.weights_hash == plan.weights_hash:
        return Binding.SAME
    if found.dtype is not None and plan.cast_hashes.get(found.dtype) == found.weights_hash:
        return Binding.CAST
    if plan.dtype is not None and found.cast_hashes.get(plan.dtype) == plan.weights_hash:
        return Binding.CAST
    return Binding.OTHER


def warn_cast(plan: WeightsIdentity, found: WeightsIdentity) -> None:
    """Warn that a plan runs in another dtype than it was measured in; called when :func:`binding` is CAST.
    Attributed to this line, so a command that checks a plan twice warns once."""
    warnings.warn(f"plan was measured in {plan.dtype} and runs here in {found.dtype}: its quality and speed figures "
                  f"were measured in {plan.dtype}; make a plan in {found.dtype} for figures of this dtype",
                  UserWarning, stacklevel=1)
