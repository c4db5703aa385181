"""The user paths that once broke: a search without greedy's warm start, a constraint no plan meets, an
unknown strategy name (a warm start from exported plans: ``tests/test_user_loop.py``, on its finished run)."""

from __future__ import annotations

import pytest

from ditplan.cli import main
from ditplan.comparison.report import build_report, load_run_data
from ditplan.rundir import RunDir
from tests.test_user_loop import TINY_RUN


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _experiment(tmp_path, name, **replace):
    text = TINY_RUN.format(cache=tmp_path / "cache", out=tmp_path / name)
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_without_greedy_warm_start_greedy_is_still_a_side_and_a_constraint_no_plan_meets_is_said(tmp_path, capsys):
    experiment = _experiment(tmp_path, "cold", **{"  trials: 4\n": "  trials: 2\n  warm_start: none\n"
                                                  "  constraints: [{metric: rel_l1, max: 1.0e-12}]\n"})
    main(["run", "--experiment", str(experiment)])
    out = capsys.readouterr().out
    assert "nothing exported: no feasible plan: none meets the constraints (rel_l1 ≤ 1e-12)" in out
    run = RunDir(tmp_path / "cold")
    data = load_run_data(run.root)
    assert not [t for t in data.trials if t.warm]  # greedy never joined the study ...
    report = build_report(data)
    assert [r.name for r in report.of_kind("greedy")] == ["D1", "D2"]  # ... and is measured on the held-out seeds
    assert all(r.search == {} and not r.feasible for r in report.of_kind("greedy"))  # judged there: rel_l1 > 1e-12
    assert report.feasible_learned == [] and not list(run.exported.glob("*.yaml"))
    assert "**No feasible plan:**" in (run.report / "comparison.md").read_text()
    err = _one_line_error(["export", str(run.root), "--select", "knee", "--out", str(tmp_path / "out")], capsys)
    assert err.startswith("error: no feasible plan: none meets the constraints")


def test_an_unknown_strategy_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    experiment = _experiment(tmp_path, "typo", **{"space: {layer_groups: 2, step_segments: 2}":
                                                  "space: {methods: [full, wars, astt], layer_groups: 2, step_segments: 2}"})
    for command in ("run", "search"):
        err = _one_line_error([command, "--experiment", str(experiment)], capsys)
        assert "search.space.methods: unknown strategy 'astt' (did you mean 'ast'?); choose one of" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["typo.yaml"]  # no run directory, no dense reference
