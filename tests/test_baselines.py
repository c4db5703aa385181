"""Baselines (an experiment's ``baselines:``): built as plans through their own libraries, measured on the
held-out seeds, and set beside the learned plans by ``ditplan compare``."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from ditplan.errors import UserError
from ditplan.evaluators.held_out import DENSE
from ditplan.report import Candidate, Run, _dominance_lines, _headline_lines
from ditplan.search.baselines import BASELINES_FILE, baseline_plan, load_baselines, measure_baselines
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
    with pytest.raises(UserError, match="baseline 'mag': plan cache method 'mag' is unknown"):
        baseline_plan(tiny_adapter, tiny_spec, BaselineSpec(name="mag", cache={"method": "mag"}))
    with pytest.raises(UserError, match="baseline 'sd': no fine-tuned network 'sparse/p9'"):
        baseline_plan(tiny_adapter, tiny_spec, BaselineSpec(name="sd", sparse={"network": "sparse/p9"}))


def test_baselines_are_measured_once_on_the_held_out_seeds(tiny_adapter, tiny_spec, tmp_path):
    spec = with_baselines(tiny_spec, {"name": "never skips", "cache": {"method": "first_block", "config": {"threshold": 0.0}}},
                          {"name": "skips", "cache": {"method": "first_block", "config": {"threshold": 1e9}}})
    path = measure_baselines(tiny_adapter, spec, tmp_path)
    assert path == tmp_path / BASELINES_FILE
    metrics = load_baselines(tmp_path)
    assert list(metrics) == [DENSE, "never skips", "skips"]
    assert metrics["never skips"]["rel_l1"] == 0.0 and metrics["never skips"]["flops_ratio"] == 1.0
    assert metrics["skips"]["flops_ratio"] < 1.0
    assert yaml.safe_load(path.read_text())["held_out"] == {"first_seed": spec.seed_set("held_out").seeds[0], "samples": 4}
    before = path.stat().st_mtime_ns
    assert measure_baselines(tiny_adapter, spec, tmp_path) == path and path.stat().st_mtime_ns == before
    assert measure_baselines(tiny_adapter, tiny_spec, tmp_path / "none") is None  # no baselines listed


def test_compare_sets_each_baseline_beside_the_best_learned_plan_at_no_more_latency(tiny_spec, tmp_path):
    def learned(name, fid, latency):
        return Candidate("run", 0, name, "search", {"rel_l1": 0.1}, {"fid": fid, "latency_ratio": latency,
                         "latency_ratio_min": latency, "latency_ratio_max": latency}, True, None, None, tmp_path)

    spec = tiny_spec.model_copy(update={"evaluation": tiny_spec.evaluation.model_copy(update={"feature_extractor": "digits"})})
    run = Run(spec, [learned("fast", 5.0, 0.4), learned("slow", 3.0, 0.9)], dense={"fid": 4.0, "latency_ratio": 1.0, "latency_ratio_min": 1.0, "latency_ratio_max": 1.0},
              baselines={"fbc": {"fid": 4.5, "latency_ratio": 0.5, "latency_ratio_min": 0.45, "latency_ratio_max": 0.55},
                         "tiny": {"fid": 9.0, "latency_ratio": 0.2, "latency_ratio_min": 0.2, "latency_ratio_max": 0.2}})
    lines = _dominance_lines(run)
    assert "| fbc | 4.5 | 0.500 | fast | 5 | 0.400 | +0.5 | **no learned plan dominates** |" in lines
    assert "| tiny | 9 | 0.200 | none | | | | no learned plan is as fast |" in lines
    assert any(line.startswith("| fbc | baseline | 4.5 |") for line in _headline_lines(run))


def test_the_joint_quickstarts_baselines_are_plans_on_the_embedded_model(embedded_adapter):
    from pathlib import Path

    from ditplan.spec import load_spec

    spec = load_spec(Path(__file__).parents[1] / "experiments" / "quickstart-joint.yaml")
    plans = {b.name: baseline_plan(embedded_adapter, spec, b) for b in spec.baselines}
    assert [p.cache["method"] for p in plans.values() if p.cache] == ["first_block", "taylorseer"]
    assert [p.sparse["curve"]["name"] for p in plans.values() if p.sparse] == ["paper", "constant"]
