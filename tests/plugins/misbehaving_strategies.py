"""Third-party strategies that misbehave in a worker: ``hang`` never returns (a hung trial), ``die``
kills its worker process (a worker lost mid-trial)."""

import os
import time

import torch

from ditplan.strategies.base import AttentionCall, AttentionShape, Strategy, register


@register
class Hang(Strategy):
    name = "hang"

    def attention(self, call: AttentionCall) -> torch.Tensor:
        time.sleep(3600)
        raise RuntimeError("unreachable")

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return 0.0


@register
class Die(Strategy):
    name = "die"

    def attention(self, call: AttentionCall) -> torch.Tensor:
        os._exit(1)

    def attention_flops(self, shape: AttentionShape, cfg: bool, writes: frozenset[str]) -> float:
        return 0.0
