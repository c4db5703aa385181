"""The comparison protocol: disjoint seed sets, constraints honoured everywhere, export rules on
held-out metrics, budgets in one unit."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ditplan.comparison.export import export_plans, select_plans
from ditplan.comparison.held_out import held_out_stage
from ditplan.comparison.render import front_table
from ditplan.comparison.report import RunData, TrialRecord, build_report, load_run_data, side_budgets
from ditplan.comparison.runs import compare_runs
from ditplan.comparison.sides import run_sides
from ditplan.errors import UserError
from ditplan.evaluators.cost import sample_forwards
from ditplan.evaluators.measure import Measurement
from ditplan.models.adapters import experiment_adapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, load_plan
from ditplan.plansearch.driver import dense_on_search_seeds
from ditplan.plansearch.pareto import hypervolume, pareto_mask
from ditplan.plansearch.records import feasible_hypervolume
from ditplan.plansearch.storage import load_finished_study
from ditplan.plansearch.trial_task import trial_metrics
from ditplan.rundir import HeldOutRecord, RunDir, SearchDir, SideResult
from ditplan.spec import SpecError, load_spec
from tests.conftest import DATA
from tests.studies import hand_study, uniform_after_dense

SETS = ("calibration", "search", "held_out")


@pytest.mark.parametrize("path", [DATA / "tiny-search.yaml", DATA.parent.parent / "ditplan" / "experiments" / "quickstart.yaml",
                                  DATA.parent.parent / "ditplan" / "experiments" / "pixart-sigma-1024.yaml"])
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
    spec = load_spec(DATA.parent.parent / "ditplan" / "experiments" / "pixart-sigma-1024.yaml")
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


def constrained_experiment(root, constraint):
    data = yaml.safe_load((DATA / "tiny-search.yaml").read_text())
    data["search"]["constraints"] = [constraint]
    data["search"]["refine"] = {"metrics": ["rel_l1", "latency_ratio"], "samples": 4, "latency_repeats": 2}
    data["evaluation"] = {"cache_dir": str(root / "cache")}
    data["output_dir"] = str(root)
    (root / "experiment.yaml").write_text(yaml.safe_dump(data))
    return load_spec(root / "experiment.yaml")


@pytest.fixture(scope="module")
def constrained_run(tmp_path_factory):
    """A run whose study holds an infeasible trial that dominates every feasible one, measured on the
    held-out seeds as ``ditplan run`` does."""
    root = tmp_path_factory.mktemp("constrained")
    spec = constrained_experiment(root, {"metric": "mse", "max": 0.5})
    run = RunDir(root)
    hand = hand_study(spec, run, dense={4: {"mse": 0.0}})
    for name, rel_l1, flops, mse, method in CONSTRAINED:
        hand.record(name, uniform_after_dense(spec, method).with_provenance(name=name),
                    {"rel_l1": rel_l1, "flops_ratio": flops, "mse": mse})
    front, rows = hand.publish()
    hand.recorder.tracker.finish()
    adapter = experiment_adapter(spec)
    held_out_stage(run, spec, adapter, run_sides(run, spec, adapter, load_finished_study(spec, run.search)))
    return spec, run, hand, front, rows


def test_the_constraint_binds(constrained_run):
    values = np.array([[r, f] for _, r, f, _, _ in CONSTRAINED])
    assert pareto_mask(values, ["minimize", "minimize"]).tolist() == [True, False, False, False]


def test_an_infeasible_trial_is_on_no_front_in_no_hypervolume_and_never_measured_on_held_out_seeds(constrained_run):
    spec, run, hand, front, rows = constrained_run
    assert sorted(t.user_attrs["name"] for t in front) == ["a", "a-again", "b"]
    feasible_values = np.array([[r, f] for _, r, f, _, _ in CONSTRAINED[1:]])
    reference = [0.5, 1.0]
    assert feasible_hypervolume(hand.study.get_trials(), ["minimize"] * 2, reference) == hypervolume(
        feasible_values, ["minimize"] * 2, reference)
    table = front_table(rows, ["rel_l1", "flops_ratio"], {"rel_l1": 0.0, "flops_ratio": 1.0}, 4)
    assert "| 0 | best-but-infeasible |  | 0.01 | 0.3 | no |  |" in table
    record = run.load_held_out()
    assert [(s.name, s.kind) for s in record.sides] == [("dense", "dense"), ("a", "learned"), ("b", "learned")]
    # a-again runs a's plan: measured once; the infeasible trial: never


def test_an_infeasible_trial_is_not_tagged_pareto_in_mlflow(constrained_run):
    _, run, _, _, _ = constrained_run
    client = MlflowClient(run.search.tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("ditplan").experiment_id])
    tags = {r.data.tags["ditplan.trial"]: r.data.tags["pareto"] for r in runs if "ditplan.trial" in r.data.tags}
    assert tags == {"0": "false", "1": "true", "2": "true", "3": "true"}


@pytest.mark.parametrize("rule", ["knee", "top:3", "fastest:rel_l1<=10", "best:latency_ratio<=100"])
def test_an_infeasible_trial_is_never_exported(constrained_run, rule, tmp_path):
    _, run, _, _, _ = constrained_run
    paths = export_plans(run.root, rule, tmp_path)
    assert paths and all(load_plan(p).provenance["name"] in {"a", "b"} for p in paths)


def test_the_report_counts_the_infeasible_trial_outside_the_front(constrained_run, tmp_path):
    _, run, _, _, _ = constrained_run
    report = build_report(load_run_data(run.root))
    (learned,) = report.fronts
    assert (learned.label, learned.plans, learned.infeasible, learned.front) == ("learned", 4, 1, 3)
    assert compare_runs([run.root], tmp_path).exists() and (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_a_constraint_no_plan_meets_is_said_by_the_report_and_export_refuses_in_one_line(tmp_path):
    spec = constrained_experiment(tmp_path, {"metric": "rel_l1", "max": 0.001})
    run = RunDir(tmp_path)
    hand = hand_study(spec, run, dense={4: {"rel_l1": 0.0}})
    hand.record("a", uniform_after_dense(spec, "ast"), {"rel_l1": 0.05, "flops_ratio": 0.6})
    adapter = experiment_adapter(spec)
    held_out_stage(run, spec, adapter, run_sides(run, spec, adapter, hand.study))
    report = build_report(load_run_data(run.root))
    assert report.feasible_learned == [] and [r.kind for r in report.rows] == ["dense"]
    with pytest.raises(UserError, match=r"^no feasible plan: none meets the constraints \(rel_l1 ≤ 0.001\)"):
        export_plans(run.root, "knee", tmp_path / "out")
    assert "**No feasible plan:**" in compare_runs([run.root], tmp_path / "report").read_text()


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
def kid_spec(tmp_path_factory):
    """The embedded model (4 steps, 4 search samples) searching KID × FLOPs with KID no worse than dense's on
    the same samples; the real reference is a folder of 24 held-out digits."""
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
                       "reference_point": [1.0, 1.0], "refine": None}, "output_dir": str(root / "run")}
    (root / "experiment.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(root / "experiment.yaml")
    return spec, dense_on_search_seeds(experiment_adapter(spec), spec)


def test_dense_kid_is_measured_on_the_search_samples_by_the_path_trials_take(kid_spec):
    spec, dense = kid_spec
    full = Plan.uniform(plan_target(experiment_adapter(spec), spec.sampler.settings()))
    assert trial_metrics(spec, full, dense.samples[4], spec.seed_set("search"), ("kid",))["kid"] == dense.values[4]["kid"]
    assert dense.values[4]["flops_ratio"] == 1.0 and dense.values[4]["rel_l1"] == 0.0


def test_a_trial_is_feasible_by_its_kid_over_dense_not_by_its_kid(kid_spec):
    spec, dense = kid_spec
    dense_kid = dense.values[4]["kid"]
    assert abs(dense_kid) > 0.01  # else an absolute bound at 0 would decide the same
    hand = hand_study(spec, RunDir.of(spec), dense.values)
    plan = Plan.uniform(plan_target(experiment_adapter(spec), spec.sampler.settings()))
    for name, kid in (("worse", dense_kid + 0.01), ("better", dense_kid - 0.01)):
        hand.record(name, plan, {"kid": kid, "flops_ratio": 0.5})
    feasible = {t.user_attrs["name"]: all(v <= 0 for v in t.constraints.values()) for t in hand.study.get_trials()}
    assert feasible == {"worse": False, "better": True}
    _, rows = hand.publish()
    assert f"dense on the same 4 search samples: kid {dense_kid:.4g}, flops_ratio 1" in front_table(
        rows, ["kid", "flops_ratio"], dense.values[4], 4)


# --- export rules on held-out metrics ---------------------------------------------------------------
def _side(name: str, held_out: dict, kind: str = "learned", trial: int | None = None) -> SideResult:
    return SideResult(name, kind, held_out, f"{name}.yaml", trial)


def _report(spec, sides, trials=()):
    record = HeldOutRecord(20000, 4, 2, 1.0, 10, (_side("dense", {"rel_l1": 0.0, "latency_ratio": 1.0}, "dense"), *sides))
    return build_report(RunData(RunDir(Path("unused")), spec, list(trials), {}, record))


def _trial(number, name, search, folder=Path("unused"), feasible=True):
    """A learned trial's record; its plan file (read for the networks it runs on) is a dense plan in ``folder``."""
    path = folder / f"{name}.yaml"
    if folder.exists():
        spec = load_spec(DATA / "tiny-search.yaml")
        Plan.uniform(plan_target(experiment_adapter(spec), spec.sampler.settings())).save(path)
    return TrialRecord(number, name, None, search, 4, feasible, False, None, None, path)


