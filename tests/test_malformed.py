"""A corpus of malformed experiment and plan files (``tests/data/malformed``): each is refused in one line
naming the problem, with nothing written. Every file goes through the readers every command uses
(:func:`ditplan.workflow.prepare` for experiments; ``load_plan`` and ``check_plan`` for plans); one file per
command goes through the CLI, which turns such an error into ``error: …`` on stderr and exit 2."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from ditplan.cli import main
from ditplan.comparison.report import load_run_data
from ditplan.errors import UserError
from ditplan.files import naming
from ditplan.plan import load_plan
from ditplan.strategies.apply import check_plan
from ditplan.workflow import prepare

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "malformed"
EXPERIMENTS = sorted(p.name for p in CORPUS.glob("exp-*.yaml"))
PLANS = sorted(p.name for p in CORPUS.glob("plan-*.yaml"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_hash() -> str:
    from ditplan.models.adapters import adapter_from_spec
    from ditplan.spec import load_spec

    return adapter_from_spec(load_spec(DATA / "tiny-dit.yaml").model).weights_hash


@pytest.fixture()
def inputs(tmp_path, tiny_hash, monkeypatch) -> Path:
    """The corpus under ``tmp_path/in`` (plans made for the tiny DiT's weights) and an empty working folder."""
    root = tmp_path / "in"
    shutil.copytree(CORPUS, root / "malformed")
    for plan in (root / "malformed").glob("plan-*.yaml"):
        data = plan.read_bytes().replace(b"HASH", tiny_hash.encode())
        plan.write_bytes(data)
    shutil.copy(DATA / "tiny-pixart-prompts.safetensors", root)
    shutil.copy(DATA / "tiny-dit.yaml", root)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return root


def _one_line(error: UserError) -> str:
    line = str(error)
    assert "\n" not in line and len(line) < 600, line
    return line


def test_every_malformed_experiment_file_is_refused_by_the_readers_in_one_line(inputs):
    before = _files(inputs.parent)
    for name in EXPERIMENTS:
        path = inputs / "malformed" / name
        with pytest.raises(UserError) as found:
            prepare(path, searches=True)
        assert name in _one_line(found.value) or "experiment file" in str(found.value), (name, found.value)
        run = inputs / "run"
        run.mkdir()
        shutil.copy(path, run / "experiment.yaml")  # a run directory holding it: compare and export read it so
        with pytest.raises(UserError) as found:  # its experiment, or that no search ran there
            load_run_data(run)
        _one_line(found.value)
        shutil.rmtree(run)
    assert _files(inputs.parent) == before, "a reader wrote files"


def test_every_malformed_plan_file_is_refused_by_the_readers_in_one_line(inputs, tiny_adapter, tiny_spec):
    settings = tiny_spec.sampler.settings()
    for name in PLANS:
        path = inputs / "malformed" / name
        with pytest.raises(UserError) as found:
            plan = load_plan(path)
            with naming(path):
                check_plan(plan, tiny_adapter, settings)
        assert str(path) in _one_line(found.value), (name, found.value)


def test_the_corpus_is_large_enough():
    assert len(EXPERIMENTS) >= 25 and len(PLANS) >= 20


def _fails_in_one_line(argv: list[str], root: Path, capsys) -> str:
    before = _files(root.parent)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert _files(root.parent) == before, "a failed command wrote files"
    return lines[0]


EXPERIMENT_COMMANDS = {  # command → (a malformed experiment file, its arguments)
    "generate": ("exp-class-out-of-range.yaml", lambda exp: ["generate", "--experiment", exp, "--out", "out"]),
    "evaluate": ("exp-reference-missing.yaml", lambda exp: ["evaluate", "--experiment", exp]),
    "greedy": ("exp-mistyped-model-folder.yaml", lambda exp: ["greedy", "--experiment", exp, "--out", "out"]),
    "search": ("exp-proposals-samples.yaml", lambda exp: ["search", "--experiment", exp, "--out", "out"]),
    "run": ("exp-pixart-embeddings-wrong-prompts.yaml", lambda exp: ["run", "--experiment", exp]),
}


@pytest.mark.parametrize("command", list(EXPERIMENT_COMMANDS))
def test_a_malformed_experiment_file_through_each_command_is_one_line_and_writes_nothing(command, inputs, capsys):
    name, argv = EXPERIMENT_COMMANDS[command]
    _fails_in_one_line(argv(str(inputs / "malformed" / name)), inputs, capsys)


@pytest.mark.parametrize("command", ["compare", "export"])
def test_a_run_directory_with_a_malformed_experiment_is_one_line(command, inputs, capsys):
    run = inputs / "run"
    run.mkdir()
    shutil.copy(inputs / "malformed" / "exp-steps-not-a-number.yaml", run / "experiment.yaml")
    argv = ["compare", str(run), "--out", "report"] if command == "compare" else ["export", str(run), "--select", "knee", "--out", "out"]
    _fails_in_one_line(argv, inputs, capsys)


@pytest.mark.parametrize("command, name", [("generate", "plan-grid-unknown-strategy.yaml"),
                                           ("evaluate", "plan-target-missing-steps.yaml"),
                                           ("search", "plan-cache-unknown.yaml")])
def test_a_malformed_plan_file_through_each_command_is_one_line_and_writes_nothing(command, name, inputs, capsys):
    plan = inputs / "malformed" / name
    experiment = str(inputs / "tiny-dit.yaml")
    if command == "search":
        warm = inputs / "warm"
        warm.mkdir()
        shutil.copy(plan, warm / name)
        argv = ["search", "--experiment", experiment, "--warm-start", str(warm), "--out", "out", "--trials", "1"]
    else:
        argv = [command, "--experiment", experiment, "--plan", str(plan)] + (["--out", "out"] if command == "generate" else [])
    _fails_in_one_line(argv, inputs, capsys)


@pytest.mark.parametrize("command", ["generate", "search", "run"])
def test_unreadable_paths_are_one_line(command, inputs, capsys):
    _, argv = EXPERIMENT_COMMANDS[command]
    for path in (inputs / "malformed", inputs / "no-such-file.yaml"):  # a folder, a missing file
        line = _fails_in_one_line(argv(str(path)), inputs, capsys)
        assert str(path) in line
    big = inputs / "big.yaml"
    big.write_text("name: x\n" + "# padding\n" * 200_000)
    assert "bytes" in _fails_in_one_line(argv(str(big)), inputs, capsys)


@pytest.mark.parametrize("command", ["search", "run"])
@pytest.mark.parametrize("given, found", [("--ray-address", "no Ray cluster answers at --ray-address '127.0.0.1:"),
                                          ("RAY_ADDRESS", "no Ray cluster answers at RAY_ADDRESS '127.0.0.1:"),
                                          ("malformed", "--ray-address 'headnode' is not host:port")])
def test_a_ray_address_nothing_answers_at_is_one_line_at_once(command, given, found, inputs, capsys, monkeypatch):
    """ray.init would retry such an address for many minutes; ``run`` would find out only after greedy."""
    from tests.conftest import free_port

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{free_port()}"  # a port nothing listens on
    argv = EXPERIMENT_COMMANDS[command][1](str(inputs / "tiny-dit.yaml"))
    if given == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        argv += ["--ray-address", address if given == "--ray-address" else "headnode"]
    started = time.monotonic()
    line = _fails_in_one_line(argv, inputs, capsys)
    assert found in line and time.monotonic() - started < 30, line
