"""The comparison protocol: disjoint seed sets, constraints honoured everywhere, export rules on
held-out metrics, budgets in one unit."""

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ditplan.errors import UserError
from ditplan.evaluators.cost import sample_forwards
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, load_plan
from ditplan.report import Candidate, _shift_sentence, compare_runs, export_plans, load_run_data, select_plans, side_budget
from ditplan.search.driver import _Search, feasible_hypervolume
from ditplan.search.pareto import hypervolume, pareto_mask
from ditplan.search.tracking import default_tracking_uri
from ditplan.search.trial_eval import worker_adapter
from ditplan.spec import SpecError, load_spec
from tests.conftest import DATA

SETS = ("calibration", "search", "held_out")


@pytest.mark.parametrize("path", [DATA / "tiny-search.yaml", DATA.parent.parent / "experiments" / "quickstart.yaml",
                                  DATA.parent.parent / "experiments" / "pixart-sigma-1024.yaml"])
def test_the_three_seed_sets_are_disjoint(path):
    spec = load_spec(path)
    seeds = {name: set(spec.seed_set(name).seeds) for name in SETS}
    assert all(len(seeds[name]) == len(spec.seed_set(name).seeds) > 0 for name in SETS)
    assert not seeds["calibration"] & seeds["search"]
    assert not seeds["calibration"] & seeds["held_out"]
    assert not seeds["search"] & seeds["held_out"]


def test_overlapping_seed_sets_are_refused_in_one_line(tmp_path):
    data = yaml.safe_load((DATA / "tiny-search.yaml").read_text())
    data["workload"]["held_out_seed"] = data["workload"]["seed"] + 2  # inside the 4 calibration samples
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"the calibration seeds 0…\d+ overlap the held_out seeds 2…"):
        load_spec(tmp_path / "bad.yaml")


def test_held_out_prompts_replace_the_workload_prompts_on_held_out_seeds_only():
    spec = load_spec(DATA.parent.parent / "experiments" / "pixart-sigma-1024.yaml")
    held = spec.seed_set("held_out").conditions
    assert set(held) == set(spec.workload.held_out_prompts)
    assert not set(held) & set(spec.seed_set("search").conditions)
    assert set(spec.workload.all_prompts()) == set(spec.workload.prompts) | set(held)


# --- constraints ------------------------------------------------------------------------------------
CONSTRAINED = [  # name, rel_l1, flops_ratio, mse (constraint: mse <= 0.5), the plan's method everywhere
    ("best-but-infeasible", 0.01, 0.30, 0.9, "asc"),
    ("a", 0.05, 0.60, 0.1, "full"),
    ("b", 0.10, 0.40, 0.1, "ast"),
    ("a-again", 0.05, 0.60, 0.1, "full"),  # the sampler proposed a's plan again
]