def test_fastest_reads_held_out_metrics_and_leaves_out_plans_without_them():
    spec = load_spec(DATA / "tiny-search.yaml")
    report = _report(spec, [
        _side("no-latency", {"rel_l1": 0.01}),  # its latency did not come out a number: left out, not won by NaN
        _side("slow", {"rel_l1": 0.02, "latency_ratio": 0.9}),
        _side("fast", {"rel_l1": 0.04, "latency_ratio": 0.5}),
        _side("fastest-but-bad", {"rel_l1": 0.20, "latency_ratio": 0.3})])
    with pytest.warns(UserWarning, match="1 feasible plans have no held-out rel_l1, latency_ratio"):
        (chosen,) = select_plans(report, "fastest:rel_l1<=0.05")
    assert chosen.name == "fast"


def test_a_learned_plan_that_is_dense_on_the_search_seeds_leaves_the_shift_to_the_others(tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    trials = [_trial(n, name, {"rel_l1": l1, "flops_ratio": 0.5}, tmp_path) for n, (name, l1) in enumerate(
        [("dense-proposal", 0.0), ("a", 0.10), ("b", 0.20)])]
    report = _report(spec, [_side("dense-proposal", {"rel_l1": 0.0}, trial=0), _side("a", {"rel_l1": 0.11}, trial=1),
                            _side("b", {"rel_l1": 0.30}, trial=2)], trials)
    (shift,) = report.shifts
    assert (shift.side, shift.plans) == ("learned", 2) and shift.change == pytest.approx(0.3)


def test_export_rules_refuse_a_run_without_held_out_metrics(tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    report = build_report(RunData(RunDir(tmp_path), spec, [_trial(0, "x", {"rel_l1": 0.1, "flops_ratio": 0.5}, tmp_path)],
                                  {}, None))
    with pytest.raises(UserError, match="held-out"):
        select_plans(report, "knee")


# --- budgets in one unit ----------------------------------------------------------------------------
def test_budgets_of_sides_with_different_batch_sizes_come_out_in_sample_forwards(tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    settings = spec.sampler.settings()
    target = Plan.uniform(plan_target(experiment_adapter(spec), settings))
    # greedy calibrated on 3 samples: 10 transformer calls of 6 rows each (CFG) = 60 sample-forwards
    greedy = target.with_provenance(name="D1", search="greedy", transformer_forwards=10, search_seconds=2.0,
                                    calibration={"conditions": [1, 2, 3], "seeds": [0, 1, 2]})
    trials = [TrialRecord(0, "D1", "greedy", {}, 4, True, False, None, None, tmp_path / "g.yaml"),
              _trial(1, "t0", {}, tmp_path), _trial(2, "t1", {}, tmp_path)]
    per_evaluation = spec.search.samples * 2 * spec.sampler.num_steps  # 4 samples × 2 CFG rows × 4 steps
    assert sample_forwards(spec.search.samples, settings) == per_evaluation == 32

    def budgets(spec):
        return {b.side: b for b in side_budgets(RunData(RunDir(tmp_path), spec, trials, {"D1": greedy}, None))}
    g, s = budgets(spec)["greedy"], budgets(spec)["learned"]
    assert (g.calibration_forwards, g.evaluation_forwards, g.forwards) == (60, 32, 92)
    assert (s.calibration_forwards, s.evaluation_forwards, s.forwards) == (0, 64, 64)
    # how the evaluation rows are batched does not change the count
    rebatched = spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"batch_size": 1})})
    assert budgets(rebatched)["learned"] == s


