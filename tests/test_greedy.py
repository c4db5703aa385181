from ditplan.cli import main
from ditplan.plan import load_plan
from ditplan.search.greedy import CANDIDATES, expected_forwards, greedy_search
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


def test_greedy_cli_writes_one_plan_per_threshold(tmp_path, tiny_adapter, tiny_spec):
    main(["greedy", "--experiment", str(DATA / "tiny-dit.yaml"), "--thresholds", "0,0.5",
          "--calibration-samples", "2", "--out", str(tmp_path)])
    plans = [load_plan(tmp_path / f"greedy-D{i}.yaml") for i in (1, 2)]
    assert [p.provenance["threshold"] for p in plans] == [0.0, 0.5]
    assert plans[0].strategies() == {"full"}
    assert "search_seconds" in plans[1].provenance


def test_greedy_calibrates_on_the_calibration_seed_set_only(tmp_path, tiny_adapter, tiny_spec):
    from ditplan.search.greedy_cli import write_greedy_plans

    (path,) = write_greedy_plans(tiny_adapter, tiny_spec, tmp_path, thresholds=[0.5], calibration_samples=3,
                                 show_progress=False)
    calibration = load_plan(path).provenance["calibration"]
    _, conditions, seeds = tiny_spec.workload.seed_set("calibration", 3)
    assert calibration == {"conditions": conditions, "seeds": seeds}
    others = set(tiny_spec.seed_set("search").seeds) | set(tiny_spec.seed_set("held_out").seeds)
    assert not set(calibration["seeds"]) & others
