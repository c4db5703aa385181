"""The held-out evaluation of a study's plans, stored next to the study.

The search ranks plans on cheap objectives (relative L1, analytic FLOPs) over the search seeds; the
feasible front and the greedy plans are then measured on the held-out seed set with the expensive
metrics (domain FID/KID, latency interleaved with dense: :mod:`ditplan.evaluators.held_out`). The
results form a second study, ``<name>-refined``, in the same storage: both fidelities stay side by
side; dense's own held-out metrics and what the evaluation spent are that study's user attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from ditplan.evaluators.base import METRIC_DIRECTIONS
from ditplan.evaluators.held_out import DENSE, held_out_metrics
from ditplan.plan import load_plan
from ditplan.search.trial_eval import worker_adapter
from ditplan.spec import ExperimentSpec


def refined_study_name(study_name: str) -> str:
    return f"{study_name}-refined"


def trial_name(trial: FrozenTrial) -> str:
    return trial.user_attrs.get("name", f"trial-{trial.number}")


def refine_front(
    spec: ExperimentSpec, storage: object, study_name: str, trials: Sequence[FrozenTrial], plans_dir: Path,
) -> optuna.Study:
    """Measure ``trials`` (their plan files are in ``plans_dir``) on the held-out seeds; trials already
    measured are skipped, the rest are measured together, interleaved with dense."""
    refine = spec.search.refine
    if refine is None:
        raise ValueError("the experiment has no search.refine section")
    study = optuna.create_study(study_name=refined_study_name(study_name), storage=storage, load_if_exists=True,
                                directions=[METRIC_DIRECTIONS[m] for m in refine.metrics])
    done = {t.user_attrs.get("source_trial") for t in study.get_trials(deepcopy=False)}
    todo = {trial_name(t): t for t in trials if t.number not in done}
    if not todo:
        return study
    plans = {name: load_plan(plans_dir / f"trial-{t.number:04d}.yaml") for name, t in todo.items()}
    result = held_out_metrics(worker_adapter(spec), spec, plans)
    held_out = {"first_seed": result.seed_set.seeds[0], "samples": len(result.seed_set.seeds)}
    for name, trial in todo.items():
        values = result.metrics[name]
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
