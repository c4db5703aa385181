"""A corpus of malformed experiment and plan files (``tests/data/malformed``) fed through every command
that reads them: each exits 2 with one line on stderr, no traceback, and nothing written."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from ditplan.cli import main

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "malformed"
EXPERIMENTS = sorted(p.name for p in CORPUS.glob("exp-*.yaml"))
PLANS = sorted(p.name for p in CORPUS.glob("plan-*.yaml"))
EVALUATION_ONLY = {"exp-reference-missing.yaml", "exp-extractor-unknown.yaml"}  # generate/greedy do not evaluate


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


EXPERIMENT_COMMANDS = {
    "generate": lambda exp, root: ["generate", "--experiment", exp, "--out", "out"],
    "evaluate": lambda exp, root: ["evaluate", "--experiment", exp],
    "greedy": lambda exp, root: ["greedy", "--experiment", exp, "--out", "out"],
    "search": lambda exp, root: ["search", "--experiment", exp, "--out", "out"],
    "run": lambda exp, root: ["run", "--experiment", exp],
}


@pytest.mark.parametrize("command", [*EXPERIMENT_COMMANDS, "compare", "export"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_malformed_experiment_file_is_one_line_and_writes_nothing(name, command, inputs, capsys):
    if name in EVALUATION_ONLY and command in ("generate", "greedy"):
        pytest.skip("this command does not evaluate")
    experiment = str(inputs / "malformed" / name)
    if command in EXPERIMENT_COMMANDS:
        line = _fails_in_one_line(EXPERIMENT_COMMANDS[command](experiment, inputs), inputs, capsys)
    else:  # a run directory whose experiment.yaml is the malformed file
        run = inputs / "run"
        run.mkdir()
        shutil.copy(experiment, run / "experiment.yaml")
        argv = ["compare", str(run), "--out", "report"] if command == "compare" else ["export", str(run), "--select", "knee", "--out", "out"]
        line = _fails_in_one_line(argv, inputs, capsys)
    assert len(line) < 600


@pytest.mark.parametrize("command", ["generate", "evaluate", "search"])
@pytest.mark.parametrize("name", PLANS)
def test_a_malformed_plan_file_is_one_line_and_writes_nothing(name, command, inputs, capsys):
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


def test_the_corpus_is_large_enough():
    assert len(EXPERIMENTS) >= 25 and len(PLANS) >= 20


@pytest.mark.parametrize("command", ["generate", "search", "run"])
def test_unreadable_paths_are_one_line(command, inputs, capsys):
    for path in (inputs / "malformed", inputs / "no-such-file.yaml"):  # a folder, a missing file
        line = _fails_in_one_line(EXPERIMENT_COMMANDS[command](str(path), inputs), inputs, capsys)
        assert str(path) in line
    big = inputs / "big.yaml"
    big.write_text("name: x\n" + "# padding\n" * 200_000)
    assert "bytes" in _fails_in_one_line(EXPERIMENT_COMMANDS[command](str(big), inputs), inputs, capsys)


@pytest.mark.parametrize("command", ["search", "run"])
@pytest.mark.parametrize("given, found", [("--ray-address", "no Ray cluster answers at --ray-address '127.0.0.1:"),
                                          ("RAY_ADDRESS", "no Ray cluster answers at RAY_ADDRESS '127.0.0.1:"),
                                          ("malformed", "--ray-address 'headnode' is not host:port")])
def test_a_ray_address_nothing_answers_at_is_one_line_at_once(command, given, found, inputs, capsys, monkeypatch):
    """ray.init would retry such an address for many minutes; ``run`` would find out only after greedy."""
    from tests.conftest import free_port

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{free_port()}"  # a port nothing listens on
    argv = EXPERIMENT_COMMANDS[command](str(inputs / "tiny-dit.yaml"), inputs)
    if given == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        argv += ["--ray-address", address if given == "--ray-address" else "headnode"]
    started = time.monotonic()
    line = _fails_in_one_line(argv, inputs, capsys)
    assert found in line and time.monotonic() - started < 30, line
