"""A plan made at N steps, re-targeted to M steps.

Each of the M steps takes the row of the plan's step nearest to it in normalised time (its timestep as a fraction of
the training timesteps, :attr:`~ditplan.plan.PlanTarget.schedule`), not in step index, so a plan's early, middle and
late steps stay early, middle and late whatever the count. A cell that reuses a cache no earlier step of its layer now
makes (fewer steps may drop the step that made it) computes instead (``full``; ``pool`` on a SparseDiT plan's
Poolingformer layers). A SparseDiT plan's pruning curve is a function of the run's progress: it needs no mapping.
The re-targeted plan was not measured at M steps: its quality and speed there are for an evaluation to say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ditplan.models.family import ModelAdapter
from ditplan.models.sampling import plan_target, target_settings
from ditplan.plan import MAX_GRID, Plan, PlanError
from ditplan.strategies.apply import cell_writes, sparse_layout
from ditplan.strategies.base import get_strategy_class
from ditplan.strategies.guidance import COMPUTED
from ditplan.strategies.sparse_network import load_for_plan


def retarget_refusal(plan: Plan) -> str | None:
    """Why ``plan`` cannot be re-targeted to another step count, or None."""
    if plan.cache:
        return "a plan with one of diffusers' caches counts steps in the cache's config: make one for this step count"
    if not plan.target.schedule:
        return ("it records no schedule (made by an older ditplan): `ditplan retarget PLAN --steps M --experiment FILE` "
                "re-targets it from its experiment")
    return None


def retarget(plan: Plan, schedule: Sequence[float]) -> Plan:
    """``plan`` on the steps whose normalised times are ``schedule`` (1 = noise), one row per step."""
    refusal = retarget_refusal(plan) or (None if 1 <= len(schedule) <= MAX_GRID else f"give 1 … {MAX_GRID} steps")
    if refusal:
        raise PlanError(f"cannot re-target the plan to {len(schedule)} steps: {refusal}")
    made = plan.target.schedule
    nearest = [min(range(len(made)), key=lambda i: abs(made[i] - t)) for t in schedule]
    target = replace(plan.target, num_steps=len(schedule), schedule=tuple(schedule))
    computing = _computing_cells(plan)
    grid, computed = _computed_where_unmade([plan.grid[i] for i in nearest], computing)
    guidance = None
    if plan.guidance is not None:  # the first step computes; the unconditional branch's own steps are repaired too
        guidance = (COMPUTED, *(plan.guidance[i] for i in nearest[1:]))
        steps = [s for s, name in enumerate(guidance) if name == COMPUTED]
        repaired, more = _computed_where_unmade([grid[s] for s in steps], computing)
        grid, computed = tuple(dict(zip(steps, repaired)).get(s, row) for s, row in enumerate(grid)), computed + more
    provenance = {"retargeted_from": {"num_steps": plan.num_steps, "cells_computed_in_full": computed,
                                      "provenance": dict(plan.provenance)}}
    return replace(plan, target=target, grid=grid, guidance=guidance, provenance=provenance)


def retarget_to_steps(plan: Plan, adapter: ModelAdapter, steps: int) -> Plan:
    """``plan`` re-targeted to ``steps`` steps of its sampler on ``adapter``'s model (which it must fit, or the
    fine-tuned SparseDiT network the plan names inside it); a plan that records no schedule (an older one) takes the
    schedule of its own steps on that model."""
    adapter = load_for_plan(adapter, plan)
    own = plan_target(adapter, target_settings(plan.target, type(adapter)))
    plan.check_fits(own)
    if not plan.target.schedule:
        plan = replace(plan, target=replace(plan.target, schedule=own.schedule))
    return retarget(plan, plan_target(adapter, target_settings(plan.target, type(adapter), steps)).schedule)


def _computing_cells(plan: Plan) -> list[str]:
    """The cell that computes each layer of ``plan``: the one its SparseDiT layout fixes there, else ``full``."""
    layout = sparse_layout(plan)
    fixed = layout.fixed_cells() if layout else {}
    return [fixed.get(layer, "full") for layer in range(plan.target.num_layers)]


def _computed_where_unmade(rows: Sequence[Sequence[str]], computing: Sequence[str]
                           ) -> tuple[tuple[tuple[str, ...], ...], int]:
    """``rows`` with every cell that reads a cache entry no earlier step of its layer makes set to the layer's
    ``computing`` cell, and how many cells that set."""
    grid, computed = [list(row) for row in rows], 0
    for layer in range(len(grid[0]) if grid else 0):
        made: set[str] = set()
        for row in grid:
            strategy = get_strategy_class(row[layer])
            if strategy.reads - made:
                row[layer], strategy, computed = computing[layer], get_strategy_class(computing[layer]), computed + 1
            made |= cell_writes(strategy)  # type: ignore[arg-type]
    return tuple(tuple(row) for row in grid), computed
