"""A search trial's metrics as its Ray task computes them."""

import torch

from ditplan.evaluators.reference import dense_reference
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan
from ditplan.search import trial_eval
from ditplan.spec import load_spec
from tests.conftest import DATA


def test_a_latency_objective_is_the_median_of_the_experiments_latency_repeats(monkeypatch, tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    spec = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(
        update={"latency_repeats": 3, "cache_dir": str(tmp_path / "cache")})})
    adapter = trial_eval.worker_adapter(spec)
    settings = spec.sampler.settings()
    _, conditions, seeds = spec.seed_set("search")
    dense = dense_reference(adapter, settings, conditions[:2], seeds[:2], spec.evaluation.cache_dir)
    plan = Plan(plan_target(adapter, settings), tuple(("asc",) * adapter.num_layers for _ in range(settings.num_steps)))
    dense_runs, plan_runs = [], []
    run_plan = trial_eval.run_plan

    def counted(adapter, plan, *args):
        (plan_runs if plan else dense_runs).append(1)
        return run_plan(adapter, plan, *args)

    monkeypatch.setattr(trial_eval, "run_plan", counted)
    monkeypatch.setattr(trial_eval, "_WORKER_DENSE_SECONDS", {})
    threads = torch.get_num_threads()
    try:
        values = trial_eval.evaluate_in_worker(spec, plan, dense, conditions[:2], seeds[:2], ("rel_l1", "latency_ratio"), 1)
    finally:
        torch.set_num_threads(threads)
    assert len(plan_runs) == 1 + 3  # the scored run (also the warm-up), then 3 timed
    assert len(dense_runs) == 1 + 3  # a warm-up, then 3 timed (once per worker)
    assert values["latency_ratio"] > 0
