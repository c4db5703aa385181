"""Baselines (an experiment's ``baselines:``): built as plans through their own libraries, measured on the
held-out seeds in the held-out stage beside every other side, and set beside the learned plans in the report."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ditplan.comparison.baselines import baseline_plan, check_baselines
from ditplan.comparison.held_out import held_out_stage
from ditplan.comparison.report import RunData, build_report
from ditplan.comparison.sides import run_sides
from ditplan.errors import UserError
from ditplan.rundir import HeldOutRecord, RunDir, SideResult
from ditplan.spec import BaselineSpec


def with_baselines(spec, *baselines, samples=4):
    refine = spec.search.refine.model_copy(update={"samples": samples, "latency_repeats": 2})
    return spec.model_copy(update={"baselines": [BaselineSpec(**b) for b in baselines],
                                   "search": spec.search.model_copy(update={"refine": refine})})


def test_a_baseline_is_one_preset_and_bad_settings_are_refused_naming_it(tiny_adapter, tiny_spec):
    with pytest.raises(ValidationError, match="needs exactly one of cache and sparse"):
        BaselineSpec(name="both", cache={"method": "first_block"}, sparse={"network": "sparse/p1-s1_5"})
    plan = baseline_plan(tiny_adapter, tiny_spec, BaselineSpec(name="fbc", cache={"method": "first_block"}))
    assert plan.cache == {"method": "first_block"} and plan.strategies() == {"full"}
    with pytest.raises(UserError, match="baseline 'tc': plan cache method 'teacache' is unknown"):
        baseline_plan(tiny_adapter, tiny_spec, BaselineSpec(name="tc", cache={"method": "teacache"}))
    with pytest.raises(UserError, match=r"baseline 'mag': plan cache 'mag' needs mag_ratios .* at 4 steps"):
        check_baselines(with_baselines(tiny_spec, {"name": "mag", "cache": {"method": "mag"}}))
    with pytest.raises(UserError, match="baseline 'sd': no fine-tuned network 'sparse/p9'"):
        baseline_plan(tiny_adapter, tiny_spec, BaselineSpec(name="sd", sparse={"network": "sparse/p9"}))


def test_bad_baselines_are_refused_before_the_model_loads(tiny_spec):
    with pytest.raises(UserError, match="baseline 'fbc': plan cache 'first_block' has no field 'treshold'"):
        check_baselines(with_baselines(tiny_spec, {"name": "fbc", "cache": {"method": "first_block", "config": {"treshold": 1}}}))
    with pytest.raises(UserError, match="the name 'D2' is taken"):
        check_baselines(with_baselines(tiny_spec, {"name": "D2", "cache": {"method": "first_block"}}))
    with pytest.raises(UserError, match="the name 'a' is taken"):
        check_baselines(with_baselines(tiny_spec, {"name": "a", "cache": {"method": "first_block"}},
                                       {"name": "a", "cache": {"method": "taylorseer"}}))


def test_baselines_are_sides_of_the_held_out_stage_measured_once(tiny_adapter, tiny_spec, tmp_path):
    spec = with_baselines(tiny_spec, {"name": "never skips", "cache": {"method": "first_block", "config": {"threshold": 0.0}}},
                          {"name": "skips", "cache": {"method": "first_block", "config": {"threshold": 1e9}}})
    run = RunDir(tmp_path)
    sides = run_sides(run, spec, tiny_adapter, study=None)
    assert [(s.name, s.kind) for s in sides] == [("dense", "dense"), ("never skips", "baseline"), ("skips", "baseline")]
    record = held_out_stage(run, spec, tiny_adapter, sides)
    assert run.load_held_out() == record
    metrics = {s.name: s.metrics for s in record.sides}
    assert metrics["never skips"]["rel_l1"] == 0.0 and metrics["never skips"]["flops_ratio"] == 1.0
    assert metrics["skips"]["flops_ratio"] < 1.0
    assert (record.first_seed, record.samples, record.rounds) == (spec.seed_set("held_out").seeds[0], 4, 2)
    before = run.held_out.stat().st_mtime_ns
    assert held_out_stage(run, spec, tiny_adapter, sides) == record and run.held_out.stat().st_mtime_ns == before


def _side(name, kind, fid, latency, band=0.0):
    return SideResult(name, kind, {"fid": fid, "latency_ratio": latency, "latency_ratio_min": latency - band,
                                   "latency_ratio_max": latency + band, "rel_l1": 0.1})


def test_the_report_sets_each_baseline_beside_the_best_learned_plan_at_no_more_latency(tiny_spec, tmp_path):
    spec = tiny_spec.model_copy(update={"evaluation": tiny_spec.evaluation.model_copy(
        update={"feature_extractor": "digits", "reference": "digits-held-out"})})
    record = HeldOutRecord(20000, 8, 2, 1.0, 10, (
        _side("dense", "dense", 4.0, 1.0), _side("fast", "learned", 5.0, 0.4), _side("slow", "learned", 3.0, 0.9),
        _side("fbc", "baseline", 4.5, 0.5, 0.05), _side("tiny", "baseline", 9.0, 0.2)))
    report = build_report(RunData(RunDir(tmp_path), spec, [], {}, record))
    verdicts = {v.side: v for v in report.dominance}
    fbc, tiny = verdicts["fbc"], verdicts["tiny"]
    assert (fbc.best, fbc.best_quality, fbc.dominated, fbc.delta) == ("fast", 5.0, False, 0.5)
    assert tiny.best is None and tiny.dominated is None
    assert [r.name for r in report.of_kind("baseline")] == ["fbc", "tiny"]


def test_the_joint_quickstarts_baselines_are_plans_on_the_embedded_model(embedded_adapter):
    from ditplan.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "ditplan" / "experiments" / "quickstart-joint.yaml")
    plans = {b.name: baseline_plan(embedded_adapter, spec, b) for b in spec.baselines}
    assert [p.cache["method"] for p in plans.values() if p.cache] == ["first_block", "taylorseer"]
    assert [p.sparse["curve"]["name"] for p in plans.values() if p.sparse] == ["paper", "constant"]
