import pytest

import ditplan
from ditplan.cli import main
from ditplan.comparison.render import figure_axes, figure_groups
from ditplan.comparison.report import RunData, build_report, figure_points
from ditplan.evaluators.cost import plan_flops_ratio
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanError, PlanTarget
from ditplan.rundir import HeldOutRecord, RunDir, SideResult
from ditplan.strategies import apply_plan, remove_plan
from ditplan.strategies.summary import describe, plan_card

TARGET = PlanTarget("m", "h", 4, 16, "ddim", 10, 4.0)


def grid(cell):
    """A 10-step × 4-layer grid: ``cell(step, layer)`` names each cell's strategy."""
    return tuple(tuple(cell(step, layer) for layer in range(4)) for step in range(10))


@pytest.mark.parametrize("plan, expected", [
    (Plan.uniform(TARGET), "dense (no acceleration)"),
    (Plan(TARGET, grid(lambda s, _: "reuse" if s >= 3 and (s - 3) % 2 == 0 else "full")),
     "all blocks reuse every 2nd step from step 3"),
    (Plan(TARGET, grid(lambda s, layer: "wars" if layer < 2 and 2 <= s <= 5 else
                       "asc" if (s * 7 + layer * 3) % 5 == 0 else "full")),
     "blocks 0–1 wars at steps 2–5; asc on 18 % of cells"),
    (Plan(TARGET, grid(lambda s, layer: "pool" if layer == 0 else "reuse" if layer == 3 and s in (4, 6, 8) else "full"),
          sparse={"pool_layers": 1, "modules": [[1, 3]], "curve": {"name": "constant", "r": 0.875}}),
     "SparseDiT p1-s1_3, r 0.875; block 3 reuse every 2nd step from step 4"),
    (Plan(TARGET, grid(lambda s, layer: "full"), sparse={"modules": [[0, 4]], "curve": {"name": "paper"}}),
     "SparseDiT p0-s0_4, paper r_min 0.5 r_max 0.875"),
    (Plan.uniform(TARGET, cache={"method": "first_block", "config": {"threshold": 0.1}}),
     "diffusers first_block cache (threshold 0.1)"),
])
def test_describe_says_what_a_plan_does_in_a_few_words(plan, expected):
    assert describe(plan) == expected


def test_describe_counts_the_strategies_it_does_not_name():
    names = ["ast", "asc", "wars", "reuse", "forecast"]
    plan = Plan(TARGET, grid(lambda s, layer: names[(s + layer) % 5]))
    text = describe(plan)
    assert text.endswith("; +2 more") and text.count(" % of cells") == 3 and len(text) < 120


@pytest.fixture()
def tiny_plan(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    cells = tuple(tuple("reuse" if step == 2 else "full" for _ in range(target.num_layers))
                  for step in range(target.num_steps))
    return Plan(target, cells)


def test_the_card_gives_the_flops_ratio_from_the_cost_model_or_the_plan_file(tiny_adapter, tiny_plan):
    ratio = plan_flops_ratio(tiny_adapter, tiny_plan)
    assert 0.5 < ratio < 1.0
    card = plan_card(tiny_plan, ratio)
    assert card.splitlines()[0] == "all blocks reuse at step 2"
    assert f"FLOPs ratio to dense: {ratio:.3f} (analytic cost model, this model)" in card
    assert "sampler: dpmsolver++, 4 steps, guidance 3" in card
    assert f"target: random-dit (weights {tiny_plan.target.weights_hash}, measured in float32), 2 layers" in card
    recorded = tiny_plan.with_provenance(held_out_metrics={"flops_ratio": 0.75})
    assert "FLOPs ratio to dense: 0.750 (as recorded on the held-out seeds)" in plan_card(recorded)


def test_ditplan_show_prints_the_card(tiny_plan, tmp_path, capsys):
    path = tiny_plan.save(tmp_path / "plan.yaml")
    main(["show", str(path), "--experiment", "tests/data/tiny-dit.yaml"])
    out = capsys.readouterr().out
    assert out.startswith("all blocks reuse at step 2\ntarget: random-dit") and "(analytic cost model" in out
    main(["show", str(path)])  # random weights: no model to load, nothing recorded
    assert "FLOPs ratio to dense: not recorded" in capsys.readouterr().out


def test_summary_takes_a_plan_a_file_or_what_a_plan_is_applied_to(tiny_adapter, tiny_plan, tmp_path):
    path = tiny_plan.save(tmp_path / "plan.yaml")
    assert ditplan.summary(tiny_plan) == ditplan.summary(path) == "all blocks reuse at step 2"
    transformer = tiny_adapter.transformer
    with pytest.raises(PlanError, match="no plan is applied"):
        ditplan.summary(transformer)
    apply_plan(transformer, tiny_plan)
    try:
        assert ditplan.summary(transformer) == "all blocks reuse at step 2"
    finally:
        remove_plan(transformer)


def _side(name, kind, fid, latency, what=""):
    return SideResult(name, kind, {"fid": fid, "latency_ratio": latency, "latency_ratio_min": latency,
                                   "latency_ratio_max": latency, "rel_l1": 0.1}, what=what)


def test_the_comparison_figure_is_held_out_fid_by_held_out_latency_of_every_side(tiny_spec, tmp_path):
    spec = tiny_spec.model_copy(update={"evaluation": tiny_spec.evaluation.model_copy(
        update={"feature_extractor": "digits", "reference": "digits-held-out"})})
    record = HeldOutRecord(20000, 8, 2, 1.0, 10, (
        _side("dense", "dense", 4.0, 1.0, "dense (no acceleration)"), _side("D1", "greedy", 4.2, 0.8),
        _side("fast", "learned", 5.0, 0.4, "all blocks reuse at step 2"), _side("fbc", "baseline", 4.5, 0.5),
        _side("tc", "baseline", 4.7, 0.6)))
    report = build_report(RunData(RunDir(tmp_path), spec, [], {}, record))
    points = figure_points([report])
    assert [(p.name, p.kind, p.group, p.quality, p.latency) for p in points] == [
        ("dense", "dense", "dense", 4.0, 1.0), ("D1", "greedy", "greedy", 4.2, 0.8),
        ("fast", "learned", "learned", 5.0, 0.4), ("fbc", "baseline", "baseline fbc", 4.5, 0.5),
        ("tc", "baseline", "baseline tc", 4.7, 0.6)]
    assert points[2].what == "all blocks reuse at step 2"
    assert list(figure_groups(points)) == ["dense", "greedy", "learned", "baseline fbc", "baseline tc"]
    axes = figure_axes([report])
    assert axes.y_label == "FID to the real images\non held-out seeds (lower is better)"
    assert axes.x_label.startswith("latency ratio to dense") and "interleaved" in axes.x_label