@pytest.fixture(scope="module")
def constrained_run(tmp_path_factory):
    """A run whose study holds an infeasible trial that dominates every feasible one."""
    root = tmp_path_factory.mktemp("constrained")
    data = yaml.safe_load((DATA / "tiny-search.yaml").read_text())
    data["search"]["constraints"] = [{"metric": "mse", "max": 0.5}]
    data["search"]["refine"] = {"metrics": ["rel_l1", "latency_ratio"], "samples": 4, "latency_repeats": 2}
    data["evaluation"] = {"cache_dir": str(root / "cache")}
    (root / "experiment.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(root / "experiment.yaml")
    (root / "search").mkdir()
    driver = _Search(spec, root / "search", resume=False)
    target = plan_target(driver.adapter, spec.sampler.settings())
    for name, rel_l1, flops, mse, method in CONSTRAINED:
        trial = driver.study.ask()
        trial.set_user_attr("name", name)
        values = {"rel_l1": rel_l1, "flops_ratio": flops, "mse": mse}
        grid = ((("full",) * target.num_layers,) + ((method,) * target.num_layers,) * (target.num_steps - 1))
        driver.record_complete(trial, Plan(target, grid, provenance={"name": name}), values)
    front = driver.publish_front()
    driver.refine(front)
    driver.tracker.finish()
    return spec, root, driver, front


def test_the_constraint_binds(constrained_run):
    values = np.array([[r, f] for _, r, f, _, _ in CONSTRAINED])
    assert pareto_mask(values, ["minimize", "minimize"]).tolist() == [True, False, False, False]


def test_an_infeasible_trial_is_on_no_front_in_no_hypervolume_and_never_refined(constrained_run):
    spec, root, driver, front = constrained_run
    assert sorted(t.user_attrs["name"] for t in front) == ["a", "a-again", "b"]
    done = driver.study.get_trials()
    feasible_values = np.array([[r, f] for _, r, f, _, _ in CONSTRAINED[1:]])
    reference = [0.5, 1.0]
    assert feasible_hypervolume(done, ["minimize", "minimize"], reference) == hypervolume(feasible_values, ["minimize"] * 2, reference)
    assert "| 0 | best-but-infeasible | 0.01 | 0.3 | no |  |" in (root / "search" / "pareto_front.md").read_text()
    run = load_run_data(root)
    assert {c.name for c in run.candidates if c.held_out} == {"a", "b"}  # kept and shown, but not refined;
    # a-again runs a's plan: measured once


def test_an_infeasible_trial_is_not_tagged_pareto_in_mlflow(constrained_run):
    _, root, _, _ = constrained_run
    client = MlflowClient(default_tracking_uri(root / "search"))
    runs = client.search_runs([client.get_experiment_by_name("ditplan").experiment_id])
    tags = {r.data.tags["ditplan.trial"]: r.data.tags["pareto"] for r in runs if "ditplan.trial" in r.data.tags}
    assert tags == {"0": "false", "1": "true", "2": "true", "3": "true"}


@pytest.mark.parametrize("rule", ["knee", "top:3", "fastest:rel_l1<=10", "best:latency_ratio<=100"])
def test_an_infeasible_trial_is_never_exported(constrained_run, rule, tmp_path):
    _, root, _, _ = constrained_run
    paths = export_plans(root, rule, tmp_path)
    assert paths and all(load_plan(p).provenance["name"] in {"a", "b"} for p in paths)


def test_the_report_shows_the_infeasible_trial_outside_the_front(constrained_run, tmp_path):
    _, root, _, _ = constrained_run
    report = compare_runs([root], tmp_path).read_text()
    assert "| learned | 4 | 1 | 3 |" in report  # 4 plans, 1 infeasible, a front of 3


def test_a_bound_relative_to_dense_is_on_the_excess_over_dense():
    from ditplan.spec import ConstraintSpec

    no_worse = ConstraintSpec(metric="kid", max=0.0, relative_to="dense")
    assert no_worse.violation(0.75, dense=0.5) == 0.25 and no_worse.violation(0.25, dense=0.5) == -0.25
    at_least = ConstraintSpec(metric="class_agreement", min=-0.25, relative_to="dense")
    assert at_least.violation(0.5, dense=1.0) == 0.25 and at_least.violation(1.0, dense=1.0) == -0.25
    assert ConstraintSpec(metric="kid", max=0.0).violation(0.75, dense=0.5) == 0.75  # absolute: dense plays no part
    with pytest.raises(ValueError, match="relative to dense: give dense's kid"):
        no_worse.violation(0.75)


@pytest.fixture(scope="module")
def kid_driver(tmp_path_factory):
    """A driver of the embedded model (4 steps, 4 search samples) searching KID × FLOPs with KID no worse than
    dense's on the same samples; the real reference is a folder of 24 held-out digits."""
    from PIL import Image

    from ditplan.models.digits import load_digits, to_uint8_rgb

    root = tmp_path_factory.mktemp("kid")
    (root / "real").mkdir()
    for i, image in enumerate(to_uint8_rgb(load_digits("held_out")[0][:24])):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / "real" / f"{i}.png")
    data = {"name": "kid", "model": {"kind": "dit", "source": "embedded", "device": "cpu"},
            "sampler": {"num_steps": 4, "batch_size": 4}, "workload": {"classes": [1, 2, 3, 4]},
            "evaluation": {"feature_extractor": "digits", "reference": "real", "cache_dir": str(root / "cache")},
            "search": {"samples": 4, "objectives": [{"metric": "kid"}, {"metric": "flops_ratio"}],
                       "constraints": [{"metric": "kid", "max": 0.0, "relative_to": "dense"}],
                       "reference_point": [1.0, 1.0], "refine": None}}
    (root / "experiment.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(root / "experiment.yaml")
    return spec, _Search(spec, root / "search", resume=False)


def test_dense_kid_is_measured_on_the_search_samples_by_the_path_trials_take(kid_driver):
    from ditplan.search.trial_eval import plan_metrics

    spec, driver = kid_driver
    dense = driver.dense_values[4]
    target = plan_target(driver.adapter, spec.sampler.settings())
    full = plan_metrics(driver.adapter, spec, Plan.uniform(target), driver.dense, driver.conditions, driver.seeds, ("kid",))
    assert full["kid"] == dense["kid"]  # an all-full plan samples exactly dense's samples
    assert dense["flops_ratio"] == 1.0 and dense["rel_l1"] == 0.0


def test_a_trial_is_feasible_by_its_kid_over_dense_not_by_its_kid(kid_driver):
    spec, driver = kid_driver
    dense_kid = driver.dense_values[4]["kid"]
    assert abs(dense_kid) > 0.01  # else an absolute bound at 0 would decide the same
    target = plan_target(driver.adapter, spec.sampler.settings())
    plan = Plan.uniform(target)
    for name, kid in (("worse", dense_kid + 0.01), ("better", dense_kid - 0.01)):
        trial = driver.study.ask()
        trial.set_user_attr("name", name)
        driver.record_complete(trial, plan, {"kid": kid, "flops_ratio": 0.5})
    feasible = {t.user_attrs["name"]: all(v <= 0 for v in t.constraints.values()) for t in driver.study.get_trials()}
    assert feasible == {"worse": False, "better": True}
    driver.publish_front()
    assert f"dense on the same 4 search samples: kid {dense_kid:.4g}, flops_ratio 1" in (
        driver.run_dir / "pareto_front.md").read_text()


# --- export rules on held-out metrics ---------------------------------------------------------------
def _candidate(name: str, search: dict, held_out: dict, feasible: bool = True) -> Candidate:
    return Candidate("run", 0, name, "search", search, held_out, feasible, None, None, Path(f"{name}.yaml"))


def test_fastest_with_unrefined_trials_returns_the_truly_fastest_qualifying_plan():
    spec = load_spec(DATA / "tiny-search.yaml")
    candidates = [
        _candidate("unrefined", {"rel_l1": 0.01, "flops_ratio": 0.1}, {}),  # first: NaN would win a min()
        _candidate("slow", {"rel_l1": 0.02}, {"rel_l1": 0.02, "latency_ratio": 0.9}),
        _candidate("fast", {"rel_l1": 0.03}, {"rel_l1": 0.04, "latency_ratio": 0.5}),
        _candidate("fastest-but-bad", {"rel_l1": 0.03}, {"rel_l1": 0.20, "latency_ratio": 0.3}),
        _candidate("infeasible", {"rel_l1": 0.01}, {"rel_l1": 0.01, "latency_ratio": 0.2}, feasible=False),
    ]
    with pytest.warns(UserWarning, match="1 feasible plans were not measured on the held-out seeds"):
        (chosen,) = select_plans(spec, candidates, "fastest:rel_l1<=0.05")
    assert chosen.name == "fast"
    assert math.isnan(candidates[0].value("latency_ratio"))


def test_a_learned_plan_that_is_dense_on_the_search_seeds_leaves_the_shift_sentence_to_the_others():
    measured = [_candidate("dense-proposal", {"rel_l1": 0.0}, {"rel_l1": 0.0}),  # the first proxy proposal
                _candidate("a", {"rel_l1": 0.10}, {"rel_l1": 0.11}), _candidate("b", {"rel_l1": 0.20}, {"rel_l1": 0.30})]
    assert "a median +30.0% from the search seeds to the held-out seeds (2 plans not dense" in _shift_sentence(measured)


def test_export_rules_refuse_a_run_without_held_out_metrics():
    spec = load_spec(DATA / "tiny-search.yaml")
    with pytest.raises(UserError, match="held-out"):
        select_plans(spec, [_candidate("x", {"rel_l1": 0.1}, {})], "knee")


# --- budgets in one unit ----------------------------------------------------------------------------
def test_budgets_of_sides_with_different_batch_sizes_come_out_in_sample_forwards(tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    settings = spec.sampler.settings()
    plan_dir = tmp_path
    target = Plan.uniform(plan_target(worker_adapter(spec), settings))
    # greedy calibrated on 3 samples: 10 transformer calls of 6 rows each (CFG) = 60 sample-forwards
    greedy = target.with_provenance(name="D1", search="greedy", transformer_forwards=10, search_seconds=2.0,
                                    calibration={"conditions": [1, 2, 3], "seeds": [0, 1, 2]})
    greedy.save(plan_dir / "g.yaml")
    learned = target.with_provenance(name="t0")
    learned.save(plan_dir / "l.yaml")
    cands = [Candidate("r", 0, "D1", "greedy", {}, {}, True, None, None, plan_dir / "g.yaml"),
             Candidate("r", 1, "t0", "search", {}, {}, True, None, None, plan_dir / "l.yaml"),
             Candidate("r", 2, "t1", "search", {}, {}, True, None, None, plan_dir / "l.yaml")]
    per_evaluation = spec.search.samples * 2 * spec.sampler.num_steps  # 4 samples × 2 CFG rows × 4 steps
    assert sample_forwards(spec.search.samples, settings) == per_evaluation == 32
    g, s = side_budget(spec, "greedy", cands), side_budget(spec, "search", cands)
    assert (g.calibration_forwards, g.evaluation_forwards, g.forwards) == (60, 32, 92)
    assert (s.calibration_forwards, s.evaluation_forwards, s.forwards) == (0, 64, 64)
    # how the evaluation rows are batched does not change the count
    rebatched = spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"batch_size": 1})})
    assert side_budget(rebatched, "search", cands) == s


