"""``ast``: attention sharing across timesteps (DiTFastAttn)."""

from __future__ import annotations

import torch

from ditplan.strategies.base import AttentionCall, AttentionShape, Strategy, register


@register
class AttentionShareTimestep(Strategy):
    """Returns the layer's attention output from the last step at which it was computed: no attention
    work at all, one cached (B, N, C) tensor per layer while later steps still need it (on joint attention,
    what the module returned: the image and the text stream's outputs)."""

    name = "ast"
    reads = frozenset({"output"})

    @classmethod
    def module_share(cls, cfg: bool) -> float:
        return 0.0

    def attention(self, call: AttentionCall) -> torch.Tensor:
        return call.cache["output"]

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return 0.0
