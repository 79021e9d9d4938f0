"""Outputs: a full disk, a read-only path, or a path that is the input or in the way is one line naming it, asks
for permissions or another path (not a rerun), and leaves the previous file or state as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cli, config, fails, ok, one_round_run


@pytest.fixture(scope="module")
def env(failures_env: Path) -> Path:
    """conftest.failures_env: modpo.toml, reward callables (rewards.py), prompts, pairs and scored (one epoch)."""
    return failures_env


# ------------------------------------------------------------------------------------------------ full disk


@pytest.mark.slow
def test_safetensors_disk_full_while_saving_the_state_keeps_the_previous_one(env, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError, not OSError: the same one-line message, the previous
    state untouched, and a rerun resumes from it to the weights of an uninterrupted run."""
    import safetensors.torch
    from safetensors import SafetensorError

    full, out = tmp_path / "full", tmp_path / "ckpt"
    args = ["train", env / "scored.parquet", *config(env)]
    ok([*args, "--out", full])
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the first file of the second save (step 4)
            # what safetensors 0.8 raises on a full tmpfs (seen with a 64 KiB mount)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    fails([*args, "--out", out],
          f"cannot save the training state of step 4 to {out / 'state'}: No space left on device (os error 28); "
          "the previous one is untouched. Free space and rerun the same command to resume")
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 2
    assert not (out / "state.tmp").exists() and not (out / "final").exists()
    monkeypatch.undo()
    output = ok([*args, "--out", out])
    assert "resumed from step: 2" in output
    from safetensors.torch import load_file

    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(full / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_safetensors_disk_full_while_saving_the_final_policy(env, tmp_path, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def fills_the_disk(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "ckpt"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_the_disk)
    fails(["train", env / "scored.parquet", *config(env), "--out", out],
          f"cannot save the trained policy to {out / 'final'}: No space left on device (os error 28); there was "
          "none before")
    assert not (out / "final").exists() and not (out / "final.tmp").exists()


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES"])
def test_a_full_disk_or_read_only_path_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    """merge, train (its metrics and out directory) and init wrote through OSErrors the CLI did not catch: a full
    disk or a read-only mount ended in a traceback (cli.user_errors now turns them into one line for every
    command; init and train here). Any other OSError is still a bug's traceback."""
    import errno

    path = tmp_path / "modpo.toml"
    path.write_text("# mine\n")

    def refuse(self, *args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    line = fails(["init", path, "--force"], os.strerror(getattr(errno, code)))
    assert "(finished outputs are intact)" in line and ".modpo.toml.tmp" in line
    monkeypatch.undo()
    assert path.read_text() == "# mine\n"


def test_an_unexpected_os_error_keeps_its_traceback(tmp_path, monkeypatch):
    import errno

    def broken(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "write_text", broken)
    result = cli(["init", tmp_path / "modpo.toml"])
    assert result.exit_code == 1 and isinstance(result.exception, OSError)


# ------------------------------------------------------------------------------------------ read-only paths


def _make_read_only(path: Path) -> None:
    """Read-only for this process: chmod for a user; root ignores modes, so the immutable flag for root."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("running as root where the immutable flag is not supported: no way to make a directory "
                    "read-only here")


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


@pytest.fixture
def read_only(tmp_path):
    """A directory this process cannot write in (the immutable flag: root ignores modes), made writable again after
    the test."""
    path = tmp_path / "read-only"
    path.mkdir()
    _make_read_only(path)
    yield path
    _make_writable(path)


def test_read_only_run_directory_fails_with_one_line_and_status_stays_true(env, tiny, tmp_path):
    run_dir = one_round_run(tmp_path / "run", tiny, "length", tiny.reward_fn)
    ok(["run", "--workdir", run_dir, "--max-stages", 1])
    before = (run_dir / "state.json").read_bytes()
    _make_read_only(run_dir)
    try:
        line = fails(["run", "--workdir", run_dir], "the run directory must be writable")
        assert str(run_dir) in line
        assert (run_dir / "state.json").read_bytes() == before  # nothing recorded that did not happen
        report = json.loads(ok(["status", "--workdir", run_dir, "--json"]))  # status reads a read-only run
        assert [row["status"] for row in report["table"]] == ["done", "pending", "pending"]
    finally:
        _make_writable(run_dir)
    ok(["run", "--workdir", run_dir, "--max-stages", 1])
    assert json.loads((run_dir / "state.json").read_text())["rounds"]["0"]["score"]["status"] == "done"


def test_a_read_only_output_directory_fails_train_in_one_line(env, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "ckpt"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    fails(["train", env / "scored.parquet", *config(env), "--out", out],
          f"cannot write or read {out}: Read-only file system; fix the permissions or choose another path")


@pytest.mark.parametrize("stage", ["generate", "score"])
def test_an_output_that_cannot_be_written_asks_for_permissions_not_a_rerun(faults_env, read_only, stage):
    """generate and score said "the finished parts are kept: rerun the same command to continue" when nothing
    could be written."""
    source = faults_env / ("prompts.jsonl" if stage == "generate" else "pairs.parquet")
    out = read_only / "out.parquet"
    line = fails([stage, source, *config(faults_env), "--out", out], "fix the permissions or choose another path")
    assert "rerun" not in line and str(read_only) in line


def test_run_in_a_round_directory_that_cannot_be_written_asks_for_a_writable_one(tiny, tmp_path):
    run_dir = one_round_run(tmp_path / "run", tiny, "r", tiny.reward_fn)
    ok(["run", "--workdir", run_dir, "--max-stages", 1])  # generate
    round_dir = run_dir / "round-000"
    _make_read_only(round_dir)
    try:
        line = fails(["run", "--workdir", run_dir], "the run directory must be writable")
        assert "rerun" not in line and str(round_dir) in line
    finally:
        _make_writable(round_dir)


# --------------------------------------------------------------------------------------- paths in the way


def test_an_output_that_is_the_input_is_refused_before_any_work(env, tmp_path):
    """`generate prompts.jsonl --out prompts.jsonl` replaced the user's prompts with a Parquet file, exit 0."""
    for name in ("prompts.jsonl", "pairs.parquet"):
        shutil.copy(env / name, tmp_path / name)
    before = (tmp_path / "prompts.jsonl").read_bytes()
    fails(["generate", tmp_path / "prompts.jsonl", *config(env), "--out", tmp_path / "prompts.jsonl"],
          "is the input file")
    assert (tmp_path / "prompts.jsonl").read_bytes() == before
    fails(["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "pairs.parquet"],
          "is the input file")
    fails(["eval", tmp_path / "prompts.jsonl", *config(env), "--out", tmp_path / "prompts.jsonl"],
          "is the input file")
    assert (tmp_path / "prompts.jsonl").read_bytes() == before
    fails(["eval", tmp_path / "prompts.jsonl", *config(env), "--out", tmp_path], "not a path a summary file can")


def test_an_output_directory_that_is_a_file_is_one_line(env, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    fails(["train", env / "scored.parquet", *config(env), "--out", tmp_path / "a-file"],
          "is a file; give a directory for the outputs")
    fails(["train", env / "scored.parquet", *config(env), "--out", tmp_path / "a-file" / "ckpt"],
          f"{tmp_path / 'a-file'} is a file, not a directory")
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize(("command", "out_is", "fragment"), [
    ("generate", "directory", "is a directory; give the output file's path"),
    ("score", "directory", "is a directory; give the output file's path"),
    ("train", "file", "is a file; give a directory for the outputs"),
    ("score", "under a file", "is a file, not a directory"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(env, tmp_path, command, out_is, fragment):
    """generate and score sampled and scored everything, then failed to write, saying to rerun the same command
    (which failed again the same way); train trained to the end, then failed on the file in its way."""
    out = tmp_path / "out"
    if out_is == "directory":
        out.mkdir()
    else:
        out.write_text("in the way\n")
        out = out / "scored.parquet" if out_is == "under a file" else out
    inputs = {"generate": "prompts.jsonl", "score": "pairs.parquet", "train": "scored.parquet"}[command]
    fails([command, env / inputs, *config(env), "--out", out], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no work started (no parts beside it)


def test_run_given_a_file_as_its_workdir_says_so(tmp_path):
    """`run --workdir FILE` advised `init FILE/modpo.toml`, which cannot be written."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for command in ("run", "status"):
        line = fails([command, "--workdir", file], f"--workdir {file} is a file, not a run directory")
        assert "init" not in line
