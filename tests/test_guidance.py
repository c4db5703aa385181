"""Guidance on an interval: the unconditional branch skipped at chosen steps, in stock pipelines and ditplan's loop."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ditplan
from ditplan.evaluators.cost import plan_flops
from ditplan.models.adapters import load_adapter
from ditplan.models.context import StepContext
from ditplan.models.sampling import plan_target
from ditplan.plan import Plan, PlanError
from ditplan.strategies.apply import get_runtime, run_plan
from ditplan.strategies.guidance import GuidanceRunner, GuidanceSchedule
from ditplan.strategies.retarget import retarget_to_steps
from tests.test_pipelines import (
    DIT,
    MIXED,
    as_pipeline_images,
    dit_pipe,
    plan_for,
    run_dit,
)

STEPS = 6
SETTINGS = replace(DIT, num_steps=STEPS)
GRID = [["full", "full"], ["ast", "asc"], ["full", "wars"], ["ast", "wars+asc"], ["asc", "full"], ["ast", "ast"]]


def guided(adapter, guidance: str, grid=GRID, settings=SETTINGS) -> Plan:  # noqa: ANN001
    plan = plan_for(adapter, settings, grid)
    return Plan.from_dict({**plan.to_dict(), "guidance": guidance})


class Recorded:
    """A transformer call that returns its branch's mark (cond 10·step, uncond 100·step) per row, and logs calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None, int]] = []

    def __call__(self, context: StepContext, args: tuple, kwargs: dict):  # noqa: ANN204
        rows = args[0].shape[0]
        self.calls.append((context.step, context.branch, rows))
        mark = {"cond": 10.0, "uncond": 100.0}[context.branch] * context.step + args[0][:, :1]
        return (mark,)


def test_each_fill_stands_in_for_the_unconditional_prediction_and_its_call_never_runs():
    schedule = GuidanceSchedule(("full", "full", "reuse", "forecast", "off", "full"))
    runner, call = GuidanceRunner(schedule), Recorded()
    uncond = {}
    for step in range(6):
        for branch in ("cond", "uncond"):
            context = StepContext(step, 6, cfg=True, branch=branch)
            out = runner.forward(call, context, (torch.zeros(2, 1),), {})
            if branch == "uncond":
                uncond[step] = out[0][0, 0].item()
    # computed at 0, 1, 5; step 2 reuses step 1 (100); step 3 forecasts from 0 and 1 (100 + 100·2 = 300); step 4: cond
    assert uncond == {0: 0.0, 1: 100.0, 2: 100.0, 3: 300.0, 4: 40.0, 5: 500.0}
    assert [(s, b) for s, b, _ in call.calls if b == "uncond"] == [(0, "uncond"), (1, "uncond"), (5, "uncond")]


@pytest.mark.parametrize("cond_first", [True, False])
def test_a_batch_of_both_halves_runs_as_two_calls_and_a_skipped_step_computes_the_conditional_rows_only(cond_first):
    runner, call = GuidanceRunner(GuidanceSchedule(("full", "off"))), Recorded()
    latents = torch.arange(4.0).reshape(4, 1)  # rows 0-1 and 2-3: the two halves
    cond_rows, uncond_rows = (slice(0, 2), slice(2, 4)) if cond_first else (slice(2, 4), slice(0, 2))
    for step in range(2):
        out = runner.forward(call, StepContext(step, 2, cfg=True, cond_first=cond_first), (latents,), {})[0]
        assert torch.equal(out[cond_rows], 10.0 * step + latents[cond_rows])
        expected_uncond = 10.0 * step + latents[cond_rows] if step else latents[uncond_rows]  # off: the conditional
        assert torch.equal(out[uncond_rows], expected_uncond)
    assert call.calls == [(0, "cond", 2), (0, "uncond", 2), (1, "cond", 2)]


@pytest.mark.parametrize("guidance", ["full:2 reuse:1 full:1 reuse:2", "full:2 forecast:2 full:1 off:1", "full:1 off:5"])
def test_a_guided_plan_runs_in_the_dit_pipeline_as_in_ditplans_loop(dit_folder, guidance):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plan = guided(adapter, guidance)
    pipe = dit_pipe(dit_folder)
    ditplan.apply_plan(pipe, plan)
    images = run_dit(pipe, [1, 2, 3], [5, 6, 7], num_inference_steps=STEPS)
    ours = run_plan(adapter, plan, [1, 2, 3], [5, 6, 7], SETTINGS).samples
    np.testing.assert_allclose(images, as_pipeline_images(ours), rtol=0, atol=1e-5)
    unguided = run_plan(adapter, plan_for(adapter, SETTINGS, GRID), [1, 2, 3], [5, 6, 7], SETTINGS).samples
    assert (ours - unguided).abs().max() > 1e-3  # the skipped steps changed the samples


