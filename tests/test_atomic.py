"""The one atomic-write helper: whole files and folders or nothing, unique temporary names."""

import pytest

from ditplan.atomic import atomic_folder, atomic_write, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = atomic_write_text(tmp_path / "plan.yaml", "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_two_writers_get_their_own_temporary_names(tmp_path):
    seen = []

    def outer(tmp):
        seen.append(tmp)
        atomic_write(tmp_path / "plan.yaml", lambda inner: (seen.append(inner), inner.write_text("inner")))
        tmp.write_text("outer")

    atomic_write(tmp_path / "plan.yaml", outer)
    assert seen[0] != seen[1] and (tmp_path / "plan.yaml").read_text() == "outer"


def test_a_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "network"
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert [p.name for p in dest.iterdir()] == ["a"]
    with atomic_folder(dest) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in dest.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["network"]
