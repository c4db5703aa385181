"""search.screening: trials scored on few search samples first, the best of them again on all."""

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from ditplan.comparison.report import RunData, TrialRecord, side_budgets
from ditplan.errors import UserError
from ditplan.evaluators.cost import sample_forwards
from ditplan.evaluators.reference import dense_reference
from ditplan.models.adapters import experiment_adapter
from ditplan.plansearch.attrs import ERROR, PROMOTED, WARM
from ditplan.plansearch.driver import run_search
from ditplan.plansearch.pareto import best_by_rank
from ditplan.plansearch.promotion import promote
from ditplan.plansearch.storage import load_finished_study, tally
from ditplan.plansearch.trial_task import trial_metrics
from ditplan.rundir import RunDir, SearchDir
from ditplan.spec import ScreeningSpec, SeedSet, load_spec
from tests.conftest import DATA
from tests.studies import MemoryTracker, hand_study

EXPERIMENT = DATA / "tiny-search.yaml"
MINIMIZE = ["minimize", "minimize"]


def test_best_by_rank_takes_whole_ranks_then_spreads_the_last_along_the_first_objective():
    values = np.array([
        [0.1, 0.9], [0.5, 0.5], [0.9, 0.1],                # rank 1
        [0.2, 0.95], [0.55, 0.7], [0.6, 0.6], [0.95, 0.3],  # rank 2 (each dominated by a rank-1 point)
        [0.99, 0.99],                                      # rank 3
    ])
    assert best_by_rank(values, MINIMIZE, 3) == [0, 1, 2]
    assert best_by_rank(values, MINIMIZE, 5) == [0, 1, 2, 3, 6]  # both ends of rank 2
    assert best_by_rank(values, MINIMIZE, 6) == [0, 1, 2, 3, 5, 6]  # rank 2 at positions 0, 1.5 → 2, 3
    assert best_by_rank(values, MINIMIZE, 8) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert best_by_rank(values, MINIMIZE, 20) == list(range(8))
    assert best_by_rank(values, MINIMIZE, 1) == [0]
    flipped = values * [1, -1]  # the second objective maximised: the same order
    assert best_by_rank(flipped, ["minimize", "maximize"], 5) == [0, 1, 2, 3, 6]


