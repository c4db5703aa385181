"""The held-out evaluation of a study's plans, stored next to the study.

The search ranks plans on cheap objectives (relative L1, analytic FLOPs) over the search seeds; the
feasible front and the greedy plans are then measured on the held-out seed set with the expensive
metrics (domain FID/KID, latency interleaved with dense: :mod:`ditplan.evaluators.held_out`). The
results form a second study, ``<name>-refined``, in the same storage: both fidelities stay side by
side; dense's own held-out metrics and what the evaluation spent are that study's user attributes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from ditplan.errors import UserError
from ditplan.evaluators.base import METRIC_DIRECTIONS
from ditplan.evaluators.held_out import DENSE, held_out_metrics
from ditplan.plan import Plan, load_plan
from ditplan.search.trial_eval import worker_adapter
from ditplan.strategies.apply import sparse_layout
from ditplan.spec import ExperimentSpec


def refined_study_name(study_name: str) -> str:
    return f"{study_name}-refined"


def trial_name(trial: FrozenTrial) -> str:
    return trial.user_attrs.get("name", f"trial-{trial.number}")


def _plan_key(plan: Plan) -> str:
    """What a plan runs, without where it came from: identical plans proposed twice share it, and so do
    pruning curves of different families that give the same tokens at every step."""
    data = {k: v for k, v in plan.to_dict().items() if k != "provenance"}
    layout = sparse_layout(plan)
    if layout is not None:
        tokens = [layout.tokens_by_block(step, plan.num_steps, plan.num_layers, plan.target.num_tokens)
                  for step in range(plan.num_steps)]
        data["sparse"] = {**data["sparse"], "curve": tokens}
    return json.dumps(data, sort_keys=True)


def distinct_plans(trials: Sequence[FrozenTrial], plans_dir: Path) -> dict[str, tuple[FrozenTrial, Plan]]:
    """The first trial (by name) of every distinct plan among ``trials``: a sampler that proposes the
    same plan again costs one held-out measurement, not two."""
    seen: set[str] = set()
    out = {}
    for trial in trials:
        plan = load_plan(plans_dir / f"trial-{trial.number:04d}.yaml")
        key = _plan_key(plan)
        if key not in seen:
            seen.add(key)
            out[trial_name(trial)] = (trial, plan)
    return out


def refine_front(
    spec: ExperimentSpec, storage: object, study_name: str, trials: Sequence[FrozenTrial], plans_dir: Path,
) -> optuna.Study:
    """Measure the distinct plans of ``trials`` (their files are in ``plans_dir``) on the held-out seeds;
    trials already measured are skipped, the rest are measured together, interleaved with dense."""
    refine = spec.search.refine
    if refine is None:
        raise ValueError("the experiment has no search.refine section")
    study = optuna.create_study(study_name=refined_study_name(study_name), storage=storage, load_if_exists=True,
                                directions=[METRIC_DIRECTIONS[m] for m in refine.metrics])
    done = {t.user_attrs.get("source_trial") for t in study.get_trials(deepcopy=False)}
    todo = {name: pair for name, pair in distinct_plans(trials, plans_dir).items() if pair[0].number not in done}
    if not todo:
        return study
    result = held_out_metrics(worker_adapter(spec), spec, {name: plan for name, (_, plan) in todo.items()})
    held_out = {"first_seed": result.seed_set.seeds[0], "samples": len(result.seed_set.seeds)}
    for name, (trial, _) in todo.items():
        values = result.metrics[name]
        bad = [m for m in refine.metrics if not math.isfinite(values.get(m, math.nan))]
        if bad:
            raise UserError(f"held-out {bad[0]} of {name} is not a number on {held_out['samples']} samples; raise "
                            "search.refine.samples (FID needs more samples than the extractor's feature dimensions)")
        study.add_trial(optuna.trial.create_trial(
            values=[values[m] for m in refine.metrics],
            user_attrs={"source_trial": trial.number, "name": name, "metrics": values, "held_out": held_out},
        ))
    study.set_user_attr(DENSE, result.metrics[DENSE])
    study.set_user_attr("held_out", held_out)
    spent = study.user_attrs.get("spent", {"seconds": 0.0, "sample_forwards": 0})
    study.set_user_attr("spent", {"seconds": spent["seconds"] + result.seconds,
                                  "sample_forwards": spent["sample_forwards"] + result.sample_forwards})
    return study
