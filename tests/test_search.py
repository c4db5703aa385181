import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from ditplan.errors import UserError
from ditplan.plansearch.driver import run_search
from ditplan.plansearch.storage import ask, load_finished_study
from ditplan.plansearch.study import SAMPLERS
from ditplan.rundir import SearchDir
from ditplan.spec import SearchSpec, load_spec
from tests.conftest import DATA

EXPERIMENT = DATA / "tiny-search.yaml"


def _spec(tmp_path, **search):
    spec = load_spec(EXPERIMENT)
    evaluation = spec.evaluation.model_copy(update={"cache_dir": str(tmp_path / "cache")})
    return spec.model_copy(update={"evaluation": evaluation, "search": spec.search.model_copy(update=search)})


def _study(spec, run_dir):
    return load_finished_study(spec, SearchDir(run_dir))


def _child_runs(run_dir):
    client = MlflowClient(SearchDir(run_dir).tracking_uri())
    experiment = client.get_experiment_by_name("ditplan")
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_six_trials_on_two_workers_are_in_the_journal_and_mlflow(local_ray, tmp_path):
    spec = _spec(tmp_path)
    result = run_search(spec, tmp_path / "run", trials=6, workers=2, show_progress=False)
    study = _study(spec, tmp_path / "run")
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6 == result.completed
    children = _child_runs(tmp_path / "run")
    assert len(children) == 6
    assert {r.data.tags["pareto"] for r in children} <= {"true", "false"}
    assert sum(r.data.tags["pareto"] == "true" for r in children) == len(result.front) > 0
    assert len(list((tmp_path / "run" / "trials").glob("*.yaml"))) == 6
    assert list((tmp_path / "run" / "mlartifacts").rglob("pareto_front.png"))  # artifacts stay in the run dir
    assert result.hypervolume > 0


def test_two_searches_on_two_workers_and_one_on_one_record_the_same_trials(local_ray, tmp_path):
    """NSGA-II with generations of 2 breeds from the third trial on: what it proposes depends on what has
    finished, so only asks that see the same finished trials give the same search."""
    spec = _spec(tmp_path, sampler="nsga2", population_size=2, batch=2)

    def recorded(run, workers):  # noqa: ANN001, ANN202
        run_search(spec, tmp_path / run, trials=6, workers=workers, show_progress=False, promote_best=False)
        return [(t.number, t.state, t.params, t.values, t.user_attrs.get("metrics"))
                for t in _study(spec, tmp_path / run).get_trials()]

    first = recorded("a", 2)
    assert len(first) == 6 and len({str(params) for _, _, params, _, _ in first}) > 2
    assert recorded("b", 2) == first
    assert recorded("c", 1) == first


def test_a_strategy_that_raises_fails_only_its_trials(local_ray, tmp_path):
    spec = _spec(tmp_path, space=load_spec(EXPERIMENT).search.space.model_copy(
        update={"methods": ["full", "boom"], "layer_groups": 1, "step_segments": 1}))
    result = run_search(spec, tmp_path / "run", trials=6, workers=2, plugins=["tests.plugins.failing_strategy"],
                        show_progress=False)
    trials = _study(spec, tmp_path / "run").get_trials()
    assert len(trials) == 6
    for trial in trials:
        uses_boom = "boom" in trial.params.values()
        assert trial.state == (TrialState.FAIL if uses_boom else TrialState.COMPLETE)
        if uses_boom:
            assert "boom strategy failed on purpose" in trial.user_attrs["error"]
    assert 0 < result.failed < 6