def test_plans_that_run_the_same_tokens_are_measured_once(tmp_path):
    from optuna.trial import create_trial

    from ditplan.plansearch.records import distinct_plans
    from ditplan.strategies.curves import CURVES
    from ditplan.strategies.sdtm import SparseLayout

    spec = load_spec(DATA / "tiny-search.yaml")
    target = plan_target(experiment_adapter(spec), spec.sampler.settings())
    flat = {"constant": {"r": 0.5}, "linear": {"r_start": 0.5, "r_end": 0.5}, "linear-2": {"r_start": 0.5, "r_end": 0.9}}
    trials = []
    search_dir = SearchDir(tmp_path)
    for number, (name, rates) in enumerate(flat.items()):
        layout = SparseLayout(((0, 2),), CURVES[name.split("-")[0]](**rates), None, 0)
        search_dir.save_trial(number, Plan(target, Plan.uniform(target).grid, sparse=layout.to_dict()))
        trials.append(create_trial(values=[0.0], user_attrs={"name": name}))
        trials[-1].number = number
    assert list(distinct_plans(trials, search_dir)) == ["constant", "linear-2"]  # constant ≡ linear 0.5 → 0.5


def test_no_plan_runs_first_in_every_round(tiny_adapter, tiny_spec, monkeypatch):
    """A fixed order favoured whoever followed dense; rotated turns put every plan at other places."""
    import torch

    from ditplan.evaluators import measure
    from ditplan.evaluators.cost import Flops
    from ditplan.progress import progress_bar
    from ditplan.spec import SeedSet

    order = []

    class Run:
        def __init__(self, seeds):
            self.samples = torch.zeros(len(seeds), 1, 2, 2)
            self.peak_cache_bytes = 0

    def fake_run_plan(adapter, plan, conditions, seeds, settings):
        order.append(plan)
        return Run(seeds)

    monkeypatch.setattr(measure, "run_plan", fake_run_plan)
    monkeypatch.setattr(measure, "run_flops", lambda *args: Flops(1.0, 1.0))
    plans = {name: name for name in ("dense", "a", "b", "c", "d", "e")}
    seed_set = SeedSet("held_out", [1] * 12, list(range(12)))
    with progress_bar(1, "", enabled=False) as bar:
        runs = measure._run_rounds(tiny_adapter, tiny_spec, plans, seed_set, 4, True, bar)
    timed = order[len(plans):]  # after the warm-up
    per_round = [timed[i * len(plans):(i + 1) * len(plans)] for i in range(4)]
    assert all(sorted(r) == sorted(plans) for r in per_round)
    assert [r.index("dense") for r in per_round] == [0, 5, 3, 2]  # shifts of 0, 1, 3, 4 places: 6 × i // 4
    assert len({r[0] for r in per_round}) == 4
    assert all(len(v) == 4 for v in runs.seconds.values()) and all(s.shape[0] == 12 for s in runs.samples.values())


