"""A search that survives crashes: a driver stopped at any point resumes to a whole run (every
COMPLETE trial's plan file, every finished trial in MLflow, compare/export working); interrupted
trials re-run without spending budget; a resumed study proposes new plans; a hung trial times out, a
dying worker fails its trial only."""

from contextlib import contextmanager

import pytest
import yaml
from optuna.trial import TrialState

from ditplan.comparison.export import export_plans
from ditplan.comparison.held_out import held_out_stage
from ditplan.comparison.report import build_report, load_run_data
from ditplan.comparison.runs import compare_runs
from ditplan.comparison.sides import run_sides
from ditplan.errors import UserError
from ditplan.models.adapters import experiment_adapter
from ditplan.plansearch.attrs import ERROR
from ditplan.plansearch.driver import run_search
from ditplan.plansearch.recorder import Recorder
from ditplan.plansearch.storage import (
    counts,
    is_interrupted,
    load_finished_study,
    study_storage,
)
from ditplan.plansearch.tracking import Tracker
from ditplan.rundir import RunDir, SearchDir
from tests.conftest import DATA
from tests.test_search import _child_runs

EXPERIMENT = DATA / "tiny-search.yaml"
TRIALS = 6


class Crash(BaseException):
    """The driver dies here: raised past every ``except Exception``, so nothing after the point runs
    (the driver's ``finally`` still cancels its other in-flight tasks, as a dead driver's heartbeat does)."""


