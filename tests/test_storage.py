"""storage.py on its own: atomic writes, copies, links and directory swaps; fingerprints; stale temporaries."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from modpo_pipe import storage


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name or p.name.endswith(".old"))


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    storage.write_atomic(path, "old\n")
    storage.write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fails", ["os.fsync", "os.replace"])
def test_write_atomic_failure_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, fails):
    path = tmp_path / "state.json"
    storage.write_atomic(path, "old\n")
    monkeypatch.setattr(storage.os, fails.split(".")[1], _disk_full)
    with pytest.raises(OSError, match="No space left"):
        storage.write_atomic(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


def test_copy_atomic_replaces_in_one_rename(tmp_path, monkeypatch):
    src, dst = tmp_path / "train-metrics.jsonl", tmp_path / "metrics.jsonl"
    src.write_text("a\n" * 1000)
    dst.write_text("old\n")
    monkeypatch.setattr(storage.os, "replace", _disk_full)  # the copy is written aside, never into dst
    with pytest.raises(OSError):
        storage.copy_atomic(src, dst)
    monkeypatch.undo()
    assert dst.read_text() == "old\n" and _leftovers(tmp_path) == []
    storage.copy_atomic(src, dst)
    assert dst.read_text() == src.read_text() and _leftovers(tmp_path) == []


def test_symlink_atomic_repoints_a_link_and_replaces_a_directory(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "policy"
    link.mkdir()  # a real directory where the link goes (left by an older layout)
    (link / "x").write_text("x")
    storage.symlink_atomic("a", link)
    assert link.is_symlink() and os.readlink(link) == "a"
    monkeypatch.setattr(storage.os, "replace", _disk_full)
    with pytest.raises(OSError):
        storage.symlink_atomic("b", link)
    monkeypatch.undo()
    assert os.readlink(link) == "a" and _leftovers(tmp_path) == []
    storage.symlink_atomic("b", link)
    assert os.readlink(link) == "b" and _leftovers(tmp_path) == []


def test_replace_dir_swaps_a_directory_whole(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / "final.tmp"
    final.mkdir()
    (final / "w").write_text("old")
    tmp.mkdir()
    (tmp / "w").write_text("new")
    storage.replace_dir(tmp, final)
    assert (final / "w").read_text() == "new" and _leftovers(tmp_path) == []


def test_fsync_replace_renames_the_temporary_over_the_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"old")
    tmp = storage.atomic_path(path)
    assert tmp.parent == tmp_path and tmp.name == f".pairs.parquet.tmp-{os.getpid()}"
    tmp.write_bytes(b"new")
    storage.fsync_replace(tmp, path)
    assert path.read_bytes() == b"new" and not tmp.exists()


def test_tree_fingerprint_changes_when_a_file_changes(tmp_path):
    root = tmp_path / "policy"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "sub" / "model.safetensors").write_bytes(b"\0" * 100)
    infos = storage.tree_info(root)
    assert set(infos) == {"config.json", "sub/model.safetensors"}
    assert storage.tree_problem(root, infos) is None
    (root / "sub" / "model.safetensors").write_bytes(b"\1" + b"\0" * 99)  # same size, other content
    assert storage.tree_fingerprint(storage.tree_info(root)) != storage.tree_fingerprint(infos)
    assert storage.tree_problem(root, infos) == ("sub/model.safetensors changed or corrupted (content fingerprint "
                                                 "differs)")
    (root / "extra.txt").write_text("")
    assert "holds other files" in storage.tree_problem(root, infos)


def test_file_problem_names_a_truncated_or_missing_file(tmp_path):
    path = tmp_path / "scored.parquet"
    path.write_bytes(b"x" * 10)
    info = storage.file_info(path)
    assert storage.file_problem(path, info) is None
    path.write_bytes(b"x" * 4)
    assert storage.file_problem(path, info) == "has 4 bytes, the manifest recorded 10 (truncated or replaced)"
    path.unlink()
    assert storage.file_problem(path, info) == "is missing"


def test_sampled_fingerprint_sees_a_change_in_a_large_file(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "SAMPLED_HASH_LIMIT", 1 << 20)  # take the sampled path on a small file
    path = tmp_path / "model.safetensors"
    data = bytearray(9 << 20)
    path.write_bytes(data)
    before = storage.dir_fingerprint(tmp_path, (".safetensors",))
    data[0] = 1  # in the head block
    path.write_bytes(data)
    assert storage.dir_fingerprint(tmp_path, (".safetensors",)) != before
    assert storage.json_fingerprint({"a": 1, "b": 2}) == storage.json_fingerprint({"b": 2, "a": 1})


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".pairs.parquet.tmp-{dead_pid}"
    mine = tmp_path / f".pairs.parquet.tmp-{os.getpid()}"
    running = tmp_path / f".pairs.parquet.tmp-{os.getppid()}"
    other = tmp_path / f".scored.parquet.tmp-{dead_pid}"
    for path in (stale, mine, running, other):
        path.write_bytes(b"half")
    storage.remove_stale_temps(tmp_path, "pairs.parquet")
    assert not stale.exists() and mine.exists() and running.exists() and other.exists()

    (tmp_path / ".policy.tmp").symlink_to(tmp_path)  # a link to a directory: the link goes, not the directory
    (tmp_path / ".model.tmp-1-ab").mkdir()
    (tmp_path / ".model.tmp-1-ab" / "w").write_text("")
    storage.remove_temps(tmp_path, "policy")
    storage.remove_temps(tmp_path, "model")
    assert tmp_path.is_dir() and not (tmp_path / ".policy.tmp").is_symlink()
    assert not (tmp_path / ".model.tmp-1-ab").exists()