def test_interleaved_times_rotate_the_turns():
    import torch

    from ditplan.evaluators.cost import interleaved_times

    order = []
    runs = {name: (lambda name=name: order.append(name)) for name in ("dense", "plan")}
    times = interleaved_times(runs, torch.device("cpu"), 4)
    assert order == ["dense", "plan", "dense", "plan", "plan", "dense", "plan", "dense"]  # each first in 2 of 4
    assert all(len(t) == 4 for t in times.values())


def test_a_held_out_metric_that_is_not_a_number_is_one_line(tmp_path, monkeypatch, tiny_adapter):
    from ditplan.comparison import held_out
    from ditplan.comparison.sides import Side
    from ditplan.spec import SeedSet

    spec = constrained_experiment(tmp_path, {"metric": "rel_l1", "max": 1.0})
    nan = {"rel_l1": float("nan"), "latency_ratio": 0.5}
    monkeypatch.setattr(held_out, "measure", lambda adapter, spec, plans, *a, **k: Measurement(
        SeedSet("held_out", [1] * 4, [0, 1, 2, 3]), {"dense": nan, **dict.fromkeys(plans, nan)}, 1.0, 10))
    sides = [Side("dense", "dense", None), Side("trial-0", "learned", uniform_after_dense(spec, "full"))]
    with pytest.raises(UserError, match="held-out rel_l1 of dense is not a number on 4 samples; raise search.refine"):
        held_out.held_out_stage(RunDir(tmp_path), spec, tiny_adapter, sides)
    assert not RunDir(tmp_path).held_out.exists()
