"""Plans re-targeted to another step count: rows mapped by normalised time, caches still made before they are read,
and the ``ditplan retarget`` command."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from ditplan.cli import main
from ditplan.models.adapters import load_adapter
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanError, PlanTarget, load_plan
from ditplan.spec import SamplerSettings
from ditplan.strategies.apply import CachePlanner, build_strategies
from ditplan.strategies.retarget import retarget, retarget_to_steps
from tests.conftest import DATA

TARGET = PlanTarget("m", "abc", num_layers=2, num_tokens=64, scheduler="ddim", num_steps=4, guidance_scale=4.0,
                    schedule=(0.9, 0.6, 0.3, 0.05))
ROWS = (("full", "full"), ("ast", "full"), ("full", "wars"), ("asc", "reuse"))


def test_each_new_step_takes_the_row_of_the_step_nearest_in_normalised_time():
    plan = Plan(TARGET, ROWS)
    assert retarget(plan, TARGET.schedule).grid == ROWS  # its own schedule: the plan itself
    longer = retarget(plan, (0.95, 0.8, 0.7, 0.5, 0.4, 0.2, 0.1, 0.0))
    assert longer.grid == (ROWS[0], ROWS[0], ROWS[1], ROWS[1], ROWS[2], ROWS[2], ROWS[3], ROWS[3])
    assert longer.target.num_steps == 8 and longer.target.schedule[0] == 0.95
    assert longer.provenance["retargeted_from"] == {"num_steps": 4, "cells_computed_in_full": 0, "provenance": {}}
    CachePlanner(longer, build_strategies(longer))  # a valid plan: every read cache is made earlier


def test_a_cell_whose_cache_was_made_at_a_dropped_step_computes_in_full():
    plan = Plan(TARGET, ROWS)
    shorter = retarget(plan, (0.62, 0.31))  # steps 1 and 2: the first reads what the dropped step 0 made
    assert shorter.grid == (("full", "full"), ("full", "wars"))  # ast read the dropped step 0: full; wars reads row 0
    assert shorter.provenance["retargeted_from"]["cells_computed_in_full"] == 1
    CachePlanner(shorter, build_strategies(shorter))


def test_a_sparsedit_plans_poolingformer_layer_computes_as_pool_where_its_cache_was_made_at_a_dropped_step():
    rows = (("pool", "full"), ("reuse", "reuse"), ("pool", "full"), ("reuse", "reuse"))
    plan = Plan(TARGET, rows, sparse={"pool_layers": 1, "modules": [], "curve": {"name": "constant", "r": 0.5}})
    shorter = retarget(plan, (0.62, 0.31, 0.05))  # steps 1, 2 and 3: the first reads what the dropped step 0 made
    assert shorter.grid == (("pool", "full"), ("pool", "full"), ("reuse", "reuse"))
    assert shorter.sparse == plan.sparse and shorter.provenance["retargeted_from"]["cells_computed_in_full"] == 2


def test_plans_that_cannot_be_re_targeted_say_why_in_one_line():
    older = Plan(replace(TARGET, schedule=()), ROWS)
    with pytest.raises(PlanError, match="cannot re-target the plan to 2 steps: it records no schedule .* `ditplan "
                                        "retarget PLAN --steps M --experiment FILE`") as err:
        retarget(older, (0.5, 0.1))
    assert "\n" not in str(err.value)
    with pytest.raises(PlanError, match="one of diffusers' caches counts steps in the cache's config"):
        retarget(Plan.uniform(TARGET, cache={"method": "taylorseer", "config": {"cache_interval": 2}}), (0.5, 0.1))
    with pytest.raises(PlanError, match="cannot re-target the plan to 0 steps: give 1 … 10000 steps"):
        retarget(Plan(TARGET, ROWS), ())


def test_a_plan_records_its_schedule_and_loads_it_back(tmp_path):
    plan = Plan(TARGET, ROWS)
    assert load_plan(plan.save(tmp_path / "p.yaml")).target.schedule == TARGET.schedule
    data = yaml.safe_load((tmp_path / "p.yaml").read_text())
    data["target"]["schedule"] = [0.9, 0.6]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match="target.schedule is not 4 normalised times between 0 and 1"):
        load_plan(tmp_path / "bad.yaml")


def test_ditplan_retarget_writes_the_plan_at_the_new_step_count_also_from_an_older_plan(tmp_path, capsys):
    adapter = load_adapter("dit", "embedded")
    settings = SamplerSettings(num_steps=5, guidance_scale=4.0)
    rows = [["full"] * 6] + [["ast", "wars", "reuse", "full", "asc", "forecast"]] * 4
    plan = Plan(plan_target(adapter, settings), tuple(map(tuple, rows)), params={"wars": {"window_size": 32}})
    older = replace(plan, target=replace(plan.target, schedule=()))
    older.save(tmp_path / "plan.yaml")
    main(["retarget", str(tmp_path / "plan.yaml"), "--steps", "9"])
    assert "5 → 9 steps by normalised time" in capsys.readouterr().out
    written = load_plan(tmp_path / "plan-9steps.yaml")
    assert written.num_steps == 9 and written.target.schedule == plan_target(adapter, replace(settings, num_steps=9)).schedule
    assert written == replace(retarget_to_steps(plan, adapter, 9), provenance=written.provenance)
    assert written.params == {"wars": {"window_size": 32}}


def test_ditplan_retarget_refuses_in_one_line_what_it_cannot_do(tmp_path, capsys):
    Plan(replace(TARGET, model="not-here"), ROWS).save(tmp_path / "plan.yaml")
    flux = tmp_path / "flux-folder"  # a local FLUX.1 folder: its prompts and image size are its experiment's
    (flux / "transformer").mkdir(parents=True)
    (flux / "transformer" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
    Plan(replace(TARGET, model=str(flux)), ROWS).save(tmp_path / "flux.yaml")
    for plan, args, message in [
        ("plan.yaml", [], "the plan's model 'not-here' is not on this machine (or needs its experiment's prompts); give "
                          "--experiment"),
        ("flux.yaml", [], "is not on this machine (or needs its experiment's prompts); give --experiment"),
        ("plan.yaml", ["--experiment", str(DATA / "tiny-dit.yaml")], "does not fit this model/sampler"),
        ("plan.yaml", ["--steps", "20000"], "--steps 20000: give the step count to re-target the plan to, 1 … 10000"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["retarget", str(tmp_path / plan), "--steps", "6", *args])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message in err and "\n" not in err


@pytest.mark.parametrize("recorded", ["embedded/sparse/p1-s1_6", "folder"])
def test_the_shipped_sparsedit_plan_is_re_targeted_by_ditplan_retarget_and_in_a_pipeline_alike(tmp_path, capsys,
                                                                                               recorded):
    """The quickstart's knee plan runs a fine-tuned network: `ditplan retarget` finds its base model from the plan
    alone (named as shipped, or as an export writes it: the network's own folder), and a stock pipeline called at
    that step count runs the same plan re-targeted as ditplan's loop does."""
    import numpy as np

    import ditplan
    from ditplan.models.adapters import model_folder
    from ditplan.models.pipelines import embedded_pipeline
    from ditplan.strategies.apply import run_plan
    from tests.test_pipelines import as_pipeline_images, generators

    knee = ditplan.shipped_plan("quickstart-knee")
    model = str(model_folder("embedded") / "sparse" / "p1-s1_6") if recorded == "folder" else recorded
    knee = replace(knee, target=replace(knee.target, model=model))
    knee.save(tmp_path / "knee.yaml")
    main(["retarget", str(tmp_path / "knee.yaml"), "--steps", "7"])
    assert "20 → 7 steps" in capsys.readouterr().out
    adapter = load_adapter("dit", "embedded")
    written = load_plan(tmp_path / "knee-7steps.yaml")
    assert written == replace(retarget_to_steps(knee, adapter, 7), provenance=written.provenance)
    assert "pool" in {row[0] for row in written.grid} <= {"pool", "reuse"}  # its Poolingformer layer stays one
    assert "off" in written.guidance and "reuse" in {row[1] for row in written.grid}
    settings = SamplerSettings(num_steps=7, guidance_scale=4.0)
    ours = as_pipeline_images(run_plan(adapter, written, [3, 8], [1, 2], settings).samples)
    pipe = embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ditplan.apply_plan(pipe, knee)
    with pytest.warns(UserWarning, match="runs re-targeted to 7 steps"):
        images = pipe(class_labels=[3, 8], num_inference_steps=7, guidance_scale=4.0, output_type="np",
                      generator=generators([1, 2])).images
    np.testing.assert_allclose(images, ours, rtol=0, atol=1e-5)
