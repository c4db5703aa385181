"""``ditplan greedy``: DiTFastAttn's greedy plans D1 … D6 for an experiment, one plan file per δ."""

from __future__ import annotations

from pathlib import Path

from ditplan.models.adapters import adapter_from_spec
from ditplan.progress import progress_bar
from ditplan.search.greedy import greedy_search, threshold_name
from ditplan.spec import load_spec


def run_greedy(
    experiment: str | Path,
    out: str | Path,
    thresholds: list[float],
    calibration_samples: int = 8,
    window_size: int | None = None,
) -> list[Path]:
    spec = load_spec(experiment)
    adapter = adapter_from_spec(spec.model, spec.workload.prompts or ())
    settings = spec.sampler.settings()
    conditions = spec.workload.conditions()[:calibration_samples]
    seeds = spec.workload.seeds()[:calibration_samples]
    paths = []
    with progress_bar(len(thresholds) * settings.num_steps, "greedy calibration") as bar:
        for index, threshold in enumerate(thresholds):
            result = greedy_search(adapter, settings, conditions, seeds, threshold, window_size, bar=bar)
            plan = result.plan.with_provenance(name=threshold_name(index), experiment=spec.name)
            paths.append(plan.save(Path(out) / f"greedy-{threshold_name(index)}.yaml"))
    return paths
