"""benchmarks/device_kit.py and device_run.sh: the device calls fit, `leave` / `restore` give git's index back
as it was, and a call that cannot go on says why before it unpacks anything."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def kit():
    spec = importlib.util.spec_from_file_location("device_kit", BENCHMARKS / "device_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bundle", [1, 10 * 2**20, 59 * 2**20, 60 * 2**20, 80_422_000, 200 * 2**20])
def test_every_call_fits_beside_the_tree_in_as_few_calls_as_fit(kit, bundle):
    tree = 3_355_443
    parts = kit.plan_parts(tree, bundle)
    assert sum(parts) == bundle
    assert all(tree + part <= kit.CALL_LIMIT - kit.MARGIN for part in parts)
    assert len(parts) == math.ceil(bundle / (kit.CALL_LIMIT - kit.MARGIN - tree))


def test_a_tree_that_fills_a_call_is_refused(kit):
    with pytest.raises(SystemExit, match="no room for the bundle"):
        kit.plan_parts(kit.CALL_LIMIT - kit.MARGIN, 1)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout


def test_leave_takes_the_weights_off_the_tree_and_restore_gives_the_index_back(kit, tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "weights.safetensors").write_bytes(b"\0" * kit.LEAVE_MIN)
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "init")
    exclude = (tmp_path / ".git" / "info" / "exclude").read_text()

    kit.leave(tmp_path)
    travels = _git(tmp_path, "ls-files", "--cached", "--others", "--exclude-standard").split()
    assert travels == ["code.py"]
    assert (tmp_path / "models" / "weights.safetensors").stat().st_size == kit.LEAVE_MIN  # still on disk
    with pytest.raises(SystemExit, match="ran already"):
        kit.leave(tmp_path)

    kit.restore(tmp_path)
    assert _git(tmp_path, "status", "--porcelain") == ""
    assert (tmp_path / ".git" / "info" / "exclude").read_text() == exclude
    with pytest.raises(SystemExit, match="nothing to restore"):
        kit.restore(tmp_path)


def _call(tmp_path: Path, k: int, n: int, python_version: str = "") -> subprocess.CompletedProcess:
    part = tmp_path / ".gpu" / f"call-{k}"
    part.mkdir(parents=True)
    (part / f"bundle.part{k}").write_bytes(b"part")
    (part / "python-version").write_text(python_version + "\n")
    (tmp_path / "out").mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DITPLAN_STASH": str(tmp_path / "stash")}
    return subprocess.run(["bash", str(BENCHMARKS / "device_run.sh"), str(k), str(n)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_the_last_call_stops_where_a_part_did_not_stay_on_the_machine(tmp_path):
    done = _call(tmp_path, 2, 2)
    assert done.returncode == 3
    assert "part 1 of 2 is not on this machine" in done.stdout
    assert not (tmp_path / "stash" / "kit").exists()


def test_the_last_call_stops_where_the_bundle_is_for_another_python(tmp_path):
    assert _call(tmp_path, 1, 2).returncode == 0
    done = _call(tmp_path, 2, 2, python_version="2.7")
    assert done.returncode == 2
    assert "built for Python 2.7" in done.stdout
    assert not (tmp_path / "stash" / "kit").exists()