def test_guidance_computed_at_every_step_is_bit_identical_to_no_guidance_part(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plain = run_plan(adapter, plan_for(adapter, SETTINGS, GRID), [1, 2], [5, 6], SETTINGS).samples
    assert torch.equal(run_plan(adapter, guided(adapter, f"full:{STEPS}"), [1, 2], [5, 6], SETTINGS).samples, plain)


def test_a_guided_plans_flops_are_what_flop_counter_mode_counts(tiny_adapter, tiny_spec):
    settings = replace(tiny_spec.sampler.settings(), num_steps=STEPS)
    for guidance in ("full:2 reuse:1 full:1 reuse:2", "full:1 off:5", "full:3 forecast:3", f"full:{STEPS}"):
        plan = guided(tiny_adapter, guidance, settings=settings)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # attention as counted matmuls
            run_plan(tiny_adapter, plan, [1, 2], [5, 6], settings)
        assert plan_flops(tiny_adapter, plan, settings, batch=2).total == counter.get_total_flops(), guidance


def test_bad_guidance_is_refused_in_one_line(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    with pytest.raises(PlanError, match=r"plan guidance names 'reuze' \(did you mean 'reuse'\?\)"):
        ditplan.apply_plan(dit_pipe(dit_folder), guided(adapter, "full:1 reuze:5"))
    with pytest.raises(PlanError, match="plan guidance starts with 'off'.*make step 0 'full'"):
        ditplan.apply_plan(dit_pipe(dit_folder), guided(adapter, "off:6"))
    with pytest.raises(PlanError, match="plan guidance 'full:2' covers 2 steps, but its target says 6"):
        guided(adapter, "full:2")


def test_a_guided_plan_re_targets_its_guidance_by_normalised_time(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plan = guided(adapter, "full:1 off:5", grid=MIXED[:1] * STEPS)
    longer = retarget_to_steps(plan, adapter, 12)
    computed = longer.guidance.count("full")  # the steps nearest the plan's step 0 in normalised time
    assert computed in (1, 2) and longer.guidance == ("full",) * computed + ("off",) * (12 - computed)
    run_plan(adapter, longer, [1], [5], replace(SETTINGS, num_steps=12))  # and it runs


def test_a_search_space_draws_guidance_per_step_segment_and_reads_it_back_from_the_plan(tiny_adapter, tiny_spec):
    import optuna

    from ditplan.plansearch.space import GuidanceChoices, build_space

    settings = replace(tiny_spec.sampler.settings(), num_steps=STEPS)
    # segments of 1, 2 and 2 steps: none to skip in the first, and every 2nd or 3rd step the same in the others
    space = build_space(plan_target(tiny_adapter, settings), ["full", "ast", "asc"], layer_groups=1,
                        step_segments=[1, 2, 4], guidance=GuidanceChoices(("reuse", "forecast", "off"), (2, 3, 0)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(60):
        trial = study.ask()
        plan = space.suggest(trial)
        assert space.params_for(plan) == trial.params  # one set of parameters per plan: repeats are found
        assert trial.params.get("guidance.S1-1.every", 0) == 0  # a step that computes there is 'full'
        drawn.add(plan.guidance)
        study.tell(trial, 0.0)
    last = {guidance[4:] for guidance in drawn if guidance}  # segment S4-5
    assert None in drawn and ("full", "reuse") in last  # computed every 2nd step, reused between
    assert ("off", "off") in last  # none of its steps computes
    for guidance in drawn - {None}:
        plan = replace(Plan.uniform(plan_target(tiny_adapter, settings)), guidance=guidance)
        run_plan(tiny_adapter, plan, [1], [5], settings)  # every drawn schedule runs


def test_guidance_choices_the_space_cannot_take_are_one_line(tiny_spec):
    from pydantic import ValidationError

    from ditplan.errors import UserError
    from ditplan.models.adapters import experiment_adapter
    from ditplan.plansearch.space import experiment_space

    def space_of(guidance, **sampler):  # noqa: ANN001, ANN202
        spec = tiny_spec.model_copy(update={
            "sampler": tiny_spec.sampler.model_copy(update=sampler),
            "search": tiny_spec.search.model_copy(update={"space": tiny_spec.search.space.model_copy(
                update={"guidance": guidance})})})
        return experiment_space(experiment_adapter(spec), spec)

    from ditplan.spec import GuidanceSpaceSpec

    with pytest.raises(UserError, match=r"search.space.guidance.fills: unknown guidance fill 'of' \(did you mean 'off'\?\)"):
        space_of(GuidanceSpaceSpec(fills=["of"]))
    with pytest.raises(UserError, match="the sampler runs none; drop search.space.guidance"):
        space_of(GuidanceSpaceSpec(), guidance_scale=1.0)
    with pytest.raises(ValidationError, match="every: 1 computes every step"):
        GuidanceSpaceSpec(every=[1, 2])


def test_a_plans_description_says_where_its_guidance_skips_the_unconditional_branch(dit_folder):
    from ditplan.strategies.summary import describe

    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plan = guided(adapter, "full:1 reuse:1 full:1 reuse:1 off:2", grid=[["full", "full"]] * STEPS)
    assert describe(plan) == "unconditional branch reuse every 2nd step of steps 1–3; unconditional branch off from step 4"


def test_a_guided_plan_in_a_pipeline_at_another_step_count_runs_re_targeted_as_ditplans_loop(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    plan = guided(adapter, "full:3 off:3")
    pipe = dit_pipe(dit_folder)
    ditplan.apply_plan(pipe, plan)
    for steps in (3, 12):
        with pytest.warns(UserWarning, match=f"runs re-targeted to {steps} steps"):
            images = run_dit(pipe, [1, 2], [5, 6], num_inference_steps=steps)
        ours = run_plan(adapter, retarget_to_steps(plan, adapter, steps), [1, 2], [5, 6], replace(SETTINGS, num_steps=steps))
        np.testing.assert_allclose(images, as_pipeline_images(ours.samples), rtol=0, atol=1e-5)


def test_asc_frees_what_it_left_for_an_unconditional_call_that_does_not_run(dit_folder):
    adapter = load_adapter("dit", str(dit_folder), vae=str(dit_folder))
    grid = [["full", "full"]] + [["asc", "asc"]] * (STEPS - 1)
    pipe = dit_pipe(dit_folder)
    ditplan.apply_plan(pipe, guided(adapter, "full:1 off:1 full:1 off:3", grid))
    left = []  # after each step's transformer call: what the conditional call left for the unconditional one
    pipe.transformer.register_forward_hook(
        lambda *_: left.append(sum(map(bool, get_runtime(pipe.transformer).between_calls.values()))))
    run_dit(pipe, [1], [5], num_inference_steps=STEPS)
    assert left == [0] * STEPS


def test_a_guided_sparsedit_plan_splits_into_the_rows_of_its_batch_and_costs_what_flop_counter_mode_counts(tiny_adapter,
                                                                                                          tiny_spec):
    """SparseDiT's token modules act sample by sample and keep nothing between calls: a step computed as two calls on
    the halves gives the rows of one call on the batch, and the FLOPs count what both branches ran."""
    from ditplan.strategies import apply_plan, remove_plan
    from tests.test_sparse import module_cached_plan, one_forward

    settings = tiny_spec.sampler.settings()
    target = plan_target(tiny_adapter, settings)
    plan = module_cached_plan(target, [["full", "reuse", "full", "forecast"]] * 2, r=0.75)
    inputs = tiny_adapter.conditioning([1, 2], torch.device("cpu")).for_batch(settings.cfg)
    x = torch.randn(2, tiny_adapter.latent_channels, tiny_adapter.latent_size, tiny_adapter.latent_size)
    predictions = []
    for guidance in (None, ("full", "reuse", "full", "off")):
        apply_plan(tiny_adapter.transformer, replace(plan, guidance=guidance), target)
        try:
            predictions.append(one_forward(tiny_adapter, settings, x, inputs))
        finally:
            remove_plan(tiny_adapter.transformer)
    torch.testing.assert_close(predictions[1], predictions[0], rtol=0, atol=1e-5)  # batched vs per-half matmuls
    for guidance in (("full", "reuse", "full", "off"), ("full", "off", "off", "forecast")):
        guided_plan = replace(plan, guidance=guidance)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run_plan(tiny_adapter, guided_plan, [1, 2], [5, 6], settings)
        assert plan_flops(tiny_adapter, guided_plan, settings, batch=2).total == counter.get_total_flops(), guidance


def test_a_bare_off_in_an_experiment_file_is_the_fill_off(tmp_path):
    from ditplan.files import read_yaml
    from ditplan.spec import GuidanceSpaceSpec

    (tmp_path / "space.yaml").write_text("{fills: [reuse, off], every: [0]}")
    assert GuidanceSpaceSpec.model_validate(read_yaml(tmp_path / "space.yaml", "file")).fills == ["reuse", "off"]