def test_screening_needs_fewer_samples_than_the_search(tmp_path):
    text = EXPERIMENT.read_text().replace("  samples: 4\n", "  samples: 4\n  screening: {samples: 4, promote: 2}\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=r"search.screening.samples \(4\) must be fewer than search.samples \(4\)"):
        load_spec(path)


def _screened_spec(tmp_path):
    spec = load_spec(EXPERIMENT)
    search = spec.search.model_copy(update={"screening": ScreeningSpec(samples=2, promote=3), "refine": None})
    return spec.model_copy(update={"search": search,
                                   "evaluation": spec.evaluation.model_copy(update={"cache_dir": str(tmp_path / "cache")})})


def test_the_best_screened_trials_are_scored_again_on_every_search_sample_and_only_they_make_the_front(local_ray, tmp_path):
    spec, run_dir = _screened_spec(tmp_path), tmp_path / "run"
    result = run_search(spec, run_dir, trials=6, workers=2, show_progress=False)
    study = load_finished_study(spec, SearchDir(run_dir))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    screened = [t for t in complete if PROMOTED not in t.user_attrs]
    promoted = [t for t in complete if PROMOTED in t.user_attrs]
    assert len(screened) == 6 == result.completed and len(promoted) == 3 == result.promoted
    distinct = [t for t in screened if "repeat_of" not in t.user_attrs]
    chosen = [distinct[i] for i in best_by_rank(np.array([t.values for t in distinct]), MINIMIZE, 3)]
    assert {t.user_attrs[PROMOTED] for t in promoted} == {t.number for t in chosen}

    adapter = experiment_adapter(spec)
    settings = spec.sampler.settings()
    _, conditions, seeds = spec.seed_set("search")
    by_number = {t.number: t for t in screened}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray workers (cpus_per_trial 1)
    try:
        for trial in promoted:
            source = by_number[trial.user_attrs[PROMOTED]]
            assert trial.params == source.params and trial.distributions == source.distributions  # the sampler sees them
            plan, first = SearchDir(run_dir).load_trial(trial.number), SearchDir(run_dir).load_trial(source.number)
            assert plan.provenance["evaluated_on"]["samples"] == 4 and first.provenance["evaluated_on"]["samples"] == 2
            for n, values in ((4, trial.values), (2, source.values)):  # each scored on its own samples, against dense's
                dense = dense_reference(adapter, settings, conditions[:n], seeds[:n], spec.evaluation.cache_dir)
                subset = SeedSet("search", conditions[:n], seeds[:n])
                direct = trial_metrics(spec, plan, dense, subset, ["rel_l1", "flops_ratio"])
                assert values == [direct["rel_l1"], direct["flops_ratio"]]
    finally:
        torch.set_num_threads(threads)
    assert {t.number for t in result.front} <= {t.number for t in promoted}  # fronts are chosen at full fidelity
    assert result.front

    again = run_search(spec, run_dir, trials=6, workers=2, resume=True, show_progress=False)  # nothing left to do
    assert len(load_finished_study(spec, SearchDir(run_dir)).get_trials()) == 9
    assert (again.completed, again.promoted) == (6, 3)


def test_a_helper_driver_promotes_nothing_and_a_resumed_study_promotes_only_what_it_has_not(local_ray, tmp_path):
    spec, run_dir = _screened_spec(tmp_path), tmp_path / "run"
    with pytest.warns(UserWarning, match="promotes nothing"):
        helper = run_search(spec, run_dir, trials=4, workers=2, show_progress=False, promote_best=False)
    assert (helper.completed, helper.promoted, helper.front) == (4, 0, [])
    main = run_search(spec, run_dir, trials=4, workers=2, resume=True, show_progress=False)
    assert (main.completed, main.promoted) == (4, 3) and main.front
    result = run_search(spec, run_dir, trials=8, workers=2, resume=True, show_progress=False)
    trials = load_finished_study(spec, SearchDir(run_dir)).get_trials()
    sources = [t.user_attrs[PROMOTED] for t in trials if PROMOTED in t.user_attrs]
    assert result.completed == 8 and len(sources) == len(set(sources)) == result.promoted
    assert 3 <= result.promoted <= 6  # the first three, and at most three new best of the eight


def test_the_budget_charges_every_evaluation_at_its_own_fidelity(tmp_path):
    spec = _screened_spec(tmp_path)
    settings = spec.sampler.settings()
    trials = [TrialRecord(n, f"t{n}", None, {}, s, True, s == 4, None, None, tmp_path / "x.yaml")
              for n, s in enumerate([2, 2, 2, 4])]
    (budget,) = side_budgets(RunData(RunDir(tmp_path), spec, trials, {}, None))
    assert budget.evaluation_forwards == 3 * sample_forwards(2, settings) + sample_forwards(4, settings)
    assert budget.plans == 4


def test_promotion_takes_each_distinct_plan_once_and_only_feasible_screened_trials(tmp_path):
    """Two trials whose parameters differ but whose plans are the same (e.g. pruning curves of two families
    that give the same tokens) are one plan: promoting both would score it twice."""
    from ditplan.plansearch.space import experiment_space

    spec = _screened_spec(tmp_path)
    spec = spec.model_copy(update={"search": spec.search.model_copy(update={"screening": ScreeningSpec(samples=2, promote=2)}),
                                   "output_dir": str(tmp_path / "run")})
    hand = hand_study(spec, RunDir.of(spec), dense={}, tracker=MemoryTracker())  # no Ray, no MLflow
    study, search_dir = hand.study, hand.run.search
    space = experiment_space(experiment_adapter(spec), spec)
    names = [space.cell_name(layers, steps) for layers in space.layer_groups for steps in space.step_segments]
    distributions = {name: optuna.distributions.CategoricalDistribution(list(space.methods)) for name in names}
    plans = {}
    rows = [(0, "ast", [0.1, 0.5], 0.1, {}), (0, "asc", [0.1, 0.5], 0.1, {}), (1, "ast", [0.2, 0.6], 0.2, {}),
            (2, "ast", [0.01, 0.4], 9.0, {}), (2, "asc", [0.01, 0.3], 0.1, {WARM: "greedy"})]
    for number, (cell, method, values, rel_l1, attrs) in enumerate(rows):
        params = {name: "full" for name in names} | {names[cell]: method}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=distributions, values=values,
            constraints={"rel_l1": rel_l1 - 5.0}, user_attrs={"name": f"t{number}", **attrs}))
        plans[number] = space.suggest(optuna.trial.FixedTrial(params))
    plans[1] = plans[0]  # trial 1's plan file holds trial 0's plan: the same plan under other parameters
    for number, plan in plans.items():
        hand.recorder.save_plan(number, plan, {}, 2)
    directions = ["minimize", "minimize"]
    assert promote(study, spec.search, directions, search_dir)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    # t1 is t0's plan; t3 breaks the constraint; t4 is a warm-start (greedy) plan, greedy's side, though the best
    assert [t.user_attrs[PROMOTED] for t in waiting] == [0, 2]
    assert [t.user_attrs["name"] for t in waiting] == ["t0", "t2"]
    assert not promote(study, spec.search, directions, search_dir)  # claimed: nothing queued twice
    lost = study.ask()  # t0's promoted trial, then interrupted past its retries: t0 is promoted again
    study.tell(lost, state=TrialState.FAIL)
    assert promote(study, spec.search, directions, search_dir)
    assert [t.user_attrs[PROMOTED] for t in study.get_trials(states=(TrialState.WAITING,))] == [2, 0]


def _trial(state, **attrs):
    values = [0.1, 0.5] if state == TrialState.COMPLETE else None
    return optuna.trial.create_trial(state=state, values=values, user_attrs=attrs)


def test_the_tally_runs_every_queued_promoted_trial_even_when_more_learned_trials_finished_than_asked():
    """Two drivers starting the last learned trial at once leave one learned trial too many: it must not take
    the place of a promoted trial still queued."""
    done, waiting = TrialState.COMPLETE, TrialState.WAITING
    trials = [_trial(done) for _ in range(7)] + [_trial(done, **{PROMOTED: 0}), _trial(waiting, **{PROMOTED: 1}),
                                                 _trial(waiting, **{PROMOTED: 2})]
    state = tally(trials, learned=6)
    assert (state.finished, state.running, state.target, state.free, state.done) == (8, 0, 9, 2, False)
    finished = trials[:8] + [_trial(done, **{PROMOTED: 1}), _trial(done, **{PROMOTED: 2})]
    assert tally(finished, learned=6).done
    assert tally(finished[:5], learned=6).free == 1  # learned trials still missing
    failed = finished + [_trial(TrialState.FAIL, **{ERROR: "boom"}), _trial(TrialState.FAIL)]  # spent / interrupted
    assert tally(failed, learned=6).finished == 11 and tally(failed, learned=6).done
