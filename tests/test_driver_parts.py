"""The search driver's parts, each alone, without Ray or MLflow: opening and reseeding the study, the
ask / submit / tell loop, the records."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from ditplan.errors import UserError
from ditplan.models.adapters import experiment_adapter
from ditplan.plansearch.attrs import REPEAT
from ditplan.plansearch.loop import TrialLoop
from ditplan.plansearch.queue import PlanSource, enqueue_warm_start
from ditplan.plansearch.ray_tasks import Outcome
from ditplan.plansearch.records import trial_records
from ditplan.plansearch.space import experiment_space
from ditplan.plansearch.storage import study_storage
from ditplan.plansearch.study import open_study
from ditplan.progress import progress_bar
from ditplan.rundir import RunDir
from ditplan.spec import load_spec
from tests.conftest import DATA
from tests.studies import MemoryTracker, hand_study, uniform_after_dense


@pytest.fixture()
def spec(tmp_path):
    spec = load_spec(DATA / "tiny-search.yaml")
    space = spec.search.space.model_copy(update={"methods": ["full", "ast", "asc"], "layer_groups": 1, "step_segments": 1})
    return spec.model_copy(update={"output_dir": str(tmp_path / "run"), "search": spec.search.model_copy(
        update={"sampler": "random", "space": space, "heartbeat_interval_s": 1})})


class InlinePool:
    """Evaluations done at once, in the driver: what a Ray task pool does, without Ray."""

    def __init__(self, evaluate):  # noqa: ANN001
        self.evaluate, self.done, self.submitted = evaluate, [], []

    def __len__(self) -> int:
        return len(self.done)

    def submit(self, ref, item) -> None:  # noqa: ANN001
        self.submitted.append(item[0].number)
        try:
            self.done.append(Outcome(item, result=self.evaluate(item[1])))
        except RuntimeError as err:
            self.done.append(Outcome(item, error=str(err)))

    def wait(self, max_wait_s: float) -> list[Outcome]:
        done, self.done = self.done, []
        return done

    def cancel_all(self) -> list:
        return []


class ShuffledPool(InlinePool):
    """Evaluations done at once, handed back one at a time, the most recent first: workers that finish in
    another order than they started."""

    def wait(self, max_wait_s: float) -> list[Outcome]:
        return [self.done.pop()] if self.done else []


def score(plan):  # noqa: ANN001
    """A stand-in evaluation: fewer full cells, cheaper and worse; a plan using asc fails."""
    cells = [m for row in plan.grid[1:] for m in row]
    if "asc" in cells:
        raise RuntimeError("asc failed on purpose")
    share = cells.count("full") / len(cells)
    return {"rel_l1": 1.0 - share, "flops_ratio": 0.5 + 0.5 * share}


def test_a_fresh_study_is_reproducible_a_resumed_one_draws_anew_and_an_existing_one_is_not_overwritten(spec, tmp_path):
    def draws(run):
        """The first numbers the sampler of the study opened in ``run`` draws."""
        study = open_study(spec, run.search, study_storage(spec, run.search), resume=True, driver="d")
        return study.sampler._rng.rng.random(3).tolist()

    a, b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    assert draws(a) == draws(b)  # same seed, fresh study: the same proposals
    open_study(spec, a.search, study_storage(spec, a.search), resume=True, driver="d").ask()
    assert draws(a) != draws(b)  # a study holding a trial reseeds: a resume does not replay
    with pytest.raises(UserError, match="already exists in .*; pass --resume"):
        open_study(spec, a.search, study_storage(spec, a.search), resume=False, driver="d")


def test_the_loop_asks_submits_and_records_until_the_learned_trials_are_done(spec):
    tracker = MemoryTracker()
    hand = hand_study(spec, RunDir.of(spec), dense={4: {"rel_l1": 0.0}}, tracker=tracker)
    space = experiment_space(experiment_adapter(spec), spec)
    greedy = uniform_after_dense(spec, "ast").with_provenance(name="D1", search="greedy")
    enqueue_warm_start(hand.study, space, {"D1": greedy})
    plans = PlanSource(space, {"D1": greedy})
    pool = InlinePool(score)
    loop = TrialLoop(hand.study, spec.search, hand.study._storage, hand.recorder, plans, "test-driver")
    with progress_bar(1, "", enabled=False) as bar:
        failed = loop.run(6, workers=1, pool=pool, submit=lambda trial, plan: None, bar=bar)
    trials = hand.study.get_trials()
    learned = [t for t in trials if "source" not in t.user_attrs]
    assert len(learned) == 6 and trials[0].user_attrs["name"] == "D1"  # the warm start first, then 6 learned
    assert failed == sum(t.state == TrialState.FAIL for t in learned) > 0
    repeats = [t for t in trials if REPEAT in t.user_attrs]
    assert sorted(pool.submitted + [t.number for t in repeats]) == [t.number for t in trials]  # a repeat is not run
    for trial in repeats:
        assert trial.values == hand.study.get_trials()[trial.user_attrs[REPEAT]].values
    for trial in trials:  # recorded: plan file first, then the tracker
        assert tracker.trials[trial.number][0] == trial.state.name
        assert hand.run.search.trial_path(trial.number).exists() == (trial.state == TrialState.COMPLETE)
    records = trial_records(hand.study, spec.search, hand.run.search, ["rel_l1", "flops_ratio"])
    assert [r.warm for r in records][0] == "greedy" and all(r.samples == 4 for r in records)
    assert {r.number for r in records} == {t.number for t in trials if t.state == TrialState.COMPLETE and REPEAT not in t.user_attrs}


@pytest.mark.parametrize("batch", [1, 4])
def test_a_search_gives_the_same_trials_whatever_its_workers_and_their_finishing_order(spec, tmp_path, batch):
    """TPE past its random start-up trials proposes from what has finished: the batches make every ask see the
    same finished trials, with one worker in order and with two or three finishing out of order."""
    space = spec.search.space.model_copy(update={"methods": ["full", "ast", "wars"], "layer_groups": 2, "step_segments": 2})

    def trials(workers, pool):  # noqa: ANN001, ANN202
        run = spec.model_copy(update={"output_dir": str(tmp_path / f"{workers}-{type(pool).__name__}"), "search": spec.search.model_copy(
            update={"sampler": "tpe", "space": space, "batch": batch})})
        hand = hand_study(run, RunDir.of(run), dense={4: {"rel_l1": 0.0}}, tracker=MemoryTracker())
        loop = TrialLoop(hand.study, run.search, hand.study._storage, hand.recorder,
                         PlanSource(experiment_space(experiment_adapter(run), run), {}), "test-driver")
        with progress_bar(1, "", enabled=False) as bar:
            loop.run(16, workers=workers, pool=pool, submit=lambda trial, plan: None, bar=bar)
        return [(t.number, t.params, t.values) for t in hand.study.get_trials()]

    alone = trials(1, InlinePool(score))
    assert len(alone) == 16 and len({str(params) for _, params, _ in alone}) > 10  # TPE proposed past its 10 random trials
    assert trials(2, ShuffledPool(score)) == alone
    assert trials(3, ShuffledPool(score)) == alone
