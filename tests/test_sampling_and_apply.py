import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ditplan.cli import main
from ditplan.models.sampling import Snapshot, plan_target, sample, sample_batch
from ditplan.plan import Plan, PlanError, PlanTarget
from ditplan.strategies import apply_plan, remove_plan
from tests.conftest import DATA


def _sample(adapter, spec):
    return sample(adapter, spec.workload.conditions(), spec.workload.seeds(), spec.sampler.settings())


def test_same_seed_same_samples(tiny_adapter, tiny_spec):
    a, b = _sample(tiny_adapter, tiny_spec), _sample(tiny_adapter, tiny_spec)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # different seeds give different samples


def test_all_full_plan_is_bit_identical_to_no_plan(tiny_adapter, tiny_spec):
    dense = _sample(tiny_adapter, tiny_spec)
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    apply_plan(tiny_adapter.transformer, Plan.uniform(target, "full"), target)
    try:
        planned = _sample(tiny_adapter, tiny_spec)
    finally:
        remove_plan(tiny_adapter.transformer)
    assert torch.equal(planned, dense)


def test_a_run_resumed_from_a_snapshot_equals_the_whole_run_dense_and_under_a_plan(tiny_adapter, tiny_spec):
    import copy

    settings = tiny_spec.sampler.settings()  # DPM-Solver++ 2M: the scheduler keeps the previous prediction
    batch = tiny_spec.workload.conditions()[:3], tiny_spec.workload.seeds()[:3]
    kept = {}

    def keep(i, latents, scheduler):
        kept[i + 1] = Snapshot(i + 1, latents.clone(), copy.deepcopy(scheduler))

    whole = sample_batch(tiny_adapter, *batch, settings, on_step=keep)
    for step in (1, 2):
        assert torch.equal(sample_batch(tiny_adapter, *batch, settings, start=kept[step]), whole)
    target = plan_target(tiny_adapter, settings)
    grid = [["full", "full"], ["full", "full"], ["ast", "asc"], ["full", "full"]]  # step 2 reads step 1's caches
    apply_plan(tiny_adapter.transformer, Plan(target, tuple(map(tuple, grid))), target)
    try:
        planned = sample_batch(tiny_adapter, *batch, settings)
        resumed = sample_batch(tiny_adapter, *batch, settings, start=kept[1])  # from the dense step 1 on
    finally:
        remove_plan(tiny_adapter.transformer)
    assert not torch.equal(planned, whole) and torch.equal(resumed, planned)


def test_remove_plan_restores_the_original_processors_and_weights(tiny_adapter, tiny_spec):
    transformer = tiny_adapter.transformer
    processors = {name: m.processor for name, m in transformer.named_modules() if hasattr(m, "set_processor")}
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    apply_plan(transformer, Plan.uniform(target), target)
    modules = dict(transformer.named_modules())
    assert all(type(modules[k].processor).__name__ == "PlanAttnProcessor" for k in processors if k.endswith("attn1"))
    remove_plan(transformer)
    assert all(modules[k].processor is p for k, p in processors.items())
    assert all(torch.equal(transformer.state_dict()[k], v) for k, v in state.items())
    assert not hasattr(transformer, "_ditplan_runtime")


def test_a_plan_for_12_layers_is_refused_on_a_smaller_model(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    twelve = PlanTarget(**{**target.__dict__, "num_layers": 12})
    with pytest.raises(PlanError, match="layers: plan has 12, target has 2"):
        apply_plan(tiny_adapter.transformer, Plan.uniform(twelve), target)
    with pytest.raises(PlanError, match="plan is for 12 layers but this model has 2 layers"):
        apply_plan(tiny_adapter.transformer, Plan.uniform(twelve))
    assert not hasattr(tiny_adapter.transformer, "_ditplan_runtime")


def test_a_plan_cannot_be_applied_twice(tiny_adapter, tiny_spec):
    target = plan_target(tiny_adapter, tiny_spec.sampler.settings())
    apply_plan(tiny_adapter.transformer, Plan.uniform(target))
    try:
        with pytest.raises(PlanError, match="already applied"):
            apply_plan(tiny_adapter.transformer, Plan.uniform(target))
    finally:
        remove_plan(tiny_adapter.transformer)


@pytest.mark.parametrize("experiment", ["tiny-dit.yaml", "tiny-pixart.yaml"])
def test_generate_writes_a_grid_and_raw_samples(tmp_path, experiment):
    main(["generate", "--experiment", str(DATA / experiment), "--out", str(tmp_path)])
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    from safetensors.torch import load_file

    samples = load_file(str(tmp_path / "samples.safetensors"))["samples"]
    assert samples.shape[0] == {"tiny-dit.yaml": 6, "tiny-pixart.yaml": 4}[experiment]
    assert torch.isfinite(samples).all()


def test_generate_refuses_a_plan_made_for_another_sampler(tmp_path, tiny_adapter, tiny_spec, capsys):
    settings = tiny_spec.sampler.settings()
    plan_path = Plan.uniform(plan_target(tiny_adapter, replace(settings, num_steps=50))).save(tmp_path / "p.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--experiment", str(DATA / "tiny-dit.yaml"), "--plan", str(plan_path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "steps: plan has 50, target has 4 (ditplan retarget PLAN --steps 4 re-targets it)" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_generate_runs_a_float32_plan_on_the_same_weights_in_bfloat16_with_a_warning(tmp_path, tiny_adapter, tiny_spec):
    plan_path = Plan.uniform(plan_target(tiny_adapter, tiny_spec.sampler.settings())).save(tmp_path / "p.yaml")
    experiment = tmp_path / "bfloat16.yaml"
    experiment.write_text((DATA / "tiny-dit.yaml").read_text().replace("  device: cpu", "  device: cpu\n  dtype: bfloat16"))
    with pytest.warns(UserWarning, match="plan was measured in float32 and runs here in bfloat16"):
        main(["generate", "--experiment", str(experiment), "--plan", str(plan_path), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "grid.png").exists()


def test_a_bad_experiment_file_gives_one_line_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((DATA / "tiny-dit.yaml").read_text().replace("num_steps: 4", "num_steps: -3"))
    result = subprocess.run(
        [sys.executable, "-m", "ditplan.cli", "generate", "--experiment", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "sampler.num_steps = -3: Input should be greater than 0" in lines[0]
    assert not (tmp_path / "o").exists()
