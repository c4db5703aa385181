"""Strategies inside joint attention (FLUX.1, SD3, Qwen-Image: text and image tokens in one attention) without
re-implementing any family's processor.

The family's own processor runs (its projections, norms, RoPE, masks and output projections), and only the
attention kernel it calls (``F.scaled_dot_product_attention``, directly or through diffusers' dispatch) is
swapped for the strategy's during that call, through a ``TorchFunctionMode``. The kernel sees the joint sequence
(B, H, L + N, D), text first or image first as the family lays it out; :class:`JointTokens` splits it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ditplan.plan import PlanError

# (q, k, v (B, H, S, D), key mask or None) → the attention output (B, H, S, D)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class JointTokens:
    """Where the image tokens lie in a joint attention's sequence: ``image`` of them, after the text
    (``text_first``) or before it."""

    image: int
    text_first: bool

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, S, D) along the sequence axis (-2) → (text, image)."""
        text = x.shape[-2] - self.image
        if self.text_first:
            return x[..., :text, :], x[..., text:, :]
        return x[..., self.image:, :], x[..., : self.image, :]

    def join(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([text, image] if self.text_first else [image, text], dim=-2)

    def text_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The text keys' part of a key mask (…, S) (None: every key)."""
        if mask is None:
            return None
        text = mask.shape[-1] - self.image
        return mask[..., :text] if self.text_first else mask[..., self.image:]


_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _KernelSwap(TorchFunctionMode):
    """Within it, ``F.scaled_dot_product_attention`` runs ``kernel`` (which itself calls the real one)."""

    def __init__(self, kernel: Kernel) -> None:
        super().__init__()
        self.kernel = kernel
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(_SDPA_ARGUMENTS, args)) | kwargs  # diffusers' dispatch passes them by name
        if call.get("dropout_p") or call.get("is_causal") or call.get("scale") is not None or call.get("enable_gqa"):
            raise PlanError("ditplan's joint-attention kernels take a key mask only, but the attention processor asked "
                            "for dropout, a causal mask, a scale or grouped queries; use a plan without wars on this model")
        self.calls += 1
        return self.kernel(call["query"], call["key"], call["value"], call.get("attn_mask"))


def run_with_kernel(original: Callable[[], Any], kernel: Kernel) -> Any:
    """``original()`` (the attention module's own processor on a call's inputs) with ``kernel`` as its attention
    kernel."""
    swap = _KernelSwap(kernel)
    with swap:
        out = original()
    if not swap.calls:
        raise PlanError("wars on joint attention swaps the attention kernel its processor calls through PyTorch's "
                        "scaled_dot_product_attention, but this one ran another attention backend; use diffusers' "
                        "native backend (transformer.set_attention_backend('native')) or a plan without wars")
    return out