def test_plans_that_run_the_same_tokens_are_measured_once(tmp_path):
    from optuna.trial import create_trial

    from ditplan.search.refine import distinct_plans
    from ditplan.strategies.curves import CURVES
    from ditplan.strategies.sdtm import SparseLayout

    target = Plan.uniform(plan_target(worker_adapter(load_spec(DATA / "tiny-search.yaml")),
                                      load_spec(DATA / "tiny-search.yaml").sampler.settings())).target
    flat = {"constant": {"r": 0.5}, "linear": {"r_start": 0.5, "r_end": 0.5}, "linear-2": {"r_start": 0.5, "r_end": 0.9}}
    trials = []
    for number, (name, rates) in enumerate(flat.items()):
        layout = SparseLayout(((0, 2),), CURVES[name.split("-")[0]](**rates), None, 0)
        plan = Plan(target, tuple(tuple(row) for row in Plan.uniform(target).grid), sparse=layout.to_dict())
        plan.save(tmp_path / f"trial-{number:04d}.yaml")
        trials.append(create_trial(values=[0.0], user_attrs={"name": name}))
        trials[-1].number = number
    assert list(distinct_plans(trials, tmp_path)) == ["constant", "linear-2"]  # constant ≡ linear 0.5 → 0.5


def test_no_plan_runs_first_in_every_round(tiny_adapter, tiny_spec, monkeypatch):
    """A fixed order favoured whoever followed dense; rotated turns put every plan at other places."""
    import torch

    from ditplan.evaluators import held_out
    from ditplan.evaluators.cost import Flops
    from ditplan.spec import SeedSet

    order = []

    class Run:
        def __init__(self, seeds):
            self.samples = torch.zeros(len(seeds), 1, 2, 2)

    def fake_run_plan(adapter, plan, conditions, seeds, settings):
        order.append(plan)
        return Run(seeds)

    monkeypatch.setattr(held_out, "run_plan", fake_run_plan)
    monkeypatch.setattr(held_out, "run_flops", lambda *args: Flops(1.0, 1.0))
    plans = {name: name for name in ("dense", "a", "b", "c", "d", "e")}
    seed_set = SeedSet("held_out", [1] * 12, list(range(12)))
    samples, seconds, _ = held_out._timed_rounds(tiny_adapter, tiny_spec, plans, seed_set, 4)
    timed = order[len(plans):]  # after the warm-up
    per_round = [timed[i * len(plans):(i + 1) * len(plans)] for i in range(4)]
    assert all(sorted(r) == sorted(plans) for r in per_round)
    assert [r.index("dense") for r in per_round] == [0, 5, 3, 2]  # shifts of 0, 1, 3, 4 places: 6 × i // 4
    assert len({r[0] for r in per_round}) == 4
    assert all(len(v) == 4 for v in seconds.values()) and all(s.shape[0] == 12 for s in samples.values())


