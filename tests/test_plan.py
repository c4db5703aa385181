import pytest
import yaml

from ditplan.plan import Plan, PlanError, PlanTarget, decode_runs, encode_runs, load_plan

TARGET = PlanTarget("m", "abc", num_layers=3, num_tokens=64, scheduler="ddim", num_steps=4, guidance_scale=4.0)


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
