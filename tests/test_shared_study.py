"""The cluster's shared services, for real on this machine: a PostgreSQL server (``pgserver`` from
PyPI, started here in a temporary folder) holding a study several drivers run, and an MLflow
tracking server (``mlflow server`` on loopback)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import optuna
import pgserver
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import ditplan
from ditplan.plansearch.attrs import PROMOTED
from ditplan.plansearch.driver import run_search
from ditplan.plansearch.storage import is_interrupted, study_storage
from ditplan.plansearch.tracking import STUDY_TAG, TRIAL_TAG
from ditplan.rundir import SearchDir
from ditplan.spec import load_spec
from tests.conftest import DATA, ENV, free_port
from tests.test_user_loop import TINY_RUN

EXPERIMENT = DATA / "tiny-search.yaml"
SHARED = {"sampler": "random", "heartbeat_interval_s": 1, "grace_period_s": 10,
          "space": {"methods": ["full", "ast", "wars", "asc", "wars+asc"], "layer_groups": 2, "step_segments": 3}}


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server of its own (removed afterwards)."""
    server = pgserver.get_server(tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="delete")
    yield server
    server.cleanup()


@pytest.fixture()
def database(postgres, request):
    """A fresh database on the server for one test; yields its SQLAlchemy URL."""
    name = "t_" + request.node.name.lower()[:40].replace("-", "_").replace("[", "_").replace("]", "")
    postgres.psql(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name};")
    return postgres.get_uri(name)


def _experiment(root, **search):
    data = yaml.safe_load(EXPERIMENT.read_text())
    data["search"].update(search)
    data["evaluation"] = {"cache_dir": str(root / "cache")}
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _driver(experiment, out, trials, ray_address, *extra, helper=True):
    """``ditplan search`` in a process of its own; a helper (``--no-refine``) leaves promotion to the main driver."""
    command = [sys.executable, "-m", "ditplan.cli", "search", "--experiment", str(experiment), "--trials", str(trials),
               "--workers", "1", "--ray-address", ray_address, "--out", str(out), "--resume",
               *(["--no-refine"] if helper else []), "--plugin", "tests.plugins.slow_trials", *extra]
    return subprocess.Popen(command, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _trials(experiment, run_dir):
    spec = load_spec(experiment)
    return optuna.load_study(study_name=spec.name, storage=study_storage(spec, SearchDir(run_dir))).get_trials()


@pytest.mark.slow  # ≈ 80 s: a PostgreSQL server, a Ray cluster and two driver start-ups
def test_two_drivers_share_one_postgresql_study(database, loopback_cluster, tmp_path):
    experiment = _experiment(tmp_path, storage=database, **SHARED)
    drivers = [_driver(experiment, tmp_path / name, 8, loopback_cluster) for name in ("a", "b")]
    for driver in drivers:
        _, stderr = driver.communicate(timeout=300)
        assert driver.returncode == 0, stderr[-2000:]
    trials = _trials(experiment, tmp_path / "a")
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)  # none marked FAIL by the other
    assert optuna.get_all_study_names(study_storage(load_spec(experiment), SearchDir(tmp_path))) == ["tiny-search"]
    assert len({t.user_attrs["driver"] for t in trials}) == 2  # both drivers ran trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8  # and proposed different plans
    for name in ("a", "b"):  # each run directory holds every trial's plan file, whichever driver ran it
        assert sorted(p.name for p in (tmp_path / name / "trials").glob("*.yaml")) == [
            f"trial-{t.number:04d}.yaml" for t in trials]


@pytest.mark.slow  # minutes on 2 cores: the fast set stays under 10 minutes
def test_with_screening_the_main_driver_promotes_once_and_the_promoted_trials_run_on_every_search_sample(
        database, loopback_cluster, tmp_path):
    experiment = _experiment(tmp_path, storage=database, refine=None, screening={"samples": 2, "promote": 3}, **SHARED)
    drivers = {"main": _driver(experiment, tmp_path / "main", 8, loopback_cluster, helper=False),
               "helper": _driver(experiment, tmp_path / "helper", 8, loopback_cluster)}
    stderr = {}
    for name, driver in drivers.items():
        _, stderr[name] = driver.communicate(timeout=300)
        assert driver.returncode == 0, stderr[name][-2000:]
    assert "promotes nothing" in stderr["helper"]
    trials = _trials(experiment, tmp_path / "main")
    assert all(t.state == TrialState.COMPLETE for t in trials)
    promoted = [t for t in trials if PROMOTED in t.user_attrs]
    screened = {t.number: t for t in trials if PROMOTED not in t.user_attrs}
    assert len(screened) >= 8 and len(promoted) == 3  # promoted once, by the main driver only (two drivers
    # starting the last screened trial together make 9: see Tally)
    assert len({t.user_attrs[PROMOTED] for t in promoted}) == 3
    assert len({t.user_attrs["driver"] for t in screened.values()}) == 2  # both drivers ran screened trials
    for trial in promoted:
        assert trial.params == screened[trial.user_attrs[PROMOTED]].params
        plan = SearchDir(tmp_path / "main").load_trial(trial.number)
        assert plan.provenance["evaluated_on"]["samples"] == 4  # every search sample
    for trial in screened.values():
        plan = SearchDir(tmp_path / "main").load_trial(trial.number)
        assert plan.provenance["evaluated_on"]["samples"] == 2


