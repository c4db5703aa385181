"""Baselines: the presets an experiment lists (``baselines:``), each a plan run through its own library.

One of diffusers' caches installed by diffusers' ``apply_*`` (a plan's ``cache`` part), or a SparseDiT
setting (a shipped network at a pruning curve). The held-out stage measures them beside dense, greedy
and the learned plans, in the same interleaved rounds.
"""

from __future__ import annotations

from ditplan.errors import UserError
from ditplan.models.adapters import model_folder
from ditplan.models.family import ModelAdapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanError
from ditplan.plansearch.greedy import threshold_name
from ditplan.spec import BaselineSpec, ExperimentSpec
from ditplan.strategies.diffusers_cache import DiffusersCache
from ditplan.strategies.finetune_sparse import layout_plan
from ditplan.strategies.sdtm import SparseLayout
from ditplan.strategies.sparse_network import sparse_networks


def check_baselines(spec: ExperimentSpec) -> None:
    """Refuse, before anything runs, a baseline whose name another side has (dense, greedy's D1 …, another
    baseline) or whose cache names an unknown method, field or value."""
    taken = {"dense", *(threshold_name(i) for i in range(len(spec.greedy.thresholds)))}
    for baseline in spec.baselines:
        if baseline.name in taken:
            raise UserError(f"baselines: the name {baseline.name!r} is taken (by dense, greedy's plans or another "
                            "baseline); give this baseline another name")
        taken.add(baseline.name)
        if baseline.cache is not None:
            try:
                DiffusersCache.from_config(dict(baseline.cache), spec.sampler.settings().num_steps)
            except PlanError as err:
                raise UserError(f"baseline {baseline.name!r}: {err}") from None


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
