"""The one measuring path (``ditplan.evaluators.measure``): what trials, the held-out stage and ``ditplan
evaluate`` all measure through."""

import statistics

import pytest

from ditplan.evaluators import measure as measure_module
from ditplan.evaluators.measure import DENSE, measure
from ditplan.evaluators.reference import dense_reference
from ditplan.models.adapters import experiment_adapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan
from ditplan.plansearch.trial_task import trial_metrics
from ditplan.spec import load_spec
from tests.conftest import DATA


@pytest.fixture()
def spec(tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    return spec.model_copy(update={"evaluation": spec.evaluation.model_copy(
        update={"latency_repeats": 3, "cache_dir": str(tmp_path / "cache")})})


def asc_plan(adapter, settings):
    return Plan(plan_target(adapter, settings), tuple(("asc",) * adapter.num_layers for _ in range(settings.num_steps)))


def counted_runs(monkeypatch):
    """Every run_plan call the measuring path makes, as (plan name or dense, samples)."""
    calls = []
    run_plan = measure_module.run_plan

    def counted(adapter, plan, conditions, seeds, settings):
        calls.append(("plan" if plan else DENSE, len(seeds)))
        return run_plan(adapter, plan, conditions, seeds, settings)

    monkeypatch.setattr(measure_module, "run_plan", counted)
    return calls


def test_a_trial_with_a_latency_objective_runs_dense_beside_it_in_interleaved_rounds(spec, monkeypatch):
    adapter = experiment_adapter(spec)
    search_set = spec.seed_set("search")
    calls = counted_runs(monkeypatch)
    values = trial_metrics(spec, asc_plan(adapter, spec.sampler.settings()), None, search_set, ("rel_l1", "latency_ratio"))
    warm_up, timed = calls[:2], calls[2:]
    assert sorted(warm_up) == [(DENSE, 2), ("plan", 2)]  # one warm-up each
    assert len(timed) == 2 * 3 and sum(n for _, n in timed) == 2 * len(search_set.seeds)  # 3 rounds cover the set
    assert [name for name, _ in timed] == [DENSE, "plan", DENSE, "plan", "plan", DENSE]  # the order rotates
    assert values["latency_ratio_min"] <= values["latency_ratio"] <= values["latency_ratio_max"]


def test_untimed_a_plan_runs_once_against_the_given_dense_samples(spec, monkeypatch):
    adapter = experiment_adapter(spec)
    settings = spec.sampler.settings()
    search_set = spec.seed_set("search")
    dense = dense_reference(adapter, settings, search_set.conditions, search_set.seeds, spec.evaluation.cache_dir)
    calls = counted_runs(monkeypatch)
    values = trial_metrics(spec, asc_plan(adapter, settings), dense, search_set, ("rel_l1", "flops_ratio"))
    assert calls == [("plan", len(search_set.seeds))]
    assert "latency_ratio" not in values and 0 < values["flops_ratio"] < 1
    full = Plan.uniform(plan_target(adapter, settings))
    assert trial_metrics(spec, full, dense, search_set, ("rel_l1",))["rel_l1"] == 0.0  # dense itself: exactly


def test_the_latency_ratio_is_the_median_of_the_rounds_ratios(spec, monkeypatch):
    adapter = experiment_adapter(spec)
    clock = [0.0]
    durations = iter([0.0, 0.0, 1.0, 2.0, 4.0, 1.0, 2.0, 2.0])  # two warm-ups, then the runs by turn
    run_plan = measure_module.run_plan

    def scripted(*args):
        out = run_plan(*args)
        clock[0] += next(durations)
        return out

    monkeypatch.setattr(measure_module, "run_plan", scripted)
    monkeypatch.setattr(measure_module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    result = measure(adapter, spec, {"plan": asc_plan(adapter, spec.sampler.settings())}, spec.seed_set("search"),
                     metrics=(), timed=True, rounds_count=3)
    # round 0: dense 1 s, plan 2 s; round 1: dense 4 s, plan 1 s; round 2 (rotated): plan 2 s, dense 2 s
    ratios = [2 / 1, 1 / 4, 2 / 2]
    assert result.metrics["plan"]["latency_ratio"] == statistics.median(ratios)
    assert (result.metrics["plan"]["latency_ratio_min"], result.metrics["plan"]["latency_ratio_max"]) == (0.25, 2.0)
    assert result.metrics[DENSE]["latency_ratio"] == 1.0
