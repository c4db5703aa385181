from dataclasses import replace

import pytest

from ditplan.cli import main
from ditplan.evaluators.fidelity import relative_l1
from ditplan.models.adapters import adapter_from_spec
from ditplan.plan import load_plan
from ditplan.plansearch.greedy import CANDIDATES, expected_forwards, greedy_search
from ditplan.spec import load_spec
from tests.conftest import DATA


def _calibrate(adapter, spec, threshold):
    conditions, seeds = spec.workload.conditions()[:2], spec.workload.seeds()[:2]
    return greedy_search(adapter, spec.sampler.settings(), conditions, seeds, threshold)


def test_threshold_zero_keeps_every_layer_full_and_tries_every_candidate(tiny_adapter, tiny_spec):
    result = _calibrate(tiny_adapter, tiny_spec, 0.0)
    assert result.plan.strategies() == {"full"}
    steps, layers = tiny_spec.sampler.num_steps, tiny_adapter.num_layers
    assert result.forwards == 1 + (steps - 1) * (2 + len(CANDIDATES) * layers)


def test_forward_count_matches_what_the_algorithm_implies(tiny_adapter, tiny_spec):
    result = _calibrate(tiny_adapter, tiny_spec, 5.0)  # loose: most layers compress
    assert result.plan.strategies() != {"full"}
    assert all(m == "full" for m in result.plan.grid[0])  # step 0 always dense
    assert result.forwards == expected_forwards(result.plan, CANDIDATES)
    assert result.plan.provenance["transformer_forwards"] == result.forwards
    rows = 2 * 2  # two calibration samples, both CFG halves
    assert result.sample_forwards == result.forwards * rows == result.plan.provenance["sample_forwards"]
    assert result.plan.provenance["peak_memory_mb"] == round(result.peak_memory_bytes / 2**20, 1) >= 0


def test_greedy_cli_writes_one_plan_per_threshold(tmp_path, tiny_adapter, tiny_spec, capsys):
    main(["greedy", "--experiment", str(DATA / "tiny-dit.yaml"), "--thresholds", "0,0.5",
          "--calibration-samples", "2", "--out", str(tmp_path)])
    plans = [load_plan(tmp_path / f"greedy-D{i}.yaml") for i in (1, 2)]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]  # after the bar
    assert [line.split(": ")[0] for line in printed] == [f"wrote {tmp_path / f'greedy-D{i}.yaml'}" for i in (1, 2)]
    assert all(f"peak memory {p.provenance['peak_memory_mb']} MiB" in line for p, line in zip(plans, printed))
    assert [p.provenance["threshold"] for p in plans] == [0.0, 0.5]
    assert plans[0].strategies() == {"full"}
    assert "search_seconds" in plans[1].provenance


def test_greedy_calibrates_on_the_calibration_seed_set_only(tmp_path, tiny_adapter, tiny_spec):
    from ditplan.plansearch.greedy_cli import write_greedy_plans
    from ditplan.rundir import GreedyDir

    (path,) = write_greedy_plans(tiny_adapter, tiny_spec, GreedyDir(tmp_path), thresholds=[0.5], calibration_samples=3,
                                 show_progress=False)
    calibration = load_plan(path).provenance["calibration"]
    _, conditions, seeds = tiny_spec.workload.seed_set("calibration", 3)
    assert calibration == {"conditions": conditions, "seeds": seeds}
    others = set(tiny_spec.seed_set("search").seeds) | set(tiny_spec.seed_set("held_out").seeds)
    assert not set(calibration["seeds"]) & others


@pytest.mark.parametrize("experiment, candidates", [("tiny-dit.yaml", CANDIDATES), ("tiny-pixart.yaml", CANDIDATES),
                                                     ("tiny-dit.yaml", ("reuse", "forecast", *CANDIDATES))])
def test_calibration_runs_in_micro_batches_of_batch_size_and_chooses_the_same_plan(experiment, candidates, monkeypatch):
    """5 calibration samples in micro-batches of 2 (2 + 2 + 1) give the plan and the losses of one batch of 5
    (block caching too: each micro-batch keeps its own block residuals)."""
    import ditplan.plansearch.greedy as greedy

    spec = load_spec(DATA / experiment)
    adapter = adapter_from_spec(spec.model, spec.workload.all_conditions())
    _, conditions, seeds = spec.workload.seed_set("calibration", 5)
    losses: list[float] = []
    rows: list[int] = []
    monkeypatch.setattr(greedy, "relative_l1", lambda a, b: losses.append(relative_l1(a, b)) or losses[-1])
    predict = adapter.predict
    monkeypatch.setattr(adapter, "predict", lambda x, *a: rows.append(len(x)) or predict(x, *a))

    def calibrate(batch_size: int) -> tuple[greedy.GreedyResult, list[float], list[int]]:
        losses.clear()
        rows.clear()
        settings = replace(spec.sampler.settings(), batch_size=batch_size)
        return greedy_search(adapter, settings, conditions, seeds, 0.05, candidates=candidates), list(losses), list(rows)

    whole, whole_losses, whole_rows = calibrate(5)
    chunked, chunked_losses, chunked_rows = calibrate(2)
    assert set(whole_rows) == {10} and set(chunked_rows) == {4, 2}  # CFG: both halves of each micro-batch
    assert sum(chunked_rows) == sum(whole_rows) == chunked.sample_forwards == whole.sample_forwards
    assert chunked.plan.grid == whole.plan.grid and chunked.plan.params == whole.plan.params
    assert len({m for row in whole.plan.grid for m in row}) > 1  # the threshold mixes full and compressed cells
    assert chunked.forwards == whole.forwards == expected_forwards(whole.plan, candidates)
    # NOTE: equal in exact arithmetic; float32 matrix products of 4 and of 10 rows round differently (≈ 1e-7)
    assert chunked_losses == pytest.approx(whole_losses, rel=1e-4, abs=1e-6)
    assert chunked.plan.provenance["peak_memory_mb"] == round(chunked.peak_memory_bytes / 2**20, 1)
