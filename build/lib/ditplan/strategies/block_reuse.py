"""``reuse``: skip the whole block and reuse its residual from the last step that computed it.

The block's output is ``x + (O_r − x_r)``: its input at this step plus the residual (output − input)
of the last computed step r, as FORA, Δ-DiT and Learning-to-Cache reuse block outputs across steps.
No work at all in the block; one cached (B, N, C) residual per block while later steps read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditplan.strategies.base import BlockStrategy, register


@register
class BlockReuse(BlockStrategy):
    """Reuses the block's last computed residual (order 0 of ``forecast``)."""

    name = "reuse"

    def block_output(self, hidden_states: torch.Tensor, residuals: Sequence[tuple[int, torch.Tensor]],
                     step: int) -> torch.Tensor:
        return hidden_states + residuals[-1][1]