@pytest.mark.slow  # minutes on 2 cores: the fast set stays under 10 minutes
def test_killing_the_driver_then_resuming_loses_no_completed_trial(tmp_path):
    run_dir = tmp_path / "run"
    spec = _spec(tmp_path)
    config = tmp_path / "search.yaml"
    config.write_text(EXPERIMENT.read_text() + f"evaluation: {{cache_dir: {tmp_path / 'cache'}}}\n")
    trials = 12  # enough that the kill, after 2 complete trials, lands mid-study
    command = [sys.executable, "-m", "ditplan.cli", "search", "--experiment", str(config), "--trials", str(trials),
               "--workers", "1", "--out", str(run_dir)]
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    completed = []
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
        if (run_dir / "optuna.journal").exists():
            try:
                study = _study(spec, run_dir)
            except KeyError:  # the journal is being written
                continue
            completed = study.get_trials(states=(TrialState.COMPLETE,)) if study is not None else []
            if len(completed) >= 2:
                break
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert 2 <= len(completed) < trials, "the driver should have been killed mid-study"
    before = {t.number: t.values for t in _study(spec, run_dir).get_trials(states=(TrialState.COMPLETE,))}
    assert all((run_dir / "trials" / f"trial-{n:04d}.yaml").exists() for n in before)  # plan file before COMPLETE

    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = _study(spec, run_dir).get_trials()
    complete = {t.number: t.values for t in after if t.state == TrialState.COMPLETE}
    assert all(complete[n] == v for n, v in before.items())  # nothing completed was lost or changed
    assert sum(1 for t in after if t.state != TrialState.RUNNING) == len(after)
    assert len(complete) == trials  # trials cut off by the kill ran again, and spent no budget
    assert sorted(p.name for p in (run_dir / "trials").glob("*.yaml")) == [f"trial-{n:04d}.yaml" for n in sorted(complete)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_a_search_with_sparsedit_choices_runs_plans_on_the_fine_tuned_network(local_ray, tmp_path):
    from diffusers import DDPMScheduler

    from ditplan.models.adapters import load_adapter
    from ditplan.plan import load_plan
    from ditplan.strategies.curves import Constant
    from ditplan.strategies.finetune_sparse import (
        FinetuneConfig,
        export_sparse,
        finetune_sparse,
    )
    from ditplan.strategies.sdtm import SparseLayout
    from tests.test_sparse import SMALL_DIT

    base = tmp_path / "model"
    load_adapter("dit", config=SMALL_DIT).transformer.save_pretrained(base / "transformer")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(base / "scheduler")
    teacher = load_adapter("dit", str(base))
    layout = SparseLayout(modules=((1, 4),), curve=Constant(), pool_layers=1)
    finetune_sparse(teacher, layout, tmp_path / "ft", FinetuneConfig.make(steps=2, batch_size=4, warmup_steps=1))
    export_sparse(teacher, base, layout, tmp_path / "ft")

    data = _spec(tmp_path, sampler="random", seed=1).model_dump()
    data["model"].update(config=None, source=str(base))
    data["sampler"]["num_steps"] = 3
    data["search"]["space"].update(methods=["full", "asc"], sparse={"pool_layers": [0, 1], "curves": ["paper"]})
    spec = type(load_spec(EXPERIMENT)).model_validate(data)
    result = run_search(spec, tmp_path / "run", trials=8, workers=2, show_progress=False)
    assert result.completed == 8
    plans = [load_plan(p) for p in sorted((tmp_path / "run" / "trials").glob("*.yaml"))]
    tuned = [p for p in plans if (p.sparse or {}).get("weights") == "sparse/p1-s1_4"]
    assert tuned and all(p.target.weights_hash != teacher.weights_hash for p in tuned)
    assert all(p.provenance["metrics"]["flops_ratio"] < 1 for p in tuned)


def test_a_trial_that_repeats_earlier_parameters_takes_their_values_without_evaluation(local_ray, tmp_path):
    space = {"methods": ["full", "ast"], "layer_groups": 1, "step_segments": 1}  # two plans in all
    # a repeat leaves the one worker free: the next trial starts at once, not after a heartbeat interval
    # (an hour here: pytest's 600 s timeout fails a driver that waits)
    spec = _spec(tmp_path, space=load_spec(EXPERIMENT).search.space.model_copy(update=space), refine=None,
                 heartbeat_interval_s=3600)
    result = run_search(spec, tmp_path / "run", trials=6, workers=1, show_progress=False)
    complete = _study(spec, tmp_path / "run").get_trials(states=(TrialState.COMPLETE,))
    first = {}
    for trial in complete:
        first.setdefault(tuple(sorted(trial.params.items())), trial)
    repeats = [t for t in complete if "repeat_of" in t.user_attrs]
    assert len(complete) == 6 == result.completed and len(first) <= 2
    assert result.repeats == len(repeats) == 6 - len(first)  # one worker: every plan evaluated once
    for trial in repeats:
        original = first[tuple(sorted(trial.params.items()))]
        assert trial.user_attrs["repeat_of"] == original.number and trial.values == original.values
    assert len(result.front) <= len(first)  # each plan once on the front


def test_a_search_space_it_refuses_leaves_no_run_directory(tmp_path):
    data = yaml.safe_load((DATA / "tiny-search.yaml").read_text())
    data["search"]["space"] = {"methods": ["full", "ast"], "interval": {"every": [3]}}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="add reuse or forecast to search.space.methods"):
        run_search(load_spec(tmp_path / "experiment.yaml"), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


def test_nsga2_breeds_its_first_generation_from_the_enqueued_trials():
    # proposals and warm starts are enqueued with every parameter given; Optuna's NSGA-II puts a trial into a
    # generation only when it samples a parameter, so without ditplan's sampler they would be no generation's and
    # the first one bred from would be population_size random trials after them
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=SAMPLERS["nsga2"](SearchSpec(sampler="nsga2", population_size=3), 0))
    for x in (0, 1, 2):
        study.enqueue_trial({"x": x, "y": "a"})
    for _ in range(6):
        trial = ask(study)
        x, _ = trial.suggest_int("x", 0, 9), trial.suggest_categorical("y", ["a", "b", "c"])
        study.tell(trial, [x, 9 - x])
    trials = study.get_trials()
    assert [study.sampler.get_trial_generation(study, t) for t in trials] == [0, 0, 0, 1, 1, 1]
    assert [t.params for t in study.sampler.get_parent_population(study, 1)] == [t.params for t in trials[:3]]
