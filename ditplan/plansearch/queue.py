"""What joins a study before the sampler's own trials, and the plan each trial runs.

Warm-start plans (greedy D1 … D6, or plan files given to ``ditplan search --warm-start``) and the proxy's
proposals are enqueued: plans the space can express by their parameters (the samplers learn from them,
NSGA-II breeds from them); warm-start plans it cannot express run whole, recorded with the parameters of
their projection onto the space (:meth:`PlanSpace.project`), so the samplers learn from them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import optuna

from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan
from ditplan.plansearch.attrs import (
    GIVEN,
    INTERVAL_PROPOSAL,
    NAME,
    PROJECTED,
    PROPOSAL,
    WARM,
)
from ditplan.plansearch.proxy import cell_flops, experiment_proxy, propose
from ditplan.plansearch.space import PlanSpace
from ditplan.spec import ExperimentSpec, SearchSpec


def _known_names(study: optuna.Study) -> set[str]:
    return {t.user_attrs.get(NAME) for t in study.get_trials(deepcopy=False)}


def enqueue_warm_start(study: optuna.Study, space: PlanSpace, plans: Mapping[str, Plan]) -> None:
    """Known ``plans`` (by name) join the study, queued to run first on the workers like any trial; a
    resumed study keeps them and adds none twice."""
    known = _known_names(study)
    for name, plan in plans.items():
        if name in known:
            continue
        params = space.params_for(plan)
        projected = space.project(plan) if params is None else None
        attrs = {NAME: name, WARM: str(plan.provenance.get("search", "warm-start")),
                 **({GIVEN: True} if params is None else {}), **({PROJECTED: True} if projected else {})}
        study.enqueue_trial(params or projected or {}, user_attrs=attrs)


def proposal_max_loss(search: SearchSpec) -> float | None:
    """The most summed proxy loss a proposal may have: the search's ``rel_l1`` bound when the proxy weighs its
    cells by their gains (then a plan's summed loss predicts its final samples' rel. L1), else none."""
    if search.proposals is None or not search.proposals.gain_probes:
        return None
    bounds = [c.max for c in search.constraints if c.metric == "rel_l1" and c.max is not None]
    return min(bounds) if bounds else None


def proposed_plans(adapter: ModelAdapter, spec: ExperimentSpec, space: PlanSpace, proxy_path: Path
                   ) -> tuple[dict[str, tuple[Plan, str]], int | None]:
    """``search.proposals``: plans the proxy (measured once on the calibration batch, kept at ``proxy_path``
    with its cost) proposes, by name with their source, then with ``proposals.intervals`` each cache
    interval of the space alone (:meth:`PlanSpace.interval_plans`); and the proxy's sample-forwards when it
    was measured now (None when read back)."""
    proposals = spec.search.proposals
    if proposals is None:
        return {}, None
    proxy, measured = experiment_proxy(adapter, spec, proxy_path)
    plans = propose(space, proxy, cell_flops(adapter, spec.sampler.settings(), proxy), proposals.count,
                    proposals.spread, proposals.max_reuse_run, proposal_max_loss(spec.search))
    named = {f"proposal-{index}": (plan, proposals.source) for index, plan in enumerate(plans)}
    if proposals.intervals:
        named.update({name: (plan, INTERVAL_PROPOSAL) for name, plan in space.interval_plans(proposals.max_reuse_run).items()})
    return named, proxy.sample_forwards if measured else None


def enqueue_proposals(study: optuna.Study, space: PlanSpace, named: Mapping[str, tuple[Plan, str]]) -> None:
    """Proposed plans join the study as enqueued learned trials with their parameters, ahead of the
    sampler's own; a resumed study keeps them and adds none twice."""
    known = _known_names(study)
    for name, (plan, source) in named.items():
        params = space.params_for(plan)
        if name not in known and params is not None:
            study.enqueue_trial(params, user_attrs={NAME: name, PROPOSAL: source})


class PlanSource:
    """The plan a trial runs: a warm-start plan given whole (None when this driver was not given it), or
    the space's plan for the trial's parameters."""

    def __init__(self, space: PlanSpace, warm_plans: Mapping[str, Plan]) -> None:
        self.space = space
        self.warm_plans = dict(warm_plans)

    def __call__(self, trial: optuna.Trial | optuna.trial.FixedTrial, attrs: Mapping[str, object]) -> Plan | None:
        if attrs.get(GIVEN):
            if attrs.get(PROJECTED):
                self.space.suggest(trial)  # records the projected parameters: the sampler learns from them
            return self.warm_plans.get(str(attrs.get(NAME, "")))
        return self.space.suggest(trial)
