"""What a plan does, in words: a one-line description (:func:`describe`) for tables, figures and
``ditplan.summary``, and a few-line card (:func:`plan_card`) for ``ditplan show``.

The description is derived from the plan's parts alone, the same way for every strategy: SparseDiT's
layout and curve, one of diffusers' caches, then the grid's cells counted per strategy over the
layer × step grid (``full`` is the dense default and is not named), then what stands in for the unconditional
branch where guidance skips it. A strategy whose cells form one
pattern (the same steps in each of its layers, those steps a range or every k-th step) is said as that
pattern; any other as its share of the cells. Steps count from 0 (pure noise), as in plan files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from ditplan.plan import Plan
from ditplan.strategies.sdtm import SparseLayout

DENSE = "dense (no acceleration)"
MAX_NAMED = 3  # strategies named in a description; the others are counted


def _number(value: object) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _steps_text(steps: Sequence[int], num_steps: int) -> str | None:
    """``steps`` (sorted) as a pattern: every step, a range, every k-th step; None when they form none."""
    first, last = steps[0], steps[-1]
    to_end = last == num_steps - 1
    if len(steps) == num_steps:
        return "at every step"
    if len(steps) == 1:
        return f"at step {first}"
    stride = steps[1] - first
    if any(b - a != stride for a, b in zip(steps, steps[1:])):
        return None
    if stride == 1:
        return f"from step {first}" if to_end else f"at steps {first}–{last}"
    every = "every 2nd step" if stride == 2 else "every 3rd step" if stride == 3 else f"every {stride}th step"
    return f"{every} from step {first}" if last + stride >= num_steps else f"{every} of steps {first}–{last}"


def _layers_text(layers: Sequence[int], num_layers: int) -> str:
    """``layers`` (sorted) in words."""
    if len(layers) == num_layers:
        return "all blocks"
    if len(layers) == 1:
        return f"block {layers[0]}"
    if layers[-1] - layers[0] == len(layers) - 1:
        return f"blocks {layers[0]}–{layers[-1]}"
    return f"blocks {','.join(map(str, layers))}" if len(layers) <= 4 else f"{len(layers)} blocks"


def _strategy_text(plan: Plan, name: str, cells: int) -> str:
    """One strategy's cells: its pattern when they form one, else its share of the grid."""
    by_layer = {layer: [s for s in range(plan.num_steps) if plan.grid[s][layer] == name]
                for layer in range(plan.num_layers)}
    layers = [layer for layer, steps in by_layer.items() if steps]
    patterns = {tuple(by_layer[layer]) for layer in layers}
    steps = _steps_text(next(iter(patterns)), plan.num_steps) if len(patterns) == 1 else None
    if steps is not None:
        return f"{_layers_text(layers, plan.num_layers)} {name} {steps}"
    share = 100 * cells / (plan.num_steps * plan.num_layers)
    return f"{name} on {round(share) if share >= 1 else '<1'} % of cells"


def _grid_text(plan: Plan, base: dict[int, str]) -> list[str]:
    """The grid's strategies, most cells first, counting the cells that differ from a layer's base: ``full``,
    or what a global part (SparseDiT's layout) requires of it, so block caching on its blocks is named."""
    counts = Counter(cell for row in plan.grid for layer, cell in enumerate(row) if cell != base.get(layer, "full"))
    ranked = sorted(counts, key=lambda n: (-counts[n], n))
    parts = [_strategy_text(plan, n, counts[n]) for n in ranked[:MAX_NAMED]]
    return parts + ([f"+{len(ranked) - MAX_NAMED} more"] if len(ranked) > MAX_NAMED else [])


def _sparse_text(layout: SparseLayout) -> str:
    params = {k: v for k, v in layout.curve.to_dict().items() if k != "name"}
    if len(set(params.values())) == 1:  # a constant rate, whatever the curve's name
        curve = f"r {_number(next(iter(params.values())))}"
    else:
        curve = f"{layout.curve.name} " + " ".join(f"{k} {_number(v)}" for k, v in params.items())
    return f"SparseDiT {layout.name}, {curve}"


def _cache_text(cache: dict) -> str:
    config = cache.get("config") or {}
    settings = ", ".join(f"{k} {_number(v)}" for k, v in config.items() if isinstance(v, (int, float)))
    return f"diffusers {cache.get('method')} cache" + (f" ({settings})" if settings else "")


def _guidance_text(guidance: Sequence[str]) -> list[str]:
    """Each fill of a plan's guidance with its steps, e.g. ``unconditional branch off from step 12``."""
    fills = sorted(set(guidance) - {"full"}, key=guidance.index)
    parts = []
    for fill in fills:
        steps = [s for s, name in enumerate(guidance) if name == fill]
        pattern = _steps_text(steps, len(guidance)) or f"at {len(steps)} steps"
        parts.append(f"unconditional branch {fill} {pattern}")
    return parts


def describe(plan: Plan) -> str:
    """What ``plan`` does in a few words, e.g. ``SparseDiT p1-s1_6, r 0.875; all blocks reuse every 2nd step
    from step 3``; a plan that changes nothing is ``dense (no acceleration)``."""
    layout = SparseLayout.from_dict(plan.sparse) if plan.sparse else None
    parts = [_sparse_text(layout)] if layout else []
    parts += [_cache_text(dict(plan.cache))] if plan.cache else []
    parts += _grid_text(plan, layout.fixed_cells() if layout else {})
    parts += _guidance_text(plan.guidance) if plan.guidance else []
    return "; ".join(parts) or DENSE


def recorded_flops_ratio(plan: Plan) -> tuple[float, str] | None:
    """The FLOPs ratio the plan file records, and where it was measured (held-out seeds first)."""
    for key, where in (("held_out_metrics", "held-out seeds"), ("metrics", "search seeds")):
        metrics = plan.provenance.get(key) or {}
        if "flops_ratio" in metrics:
            return float(metrics["flops_ratio"]), f"as recorded on the {where}"
    return None


def plan_card(plan: Plan, flops_ratio: float | None = None) -> str:
    """A few lines on ``plan``: what it does, what it was made for, its FLOPs ratio to dense (``flops_ratio``:
    computed for this plan by the caller with the cost model; None: what the plan file records) and how it
    was found."""
    t = plan.target
    if flops_ratio is not None:
        flops = f"{flops_ratio:.3f} (analytic cost model, this model)"
    else:
        recorded = recorded_flops_ratio(plan)
        flops = f"{recorded[0]:.3f} ({recorded[1]})" if recorded else "not recorded (give --experiment to compute it)"
    found = {k: plan.provenance[k] for k in ("name", "search", "trial", "threshold", "selected_by") if k in plan.provenance}
    measured = f", measured in {t.dtype}" if t.dtype else ""  # plans written before they recorded it have no dtype
    return "\n".join([
        describe(plan),
        f"target: {t.model} (weights {t.weights_hash}{measured}), {t.num_layers} layers × {t.num_tokens} tokens",
        f"sampler: {t.scheduler}, {t.num_steps} steps, guidance {_number(t.guidance_scale)}"
        + (f", true CFG {_number(t.true_cfg_scale)}" if t.true_cfg_scale != 1.0 else ""),
        f"FLOPs ratio to dense: {flops}",
        *([f"found by: {', '.join(f'{k} {v}' for k, v in found.items())}"] if found else []),
    ])
