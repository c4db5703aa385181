"""The ``ditplan`` command as a user meets it: --version, --help (light), the experiment as an argument or
a shipped name, did-you-mean for mistyped fields, folders and names, generate's options, the dashboard, and a
plan applied with only the base install's libraries."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

import ditplan
from ditplan.cli import build_parser, main
from ditplan.spec import SHIPPED_EXPERIMENTS, load_spec
from tests.conftest import DATA

ROOT = Path(__file__).parents[1]
HEAVY = {"torch", "diffusers", "optuna", "ray", "mlflow"}


def _run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code or 0
    out, err = capsys.readouterr()
    return code, out, err.strip()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_version_prints_the_package_version(capsys):
    code, out, _ = _run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"ditplan {ditplan.__version__}"


def test_help_and_version_import_no_heavy_library():
    result = _python(f"""
        import sys
        from ditplan.cli import build_parser, main
        build_parser().format_help()
        try:
            main(["--version"])
        except SystemExit:
            pass
        assert not {HEAVY!r} & set(sys.modules), {HEAVY!r} & set(sys.modules)
        """)
    assert result.returncode == 0, result.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_of_every_command_says_what_it_is():
    parser = build_parser()
    assert "Diffusion Transformers" in parser.description and "ditplan run quickstart" in parser.epilog
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            assert action.help, f"ditplan {name} {action.dest} has no help"


def test_a_bare_name_is_the_shipped_experiment_and_a_path_still_works():
    assert load_spec("quickstart") == load_spec(SHIPPED_EXPERIMENTS / "quickstart.yaml")
    assert load_spec("quickstart.yaml").name == "quickstart"
    assert load_spec(DATA / "tiny-dit.yaml").name == "tiny-dit"
    assert not (ROOT / "experiments").exists()  # moved into the package, no copies left


def test_a_shipped_experiment_writes_its_run_in_the_working_directory_and_names_its_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec("quickstart")
    assert spec.run_dir() == Path("runs/quickstart") and spec.model.source == "embedded"


def test_an_unknown_experiment_name_suggests_the_closest_shipped_one(capsys):
    code, _, err = _run_main(["run", "quickstrat"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "did you mean 'quickstart'?" in err and "digits-1024" in err


@pytest.mark.parametrize("experiment_args", [["EXP"], ["--experiment", "EXP"]])
def test_the_experiment_is_an_argument_or_an_option(experiment_args, tmp_path, capsys):
    argv = [a.replace("EXP", str(DATA / "tiny-dit.yaml")) for a in experiment_args]
    code, out, _ = _run_main(["generate", *argv, "--out", str(tmp_path / "g")], capsys)
    assert code == 0 and (tmp_path / "g" / "grid.png").exists()


@pytest.mark.parametrize("argv", [["generate"], ["generate", "a.yaml", "--experiment", "b.yaml"]],
                         ids=["neither", "both"])
def test_the_experiment_given_twice_or_not_at_all_is_one_line(argv, capsys):
    code, _, err = _run_main(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "one experiment" in err


def _experiment_with(tmp_path: Path, old: str, new: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text((DATA / "tiny-dit.yaml").read_text().replace(old, new))
    return str(path)


def test_a_mistyped_field_names_the_closest_valid_one(tmp_path, capsys):
    experiment = _experiment_with(tmp_path, "num_steps: 4", "steps: 4")
    code, _, err = _run_main(["generate", experiment], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "sampler.steps: unknown field (did you mean 'num_steps'?)" in err


def test_a_mistyped_model_folder_names_the_embedded_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = _experiment_with(tmp_path, """config: {sample_size: 16, patch_size: 4, in_channels: 4, out_channels: 8, num_layers: 2,
           num_attention_heads: 2, attention_head_dim: 8, num_embeds_ada_norm: 10}""", "source: embeded")
    code, _, err = _run_main(["generate", experiment], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "embeded does not exist (did you mean 'embedded'?)" in err


def test_generate_samples_the_classes_seed_and_count_asked_for(tmp_path, capsys):
    out = tmp_path / "g"
    code, _, err = _run_main(["generate", str(DATA / "tiny-dit.yaml"), "--class", "4", "--class", "5", "--num", "3",
                              "--seed", "7", "--out", str(out)], capsys)
    assert code == 0, err
    assert load_file(str(out / "samples.safetensors"))["samples"].shape[0] == 6


def test_generate_writes_to_a_default_folder_and_leaves_the_spec_as_it_was(tmp_path, monkeypatch):
    from ditplan.samples import with_workload

    monkeypatch.chdir(tmp_path)
    spec = load_spec(DATA / "tiny-dit.yaml")
    assert with_workload(spec, classes=[4], num=1).workload.conditions() == [4]
    assert spec == load_spec(DATA / "tiny-dit.yaml")
    main(["generate", str(DATA / "tiny-dit.yaml"), "--class", "4", "--num", "1"])
    assert (tmp_path / "samples" / "tiny-dit" / "grid.png").exists()


def test_generate_refuses_prompts_for_a_class_conditional_model(capsys):
    code, _, err = _run_main(["generate", str(DATA / "tiny-dit.yaml"), "--prompt", "a cat"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "give class labels" in err


def test_dashboard_prints_the_command_for_the_runs_journal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "optuna.journal").write_text("")
    code, out, _ = _run_main(["dashboard", str(tmp_path)], capsys)
    assert code == 0 and len(out.splitlines()) == 1
    assert f"optuna-dashboard {tmp_path / 'search' / 'optuna.journal'}" in out and "pip install optuna-dashboard" in out


def test_dashboard_of_a_folder_without_a_study_is_one_line(tmp_path, capsys):
    code, _, err = _run_main(["dashboard", str(tmp_path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "no Optuna study" in err


def test_a_command_whose_extra_is_missing_says_which_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails as it does without ditplan[search]
    code, _, err = _run_main(["run", "quickstart"], capsys)
    assert code == 2 and err == ("error: `ditplan run` needs the search extra (optuna is not installed): "
                                 "pip install 'ditplan[search]'")


def test_a_plan_applies_with_only_the_base_install(tmp_path):
    """The base install's libraries only: the search extra's modules are blocked (``None`` in sys.modules makes
    ``import`` raise ModuleNotFoundError and ``importlib.util.find_spec`` answer None, as when not installed)."""
    result = _python(f"""
        import sys
        BLOCKED = ("optuna", "ray", "mlflow", "torch_fidelity", "matplotlib", "plotly", "mlxtend", "rich")
        sys.modules.update(dict.fromkeys(BLOCKED))
        import ditplan
        from ditplan.models.adapters import load_adapter
        from ditplan.models.pipelines import embedded_pipeline
        from ditplan.models.sampling import plan_target
        from ditplan.plan import Plan
        from ditplan.spec import SamplerSettings

        settings = SamplerSettings(num_steps=4, guidance_scale=4.0)
        adapter = load_adapter("dit", "embedded")
        grid = tuple(tuple("full" if s == 0 else "ast" for _ in range(adapter.num_layers)) for s in range(4))
        path = Plan(plan_target(adapter, settings), grid).save({str(tmp_path / "plan.yaml")!r})
        pipe = embedded_pipeline()
        pipe.set_progress_bar_config(disable=True)
        ditplan.apply_plan(pipe, ditplan.load_plan(path))
        pipe(class_labels=[3], num_inference_steps=4, guidance_scale=4.0, output_type="np")
        ditplan.remove_plan(pipe)
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None]
        """)
    assert result.returncode == 0, result.stderr[-3000:]
