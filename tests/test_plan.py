from dataclasses import replace

import pytest
import yaml

from ditplan.models.identity import Binding, binding
from ditplan.plan import Plan, PlanError, PlanTarget, decode_runs, encode_runs, load_plan

TARGET = PlanTarget("m", "abc", num_layers=3, num_tokens=64, scheduler="ddim", num_steps=4, guidance_scale=4.0)
# one model's weights as measured in three dtypes (hand-made hashes); "abc" is TARGET's, which records no dtype
FLOAT32 = replace(TARGET, weights_hash="w32", dtype="float32", cast_hashes={"float16": "w16", "bfloat16": "wbf"})
BFLOAT16 = replace(TARGET, weights_hash="wbf", dtype="bfloat16", cast_hashes={"float16": "wbf-16"})
FLOAT16 = replace(TARGET, weights_hash="w16", dtype="float16", cast_hashes={"bfloat16": "w16-bf"})


def mixed_plan() -> Plan:
    grid = (
        ("full", "full", "full"),
        ("ast", "full", "wars"),
        ("ast", "asc", "wars"),
        ("full", "asc", "ast"),
    )
    return Plan(TARGET, grid, params={"wars": {"window_size": 8}}, provenance={"search": "manual", "metrics": {"x": 1.5}})


def test_yaml_round_trip_is_lossless(tmp_path):
    plan = mixed_plan()
    path = plan.save(tmp_path / "p.yaml")
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()


def test_grid_is_run_length_encoded_one_line_per_layer(tmp_path):
    data = yaml.safe_load(mixed_plan().save(tmp_path / "p.yaml").read_text())
    assert data["grid"] == ["full:1 ast:2 full:1", "full:2 asc:2", "full:1 wars:2 ast:1"]
    assert decode_runs(encode_runs(["a", "a", "b"])) == ["a", "a", "b"]


def test_save_does_not_mutate_and_leaves_no_temp_file(tmp_path):
    plan = mixed_plan()
    before = plan.to_dict()
    plan.save(tmp_path / "p.yaml")
    assert plan.to_dict() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(schema_version=99), "schema_version 99"),
        (lambda d: d["grid"].pop(), "2 layers"),
        (lambda d: d["grid"].__setitem__(0, "full:x"), "bad run 'full:x'"),
        (lambda d: d["target"].pop("num_steps"), "target is malformed"),
        (lambda d: d["target"].update(device="cuda"), "target is malformed"),
        (lambda d: d["target"].update(dtype="float64"), "target.dtype = 'float64' is not one of float32, float16, bfloat16"),
        (lambda d: d["target"].update(cast_hashes={"bfloat16": "wbf"}), "target.cast_hashes needs target.dtype"),
        (lambda d: d["target"].update(dtype="bfloat16", cast_hashes={"bfloat16": "wbf"}),
         "target.cast_hashes = .* is not a mapping of float16 to a weights hash"),
        (lambda d: d["target"].update(dtype="float32", cast_hashes=["w16"]), "target.cast_hashes = "),
        (lambda d: d["target"].update(dtype="float32", cast_hashes={"float16": 16}), "target.cast_hashes = "),
    ],
)
def test_malformed_plan_files_are_refused_by_name(tmp_path, edit, message):
    data = mixed_plan().to_dict()
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=message):
        load_plan(path)


def test_target_mismatch_names_what_differs():
    other = PlanTarget("m", "abc", num_layers=3, num_tokens=64, scheduler="dpmsolver++", num_steps=10, guidance_scale=4.0)
    with pytest.raises(PlanError, match=r"scheduler: plan has 'ddim', target has 'dpmsolver\+\+'; steps: plan has 4"):
        mixed_plan().check_fits(other)


def test_dtype_and_cast_hashes_round_trip_and_a_target_without_them_is_written_as_before(tmp_path):
    plan = Plan(FLOAT32, mixed_plan().grid)
    assert load_plan(plan.save(tmp_path / "p.yaml")) == plan
    assert list(mixed_plan().to_dict()["target"]) == ["model", "weights_hash", "num_layers", "num_tokens", "scheduler",
                                                      "num_steps", "guidance_scale"]


@pytest.mark.parametrize("plan, found, expected", [
    (FLOAT32, FLOAT32, Binding.SAME),
    (FLOAT32, BFLOAT16, Binding.CAST),  # the plan recorded its weights cast to bfloat16
    (FLOAT32, FLOAT16, Binding.CAST),
    (BFLOAT16, FLOAT32, Binding.CAST),  # the found weights cast to bfloat16 are the plan's
    (FLOAT16, BFLOAT16, Binding.OTHER),  # float16 cast to bfloat16 rounds twice: not bfloat16's own weights
    (FLOAT32, replace(BFLOAT16, weights_hash="other"), Binding.OTHER),
    (replace(FLOAT32, weights_hash="abc"), TARGET, Binding.SAME),
    (TARGET, replace(BFLOAT16, cast_hashes={"float32": "abc"}), Binding.OTHER),  # an older plan binds by its exact hash only
])
def test_weights_bind_by_exact_hash_in_their_dtype_or_cast_to_the_other(plan, found, expected):
    assert binding(plan, found) is expected


def test_a_plan_fits_the_same_weights_in_another_dtype_with_a_warning_and_refuses_other_weights():
    with pytest.warns(UserWarning, match="plan was measured in float32 and runs here in bfloat16: its quality and speed "
                                         "figures were measured in float32"):
        Plan(FLOAT32, mixed_plan().grid).check_fits(BFLOAT16)
    with pytest.raises(PlanError, match="model weights \\(hash\\): plan has 'w32', target has 'other'"):
        Plan(FLOAT32, mixed_plan().grid).check_fits(replace(BFLOAT16, weights_hash="other"))
