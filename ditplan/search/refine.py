"""Multi-fidelity re-evaluation of a study's Pareto front with expensive metrics.

The search ranks plans on cheap objectives (relative L1, analytic FLOPs) over a few samples; the
front is then measured again on more samples (domain FID, latency with repeats), one plan at a time
on the driver so that timings do not contend. The results form a second study, ``<name>-refined``,
in the same storage: both fidelities stay side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial

from ditplan.evaluators.base import METRIC_DIRECTIONS
from ditplan.evaluators.reference import dense_reference
from ditplan.plan import Plan, load_plan
from ditplan.progress import progress_bar
from ditplan.search.trial_eval import plan_metrics, worker_adapter
from ditplan.spec import ExperimentSpec


def refined_study_name(study_name: str) -> str:
    return f"{study_name}-refined"


def refine_front(
    spec: ExperimentSpec, storage: object, study_name: str, front: Sequence[FrozenTrial], plans_dir: Path,
    show_progress: bool = True,
) -> optuna.Study:
    """Re-evaluate ``front`` (trials whose plan files are in ``plans_dir``); skips trials already refined."""
    refine = spec.search.refine
    if refine is None:
        raise ValueError("the experiment has no search.refine section")
    adapter = worker_adapter(spec)
    settings = spec.sampler.settings()
    conditions, seeds = spec.workload.conditions()[: refine.samples], spec.workload.seeds()[: refine.samples]
    dense = dense_reference(adapter, settings, conditions, seeds, spec.evaluation.cache_dir)
    study = optuna.create_study(study_name=refined_study_name(study_name), storage=storage, load_if_exists=True,
                                directions=[METRIC_DIRECTIONS[m] for m in refine.metrics])
    done = {t.user_attrs.get("source_trial") for t in study.get_trials(deepcopy=False)}
    todo = [t for t in front if t.number not in done]
    with progress_bar(len(todo), "re-evaluating the front", enabled=show_progress) as bar:
        for trial in todo:
            plan: Plan = load_plan(plans_dir / f"trial-{trial.number:04d}.yaml")
            values = plan_metrics(adapter, spec, plan, dense, conditions, seeds, refine.metrics, refine.latency_repeats)
            name = trial.user_attrs.get("name", f"trial-{trial.number}")
            study.add_trial(optuna.trial.create_trial(
                values=[values[m] for m in refine.metrics],
                user_attrs={"source_trial": trial.number, "name": name, "metrics": values},
            ))
            bar.update(1)
    return study
