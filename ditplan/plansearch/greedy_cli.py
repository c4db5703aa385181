"""DiTFastAttn's greedy plans D1 … D6 for an experiment, one plan file per δ (``ditplan greedy`` and
the greedy stage of ``ditplan run``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan
from ditplan.plansearch.greedy import family_candidates, greedy_search, threshold_name
from ditplan.progress import progress_bar
from ditplan.rundir import GreedyDir
from ditplan.spec import ExperimentSpec


def write_greedy_plans(
    adapter: ModelAdapter,
    spec: ExperimentSpec,
    out: GreedyDir,
    thresholds: Sequence[float] | None = None,
    calibration_samples: int | None = None,
    window_size: int | None = None,
    skip_existing: bool = False,
    show_progress: bool = True,
) -> list[Path]:
    """Calibrate one plan per threshold (defaults from ``spec.greedy``) on the calibration seed set into
    ``out`` (``greedy-Dk.yaml``); ``skip_existing`` keeps plan files already there (a resumed run)."""
    thresholds = list(thresholds if thresholds is not None else spec.greedy.thresholds)
    k = calibration_samples or spec.greedy.calibration_samples
    window = window_size if window_size is not None else spec.greedy.window_size
    settings = spec.sampler.settings()
    _, conditions, seeds = spec.workload.seed_set("calibration", k)
    paths = [out.path(threshold_name(i)) for i in range(len(thresholds))]
    todo = [(i, t) for i, t in enumerate(thresholds) if not (skip_existing and paths[i].exists())]
    with progress_bar(len(todo) * settings.num_steps, "greedy calibration", enabled=show_progress) as bar:
        for index, threshold in todo:
            result = greedy_search(adapter, settings, conditions, seeds, threshold, window, bar=bar,
                                   candidates=family_candidates(adapter))
            result.plan.with_provenance(name=threshold_name(index), experiment=spec.name).save(paths[index])
    return paths


def greedy_summary(plan: Plan) -> str:
    """One line on what calibrating a greedy plan cost: sample-forwards, seconds and peak memory."""
    p = plan.provenance
    return (f"{p['name']} (δ={p['threshold']}): {p.get('sample_forwards', '?')} sample-forwards, "
            f"{p['search_seconds']:.0f} s, peak memory {p.get('peak_memory_mb', '?')} MiB")