def test_interleaved_times_rotate_the_turns():
    import torch

    from ditplan.evaluators.cost import interleaved_times

    order = []
    runs = {name: (lambda name=name: order.append(name)) for name in ("dense", "plan")}
    times = interleaved_times(runs, torch.device("cpu"), 4)
    assert order == ["dense", "plan", "dense", "plan", "plan", "dense", "plan", "dense"]  # each first in 2 of 4
    assert all(len(t) == 4 for t in times.values())


def test_a_held_out_metric_that_is_not_a_number_is_one_line(tmp_path, monkeypatch):
    from ditplan.evaluators.held_out import HeldOutResult
    from ditplan.search import refine
    from ditplan.spec import SeedSet

    data = yaml.safe_load((DATA / "tiny-search.yaml").read_text())
    data["search"]["refine"] = {"metrics": ["rel_l1", "latency_ratio"], "samples": 4, "latency_repeats": 2}
    data["evaluation"] = {"cache_dir": str(tmp_path / "cache")}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(tmp_path / "experiment.yaml")
    driver = _Search(spec, tmp_path, resume=False)
    target = plan_target(driver.adapter, spec.sampler.settings())
    trial = driver.study.ask()
    driver.record_complete(trial, Plan(target, (("full",) * target.num_layers,) * target.num_steps),
                           {"rel_l1": 0.1, "flops_ratio": 0.5})
    nan = {"rel_l1": float("nan"), "latency_ratio": 0.5}
    monkeypatch.setattr(refine, "held_out_metrics", lambda adapter, spec, plans: HeldOutResult(
        SeedSet("held_out", [1] * 4, [0, 1, 2, 3]), {"dense": nan, **dict.fromkeys(plans, nan)}, 1.0, 10))
    with pytest.raises(UserError, match="held-out rel_l1 of trial-0 is not a number on 4 samples; raise search.refine"):
        refine.refine_front(spec, driver.storage, spec.name, driver.study.get_trials(), tmp_path / "trials")
