"""``forecast``: skip the whole block and extrapolate its residual from its last computed steps.

TaylorSeer-style: the residual (output − input) of the block is treated as a function of the step
index and extrapolated by a Taylor expansion of order ``order`` built from finite differences of the
last ``order + 1`` computed steps. With fewer computed steps cached so far, the highest order they
allow is used; order 0 is ``reuse``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ditplan.strategies.base import BlockStrategy, register


@dataclass(frozen=True)
class ForecastConfig:
    """order: Taylor order of the forecast (0 = reuse the last residual, 1 = linear extrapolation from
    the last two computed steps, 2 = quadratic from three). Higher orders follow fast-changing blocks
    better but amplify noise and keep more residuals (order + 1 per block)."""

    order: int = 1


@register
class BlockForecast(BlockStrategy):
    """Forecasts the block's residual by Newton's forward differences over the computed steps."""

    name = "forecast"
    config_class = ForecastConfig

    def validate(self, num_tokens: int) -> None:
        if not 0 <= self.config.order <= 3:
            raise ValueError(f"forecast order {self.config.order} is not supported; use 0 … 3")

    @classmethod
    def search_space(cls, num_tokens: int) -> dict[str, list[int]]:
        return {"order": [1, 2]}

    @property
    def history(self) -> int:
        return self.config.order + 1

    def block_output(self, hidden_states: torch.Tensor, residuals: Sequence[tuple[int, torch.Tensor]],
                     step: int) -> torch.Tensor:
        points = list(residuals[-self.history:])  # (step, residual), oldest first
        # Newton's divided differences over the computed steps, evaluated at `step`
        steps = [s for s, _ in points]
        table = [r for _, r in points]
        coefficients = [table[-1]]
        for order in range(1, len(points)):
            table = [(table[i + 1] - table[i]) / (steps[i + order] - steps[i]) for i in range(len(table) - 1)]
            coefficients.append(table[-1])
        # p(step) = Σ_k c_k · Π_{j<k} (step − s_{n−j}), expanded around the latest steps
        product = torch.ones((), dtype=hidden_states.dtype, device=hidden_states.device)
        forecast = coefficients[0]
        for order in range(1, len(coefficients)):
            product = product * (step - steps[-order])
            forecast = forecast + coefficients[order] * product
        return hidden_states + forecast
