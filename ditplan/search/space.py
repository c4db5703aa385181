"""Search spaces over plans, built from the registered strategies.

The (step × layer) grid is cut into layer groups × step segments; each cell picks one method.
Step 0 is always dense (every reuse strategy needs something computed before it). With one layer
per group and one step per segment the space is the full per-(step, layer) grid. Strategy
parameters (e.g. the WA-RS window) come from each strategy's own ``search_space``, narrowed by the
experiment file when it lists choices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from ditplan.plan import Plan, PlanTarget
from ditplan.strategies.base import get_strategy_class


def _bounds(cuts: Sequence[int], end: int, start: int) -> list[tuple[int, int]]:
    edges = sorted({start, *(c for c in cuts if start < c < end), end})
    return list(zip(edges[:-1], edges[1:]))


def even_cuts(count: int, end: int, start: int = 0) -> list[int]:
    """``count`` near-equal pieces of [start, end) as cut points."""
    count = max(1, min(count, end - start))
    return [start + round(i * (end - start) / count) for i in range(1, count)]


@dataclass(frozen=True)
class PlanSpace:
    """methods: strategy names a cell may take; layer_cuts / step_cuts: where groups and segments start;
    params: ``{strategy: {param: [choices]}}`` for the methods' own parameters."""

    target: PlanTarget
    methods: tuple[str, ...]
    layer_cuts: tuple[int, ...]
    step_cuts: tuple[int, ...]
    params: Mapping[str, Mapping[str, Sequence[Any]]]

    @property
    def layer_groups(self) -> list[tuple[int, int]]:
        return _bounds(self.layer_cuts, self.target.num_layers, 0)

    @property
    def step_segments(self) -> list[tuple[int, int]]:
        return _bounds(self.step_cuts, self.target.num_steps, 1)  # step 0 stays dense

    def cell_name(self, layers: tuple[int, int], steps: tuple[int, int]) -> str:
        return f"L{layers[0]}-{layers[1] - 1}/S{steps[0]}-{steps[1] - 1}"

    def params_for(self, plan: Plan) -> dict[str, Any] | None:
        """The trial parameters that reproduce ``plan``, or None when this space cannot express it
        (a cell that mixes methods, a method or parameter value outside the choices)."""
        params: dict[str, Any] = {}
        if any(m != "full" for m in plan.grid[0]):
            return None
        for layers in self.layer_groups:
            for steps in self.step_segments:
                methods = {plan.grid[s][l] for s in range(*steps) for l in range(*layers)}
                if len(methods) != 1 or not methods <= set(self.methods):
                    return None
                params[self.cell_name(layers, steps)] = methods.pop()
        used = {m for row in plan.grid for m in row}
        for name, choices in self.params.items():
            if name not in used:
                continue
            for key, options in choices.items():
                value = plan.params.get(name, {}).get(key)
                if value is None or value not in options:
                    return None
                params[f"{name}.{key}"] = value
        return params

    def suggest(self, trial: optuna.Trial) -> Plan:
        """Called once per trial on the driver: draws every cell and parameter, returns the plan."""
        grid = [["full"] * self.target.num_layers for _ in range(self.target.num_steps)]
        for l0, l1 in self.layer_groups:
            for s0, s1 in self.step_segments:
                method = trial.suggest_categorical(self.cell_name((l0, l1), (s0, s1)), list(self.methods))
                for step in range(s0, s1):
                    for layer in range(l0, l1):
                        grid[step][layer] = method
        used = {m for row in grid for m in row}
        params = {}
        for name, choices in self.params.items():
            if name in used:
                params[name] = {p: trial.suggest_categorical(f"{name}.{p}", list(c)) for p, c in choices.items()}
        return Plan(self.target, tuple(map(tuple, grid)), params=params)


def build_space(
    target: PlanTarget,
    methods: Sequence[str],
    layer_groups: int | Sequence[int],
    step_segments: int | Sequence[int],
    param_choices: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
) -> PlanSpace:
    """``layer_groups`` / ``step_segments``: a count (even pieces) or explicit cut points."""
    for name in methods:
        get_strategy_class(name)  # unknown names fail here, naming the registered ones
    layer_cuts = even_cuts(layer_groups, target.num_layers) if isinstance(layer_groups, int) else list(layer_groups)
    step_cuts = even_cuts(step_segments, target.num_steps, 1) if isinstance(step_segments, int) else list(step_segments)
    params: dict[str, dict[str, Sequence[Any]]] = {}
    for name in methods:
        space = {k: list(v) for k, v in get_strategy_class(name).search_space(target.num_tokens).items()}
        space.update({k: list(v) for k, v in (param_choices or {}).get(name, {}).items()})
        if space:
            params[name] = space
    return PlanSpace(target, tuple(methods), tuple(layer_cuts), tuple(step_cuts), params)