@contextmanager
def crash_at(monkeypatch, owner, method, after, on_call):
    """Crash on the ``on_call``-th call of ``owner.method``: before it runs, or ``after`` it returned."""
    original = getattr(owner, method)
    calls = []

    def patched(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == on_call and not after:
            raise Crash(method)
        out = original(self, *args, **kwargs)
        if len(calls) == on_call and after:
            raise Crash(method)
        return out

    with monkeypatch.context() as m:
        m.setattr(owner, method, patched)
        yield


POINTS = {  # where the driver dies, in the order one trial is recorded
    "scored, plan not saved": (Recorder, "save_plan", False),
    "plan saved, trial not COMPLETE": (Recorder, "save_plan", True),
    "COMPLETE, not in MLflow": (Recorder, "tell", True),
    "in MLflow, hypervolume not logged": (Tracker, "log_trial", True),
}


def _write_experiment(root, **search):
    data = yaml.safe_load(EXPERIMENT.read_text())
    data["search"].update(search)
    data["evaluation"] = {"cache_dir": str(root / "cache")}
    (root / "experiment.yaml").write_text(yaml.safe_dump(data))
    from ditplan.spec import load_spec

    return load_spec(root / "experiment.yaml")


def _trials(spec, run_dir):
    return load_finished_study(spec, SearchDir(run_dir)).get_trials()


def test_a_driver_killed_at_each_point_then_resumed_leaves_a_whole_run(local_ray, tmp_path, monkeypatch):
    # one trial asked at a time: each crash cuts off the one trial being recorded
    spec = _write_experiment(tmp_path, sampler="random", refine={"metrics": ["rel_l1"], "samples": 4}, batch=1)
    run_dir = tmp_path / "search"
    for number, (name, (owner, method, after)) in enumerate(POINTS.items()):
        with crash_at(monkeypatch, owner, method, after, on_call=2), pytest.raises(Crash):
            run_search(spec, run_dir, trials=TRIALS, workers=1, resume=number > 0, show_progress=False)
        trials = _trials(spec, run_dir)
        assert all((run_dir / "trials" / f"trial-{t.number:04d}.yaml").exists()
                   for t in trials if t.state == TrialState.COMPLETE), name
        compare_runs([tmp_path], tmp_path / "report")  # a crashed run still compares
        with pytest.raises(UserError, match="resume it, if it was interrupted"):  # one line: nothing held-out yet
            export_plans(tmp_path, "top:2", tmp_path / "exported")
    result = run_search(spec, run_dir, trials=TRIALS, workers=1, resume=True, show_progress=False)

    trials = _trials(spec, run_dir)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    plan_files = sorted(p.name for p in (run_dir / "trials").glob("*.yaml"))
    assert plan_files == [f"trial-{t.number:04d}.yaml" for t in complete]  # none for an interrupted trial
    assert len(complete) == TRIALS == result.completed and result.failed == 0
    interrupted = [t for t in trials if is_interrupted(t)]
    assert len(interrupted) == 2  # the two crashes before COMPLETE; each ran again
    retried = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert sorted(t.system_attrs["failed_trial"] for t in retried) == sorted(t.number for t in interrupted)
    assert all(t.state != TrialState.RUNNING for t in trials)
    logged = sorted(int(r.data.tags["ditplan.trial"]) for r in _child_runs(run_dir))
    assert logged == sorted(t.number for t in trials if counts(t))  # each finished trial once, none interrupted
    run, adapter = RunDir(tmp_path), experiment_adapter(spec)
    held_out_stage(run, spec, adapter, run_sides(run, spec, adapter, load_finished_study(spec, run.search)))
    (learned,) = build_report(load_run_data(tmp_path)).fronts
    assert (learned.plans, learned.infeasible) == (TRIALS, 0)
    assert compare_runs([tmp_path], tmp_path / "report").exists()
    assert export_plans(tmp_path, "top:2", tmp_path / "exported")


def test_a_stopping_driver_cancels_its_tasks_and_queues_their_trials_again(local_ray, tmp_path, monkeypatch):
    spec = _write_experiment(tmp_path, sampler="random", refine=None, batch=4)
    with crash_at(monkeypatch, Recorder, "save_plan", False, on_call=1), pytest.raises(Crash):
        run_search(spec, tmp_path / "run", trials=4, workers=2, show_progress=False)
    trials = _trials(spec, tmp_path / "run")
    states = sorted(t.state.name for t in trials)
    # one being recorded | one in flight and the two asked but not yet submitted, given up | their re-runs
    assert states == ["FAIL"] * 3 + ["RUNNING"] + ["WAITING"] * 3
    cancelled = {t.number: t for t in trials if t.state == TrialState.FAIL}
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert all(is_interrupted(t) for t in cancelled.values())
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == sorted(cancelled)
    assert all(t.params == cancelled[t.system_attrs["failed_trial"]].params for t in queued)


def test_a_resumed_study_proposes_new_plans_and_a_fresh_one_is_reproducible(local_ray, tmp_path):
    spec = _write_experiment(tmp_path, sampler="random", refine=None)
    params = []
    for run in ("a", "b"):
        run_search(spec, tmp_path / run, trials=3, workers=1, show_progress=False)
        params.append([t.params for t in _trials(spec, tmp_path / run)])
    assert params[0] == params[1]  # same seed, fresh study: same proposals
    run_search(spec, tmp_path / "a", trials=6, workers=1, resume=True, show_progress=False)
    resumed = [t.params for t in _trials(spec, tmp_path / "a")][3:]
    assert len(resumed) == 3
    assert not any(p in params[0] for p in resumed)  # a replay would repeat trials 0-2


@pytest.mark.slow  # ≈ 45 s: each hung trial waits out its 20 s timeout
def test_a_hung_trial_times_out_and_the_study_finishes(local_ray, tmp_path):
    spec = _write_experiment(tmp_path, sampler="random", seed=3, refine=None, trial_timeout_s=20,
                             space={"methods": ["full", "hang"], "layer_groups": 1, "step_segments": 1})
    result = run_search(spec, tmp_path / "run", trials=4, workers=2, plugins=["tests.plugins.misbehaving_strategies"],
                        show_progress=False)
    trials = _trials(spec, tmp_path / "run")
    assert len(trials) == 4
    hung = [t for t in trials if "hang" in t.params.values()]
    assert hung, "the seed should draw at least one hung plan"
    for trial in trials:
        if trial in hung:
            assert trial.state == TrialState.FAIL and "timed out after 20 s" in trial.user_attrs[ERROR]
        else:
            assert trial.state == TrialState.COMPLETE
    assert result.failed == len(hung)


@pytest.mark.slow  # ≈ 35 s: Ray notices each dead worker and starts another
def test_a_worker_that_dies_fails_its_trial_only(local_ray, tmp_path):
    spec = _write_experiment(tmp_path, sampler="random", seed=1, refine=None, max_retries=0,
                             space={"methods": ["full", "die"], "layer_groups": 1, "step_segments": 1})
    result = run_search(spec, tmp_path / "run", trials=4, workers=2, plugins=["tests.plugins.misbehaving_strategies"],
                        show_progress=False)
    trials = _trials(spec, tmp_path / "run")
    died = [t for t in trials if "die" in t.params.values()]
    assert died and len(trials) == 4
    for trial in trials:
        assert trial.state == (TrialState.FAIL if trial in died else TrialState.COMPLETE)
    assert all("worker" in t.user_attrs[ERROR].lower() or "died" in t.user_attrs[ERROR].lower() for t in died)
    assert result.failed == len(died)


def test_a_bad_storage_url_is_one_line(tmp_path):
    spec = _write_experiment(tmp_path, storage="postgresql://user:secret@127.0.0.1:1/none")
    with pytest.raises(UserError, match=r"cannot open search.storage 'postgresql://user:\*\*\*@127.0.0.1:1/none'"):
        study_storage(spec, SearchDir(tmp_path))
