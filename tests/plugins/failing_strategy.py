"""A third-party strategy that always raises: proves a failing trial fails alone."""

import torch

from ditplan.strategies.base import AttentionCall, AttentionShape, Strategy, register


@register
class Boom(Strategy):
    name = "boom"

    def attention(self, call: AttentionCall) -> torch.Tensor:
        raise RuntimeError("boom strategy failed on purpose")

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return 0.0