@pytest.mark.slow  # ≈ 60 s: a Ray cluster and a driver start-up
def test_without_an_address_a_driver_starts_ray_of_its_own_beside_a_cluster_running_on_the_machine(
        loopback_cluster, tmp_path):
    experiment = _experiment(tmp_path, sampler="random")
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "ditplan.cli", "search", "--experiment", str(experiment), "--trials", "2",
               "--workers", "1", "--out", str(tmp_path / "run"), "--no-refine"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # not "num_cpus ... must not be provided" from the found cluster
    assert [t.state for t in _trials(experiment, tmp_path / "run")] == [TrialState.COMPLETE] * 2


@pytest.mark.slow  # ≈ 60 s: two driver start-ups and a grace period
def test_a_killed_drivers_trials_are_found_by_heartbeat_and_run_again(database, loopback_cluster, tmp_path):
    experiment = _experiment(tmp_path, storage=database, **{**SHARED, "grace_period_s": 5})
    first = _driver(experiment, tmp_path / "a", 6, loopback_cluster)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
        try:
            trials = _trials(experiment, tmp_path / "a")
        except KeyError:
            continue
        if sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and any(t.state == TrialState.RUNNING for t in trials):
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    cut_off = [t.number for t in _trials(experiment, tmp_path / "a") if t.state == TrialState.RUNNING]
    assert cut_off, "the driver should have been killed with a trial in flight"

    second = _driver(experiment, tmp_path / "b", 6, loopback_cluster)
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-2000:]
    trials = _trials(experiment, tmp_path / "b")
    assert sorted(t.number for t in trials if is_interrupted(t)) == cut_off  # failed once stale, not before
    assert sorted(t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs) == cut_off
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6  # the re-runs spent the budget, not the cut-offs
    assert not any(t.state == TrialState.RUNNING for t in trials)


@pytest.mark.slow  # ≈ 30 s: two whole `ditplan run`s
def test_a_run_with_an_rdb_storage_resumes_through_ditplan_run(database, local_ray, tmp_path):
    experiment = tmp_path / "tiny-run.yaml"
    text = TINY_RUN.format(cache=tmp_path / "cache", out=tmp_path / "run")
    text = text.replace("search:\n", f"search:\n  storage: {database}\n  sampler: random\n")
    text = text.replace("thresholds: [0.05, 0.5]", "thresholds: [0.5]")
    text = text.replace("metrics: [rel_l1, latency_ratio]", "metrics: [rel_l1]")
    experiment.write_text(text)
    run_dir = ditplan.run(experiment, show_progress=False)
    first = [(t.number, t.state, t.values) for t in _trials(experiment, run_dir / "search")]
    ditplan.run(experiment, show_progress=False)  # asks PostgreSQL, finds the study, resumes it
    assert [(t.number, t.state, t.values) for t in _trials(experiment, run_dir / "search")] == first
    assert len(first) == 5  # 4 learned trials and greedy D1
    assert not (run_dir / "search" / "optuna.journal").exists()


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    command = [str(os.path.join(os.path.dirname(sys.executable), "mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)


def _runs(uri, study):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ditplan")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{study}'")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    hypervolume = [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "hypervolume")]
    trials = {
        r.data.tags[TRIAL_TAG]: (r.info.status, r.data.params, r.data.metrics, r.data.tags["pareto"],
                                 [a.path for a in client.list_artifacts(r.info.run_id)])
        for r in runs if TRIAL_TAG in r.data.tags
    }
    return trials, sorted(hypervolume)


@pytest.mark.slow  # minutes on 2 cores: the fast set stays under 10 minutes
def test_mlflow_through_a_tracking_server_records_the_same_runs_as_through_sqlite(mlflow_server, local_ray, tmp_path):
    spec = load_spec(_experiment(tmp_path, refine=None))
    run_search(spec, tmp_path / "sqlite", trials=3, workers=1, show_progress=False)
    served = spec.model_copy(update={"search": spec.search.model_copy(update={"tracking_uri": mlflow_server})})
    run_search(served, tmp_path / "server", trials=3, workers=1, show_progress=False)
    local = _runs(SearchDir(tmp_path / "sqlite").tracking_uri(), spec.name)
    remote = _runs(mlflow_server, spec.name)
    assert len(local[0]) == 3 and all(r[0] == "FINISHED" and r[4] for r in local[0].values())
    assert remote == local
    assert not (tmp_path / "server" / "mlflow.db").exists()
