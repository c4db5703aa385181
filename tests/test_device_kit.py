"""benchmarks/device_kit.py and device_run.sh: the device calls fit, `leave` / `restore` give git's index back
as it was, and a call that cannot go on says why before it unpacks anything."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
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
    assert sum(parts) == bundle and all(part > 0 for part in parts)
    assert all(tree + part <= kit.CALL_LIMIT - kit.MARGIN for part in parts)
    assert (len(parts) - 1) * (kit.CALL_LIMIT - kit.MARGIN - tree) < bundle  # one call fewer could not hold it


def test_a_tree_that_fills_a_call_is_refused(kit):
    with pytest.raises(SystemExit, match="no room for the bundle"):
        kit.plan_parts(kit.CALL_LIMIT - kit.MARGIN, 1)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture()
def repo(kit, tmp_path):
    """A repository with code, a weight file and a small safetensors file; .git/info/exclude without a final newline."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text(".gpu/\n")  # as the project's
    (tmp_path / "ditplan" / "models").mkdir(parents=True)
    (tmp_path / "ditplan" / "models" / "w.safetensors").write_bytes(b"\0" * kit.LEAVE_MIN)
    (tmp_path / "ditplan" / "models" / "small.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "data.bin").write_bytes(b"\0" * kit.LEAVE_MIN)  # large, but no weight file: it stays
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "init")
    (tmp_path / ".git" / "info" / "exclude").write_text("*.log")
    return tmp_path


def test_leave_takes_the_weights_off_the_tree_and_restore_gives_everything_back(kit, repo):
    kit.leave(repo)
    travels = _git(repo, "ls-files", "--cached", "--others", "--exclude-standard").split()
    assert travels == [".gitignore", "code.py", "data.bin", "ditplan/models/small.safetensors"]
    assert (repo / "ditplan" / "models" / "w.safetensors").stat().st_size == kit.LEAVE_MIN  # still on disk
    assert "*.log\n" in (repo / ".git" / "info" / "exclude").read_text()  # the user's last line left whole
    with pytest.raises(SystemExit, match="ran already"):
        kit.leave(repo)
    with pytest.raises(SystemExit, match="`leave` is in effect"):
        kit.build("3.12", root=repo)

    kit.restore(repo)
    assert _git(repo, "status", "--porcelain") == ""
    assert (repo / ".git" / "info" / "exclude").read_text() == "*.log"
    with pytest.raises(SystemExit, match="nothing to restore"):
        kit.restore(repo)


def test_restore_refuses_after_a_commit_that_may_hold_the_weights_deletion(kit, repo):
    kit.leave(repo)
    _git(repo, "commit", "-q", "-m", "oops")
    with pytest.raises(SystemExit, match="HEAD moved since `leave`"):
        kit.restore(repo)


def test_leave_refuses_staged_changes_to_the_weights(kit, repo):
    (repo / "ditplan" / "models" / "w.safetensors").write_bytes(b"\1" * kit.LEAVE_MIN)
    _git(repo, "add", "ditplan/models/w.safetensors")
    with pytest.raises(SystemExit, match="staged changes"):
        kit.leave(repo)
    assert not (repo / kit.LEFT).exists()


def _call(tmp_path: Path, k: int, n: int, part: bytes = b"part", python_version: str | None = None,
          **env: str) -> subprocess.CompletedProcess:
    folder = tmp_path / ".gpu" / f"call-{k}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"bundle.part{k}").write_bytes(part)
    (folder / "python-version").write_text((python_version or "%d.%d" % sys.version_info[:2]) + "\n")
    (tmp_path / "out").mkdir(exist_ok=True)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DITPLAN_STASH": str(tmp_path / "stash"),
           "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(BENCHMARKS / "device_run.sh"), str(k), str(n)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_the_last_call_stops_where_a_part_did_not_stay_on_the_machine(tmp_path):
    done = _call(tmp_path, 2, 2)
    assert done.returncode == 3
    assert "part 1 of 2 is not on this machine" in done.stdout
    assert not (tmp_path / "stash" / "kit").exists()


def test_a_call_stops_where_the_bundle_is_for_another_python(tmp_path):
    done = _call(tmp_path, 1, 2, python_version="2.7")
    assert done.returncode == 2
    assert "built for Python '2.7'" in done.stdout
    assert not (tmp_path / "stash").exists()


@pytest.mark.parametrize("k, n", [("0", "2"), ("3", "2"), ("x", "1")])
def test_a_call_number_out_of_range_is_refused(tmp_path, k, n):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(BENCHMARKS / "device_run.sh"), k, n], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stdout


def test_the_last_call_puts_the_bundled_weights_into_the_tree(tmp_path):
    weights = b"weights" * 1000
    with tarfile.open(tmp_path / "bundle.tar.xz", "w:xz") as tar:
        info = tarfile.TarInfo("tree/weights/m/w.safetensors")
        info.size = len(weights)
        tar.addfile(info, io.BytesIO(weights))
    bundle = (tmp_path / "bundle.tar.xz").read_bytes()
    assert _call(tmp_path, 1, 2, part=bundle[:100]).returncode == 0
    done = _call(tmp_path, 2, 2, part=bundle[100:], EXPERIMENT="missing.yaml")
    assert (tmp_path / "weights" / "m" / "w.safetensors").read_bytes() == weights
    assert done.returncode == 1 and "missing.yaml" in done.stderr  # then the experiment is looked for
