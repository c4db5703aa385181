"""The cluster path of DESIGN.md, for real on loopback: a Ray head with 2 logical GPUs plus a second
node, ``ditplan search --ray-address`` with one GPU per trial (the trials run on CPU)."""

import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from ditplan.plansearch.storage import study_storage
from ditplan.rundir import SearchDir
from ditplan.spec import load_spec
from tests.conftest import DATA, ENV


@pytest.mark.slow  # minutes on 2 cores: the fast set stays under 10 minutes
def test_a_search_runs_on_a_two_node_loopback_cluster_one_gpu_per_trial(loopback_cluster, tmp_path):
    experiment = tmp_path / "search.yaml"
    experiment.write_text((DATA / "tiny-search.yaml").read_text().replace("search:\n", "search:\n  gpus_per_trial: 1\n"))
    run = subprocess.run(
        [sys.executable, "-m", "ditplan.cli", "search", "--experiment", str(experiment), "--trials", "4",
         "--workers", "2", "--ray-address", loopback_cluster, "--out", str(tmp_path / "run")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Connecting to existing Ray cluster" in run.stderr
    spec = load_spec(experiment)
    assert spec.search.gpus_per_trial == 1
    study = optuna.load_study(study_name=spec.name, storage=study_storage(spec, SearchDir(tmp_path / "run")))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
