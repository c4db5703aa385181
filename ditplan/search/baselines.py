"""Baselines: the presets an experiment lists (``baselines:``), measured on the held-out seeds.

Each baseline becomes a plan run through its own library: one of diffusers' caches installed by
diffusers' ``apply_*`` (a plan's ``cache`` part), or a SparseDiT setting (a shipped network at a
pruning curve). They are measured together, interleaved with dense (``held_out_metrics``), and stored
in ``<run>/baselines/held_out.yaml``; ``ditplan compare`` puts them beside greedy and learned.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ditplan.atomic import atomic_write_text
from ditplan.errors import UserError
from ditplan.evaluators.held_out import DENSE, held_out_metrics
from ditplan.models.adapters import ModelAdapter, model_folder, sparse_networks
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanError
from ditplan.spec import BaselineSpec, ExperimentSpec
from ditplan.strategies.diffusers_cache import DiffusersCache
from ditplan.strategies.finetune_sparse import layout_plan
from ditplan.strategies.sdtm import SparseLayout

BASELINES_FILE = Path("baselines") / "held_out.yaml"


def baseline_plan(adapter: ModelAdapter, spec: ExperimentSpec, baseline: BaselineSpec) -> Plan:
    """The plan that runs ``baseline`` on the experiment's model and sampler; bad settings are refused
    in one line naming the baseline."""
    settings = spec.sampler.settings()
    try:
        if baseline.cache is not None:
            plan = Plan.uniform(plan_target(adapter, settings), cache=dict(baseline.cache))
            DiffusersCache.from_plan(plan)  # checks the method and its fields
            return plan
        sparse = dict(baseline.sparse or {})
        found = sparse_networks(model_folder(adapter.model_id)) if adapter.model_id else {}
        network = sparse.get("network")
        if network not in found:
            raise PlanError(f"no fine-tuned network {network!r} next to the model; found: {sorted(found) or 'none'}")
        layout = SparseLayout.from_dict({**found[network]["layout"], "curve": sparse.get("curve"), "weights": network})
        return layout_plan(adapter, layout, settings)
    except (PlanError, ValueError, TypeError) as err:
        raise UserError(f"baseline {baseline.name!r}: {err}") from None


def measure_baselines(adapter: ModelAdapter, spec: ExperimentSpec, run_dir: Path) -> Path | None:
    """Measure the experiment's baselines on the held-out seeds (once per run directory); returns the
    results file, or None when the experiment lists none."""
    if not spec.baselines:
        return None
    path = run_dir / BASELINES_FILE
    if path.exists():
        return path
    plans = {b.name: baseline_plan(adapter, spec, b) for b in spec.baselines}
    result = held_out_metrics(adapter, spec, plans)
    data = {"held_out": {"first_seed": result.seed_set.seeds[0], "samples": len(result.seed_set.seeds)},
            "spent": {"seconds": result.seconds, "sample_forwards": result.sample_forwards},
            "metrics": {name: result.metrics[name] for name in [DENSE, *plans]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def load_baselines(run_dir: Path) -> dict[str, dict[str, float]]:
    """Held-out metrics per baseline name (dense's under ``dense``), or {} when none were measured."""
    path = run_dir / BASELINES_FILE
    if not path.exists():
        return {}
    return dict(yaml.safe_load(path.read_text())["metrics"])
