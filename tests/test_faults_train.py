"""Faults of `train`: bad scored files, a non-finite loss or gradient, a full disk while saving, and a SIGKILL
mid-epoch.

Each case goes through the commands as a user runs them (test_faults_*.py, one a stage; conftest.py says more).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from conftest import config, enospc, fails, fork_cli, kill_when, ok, wait_exit, write_unchecked

from modpo_pipe import schema


@pytest.fixture(scope="module")
def env(faults_env: Path) -> Path:
    """The fault suites' one shared directory (conftest.faults_env): modpo.toml, prompts, pairs and scored."""
    return faults_env


# ----------------------------------------------------------------------------------------------- scored files


def _bad_scored(kind: str, env: Path, tmp_path: Path) -> Path:
    table, meta = schema.read_table(env / "scored.parquet", "scored")
    path = tmp_path / "in.parquet"
    if kind == "pairs-file":
        return env / "pairs.parquet"
    if kind == "missing-reward-column":
        return write_unchecked(table.drop_columns(["reward_length"]), meta, path)
    if kind in ("nan-reward", "inf-ref-logp"):
        col = "reward_length" if kind == "nan-reward" else "ref_logps"
        values = table.column(col).to_pylist()
        if kind == "nan-reward":
            values[2][1] = float("nan")
        else:
            values[2][0] = float("-inf")
        table = table.set_column(table.schema.get_field_index(col), col, pa.array(values, pa.list_(pa.float32())))
        return write_unchecked(table, meta, path)
    if kind == "truncated":
        data = (env / "scored.parquet").read_bytes()
        path.write_bytes(data[:-100])
        return path
    raise AssertionError(kind)


SCORED_CASES = [
    ("pairs-file", "is a 'pairs' file, expected a 'scored' file"),
    ("missing-reward-column", "missing column 'reward_length'"),
    ("nan-reward", "row 2 (group 'r0/p2') response 2: reward_length is nan; rescore the groups"),
    ("inf-ref-logp", "row 2 (group 'r0/p2') response 1: ref_logps is -inf"),
    ("truncated", "not a readable Parquet file (truncated or corrupt?)"),
]


@pytest.mark.parametrize(("kind", "fragment"), SCORED_CASES, ids=[c[0] for c in SCORED_CASES])
def test_train_refuses_bad_scored_files(env, tmp_path, kind, fragment):
    path = _bad_scored(kind, env, tmp_path)
    out = tmp_path / "ckpt"
    fails(["train", path, *config(env), "--out", out], fragment)
    assert not (out / "final").exists() and not (out / "state").exists()


# -------------------------------------------------------------------------------------------- training faults


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def trained(env) -> Path:
    """An uninterrupted run: 2 epochs over the 12 pairs, batch 2, state saved every 2 steps."""
    out = env / "trained"
    ok(["train", env / "scored.parquet", *config(env), "--out", out])
    return out


def _steps(out: Path) -> list[int]:
    if not (out / "metrics.jsonl").exists():
        return []
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state_step(out: Path) -> int:
    """The step of the saved state (the .old copy when a kill fell between the two renames of a save)."""
    state = out / "state" if (out / "state").exists() else out / "state.old"
    return json.loads((state / "state.json").read_text())["step"]


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_pair_loss(monkeypatch, at_call: int, kind: str) -> None:
    import modpo_pipe.train as train_module

    real = train_module.pair_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        if calls["n"] != at_call:
            return loss
        return loss * float("nan") if kind == "loss" else _NanGradient.apply(loss)

    monkeypatch.setattr(train_module, "pair_loss", poisoned)


@pytest.mark.parametrize(("kind", "at_step", "fragment"), [
    ("loss", 5, "non-finite loss at step 5 (epoch 0); the update was not applied and the last good state "
                "(step 4) is kept in"),
    ("gradient", 1, "non-finite gradient at step 1 (epoch 0); the update was not applied and no state was "
                    "saved yet (save_every=2)"),
])
def test_non_finite_loss_or_gradient_stops_and_keeps_the_last_good_state(env, trained, tmp_path, monkeypatch,
                                                                          kind, at_step, fragment):
    out = tmp_path / "ckpt"
    _poison_pair_loss(monkeypatch, at_step, kind)  # one micro-batch per step: call k is step k
    fails(["train", env / "scored.parquet", *config(env), "--out", out], fragment)
    assert not (out / "final").exists() and not (out / "final.tmp").exists()
    assert _steps(out) == list(range(1, at_step))  # the bad step is not logged
    if at_step > 2:
        assert _state_step(out) == 4
    else:
        assert not (out / "state").exists()
    monkeypatch.undo()
    output = ok(["train", env / "scored.parquet", *config(env), "--out", out])
    assert f"resumed from step: {4 if at_step > 2 else 0}" in output
    assert _steps(out) == _steps(trained)
    assert max_weight_diff(out / "final", trained / "final") < 1e-6


def test_disk_full_while_saving_the_state_keeps_the_previous_one(env, trained, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "ckpt"
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second file of the second save (step 4): half a checkpoint on disk
            Path(filename).write_bytes(b"\0" * 64)
            enospc()
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    fails(["train", env / "scored.parquet", *config(env), "--out", out],
          f"cannot save the training state of step 4 to {out / 'state'}: No space left on device; the previous "
          "one is untouched. Free space and rerun the same command to resume")
    assert _state_step(out) == 2
    assert not (out / "state.tmp").exists() and not (out / "state.old").exists()
    assert not (out / "final").exists()
    monkeypatch.undo()
    for name in ("trainable", "optimizer"):  # the previous state still loads
        safetensors.torch.load_file(str(out / "state" / f"{name}.safetensors"))
    output = ok(["train", env / "scored.parquet", *config(env), "--out", out])
    assert "resumed from step: 2" in output
    assert max_weight_diff(out / "final", trained / "final") < 1e-6


def test_disk_full_while_saving_the_final_policy_leaves_no_half_checkpoint(env, trained, tmp_path, monkeypatch):
    import transformers.modeling_utils

    out = tmp_path / "ckpt"

    def fills_the_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 64)
        enospc()

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_the_disk)
    fails(["train", env / "scored.parquet", *config(env), "--out", out],
          f"cannot save the trained policy to {out / 'final'}: No space left on device; there was none before")
    assert not (out / "final").exists() and not (out / "final.tmp").exists()
    steps = _state_step(out)
    assert steps == _steps(trained)[-1]  # every step's work is in the state
    monkeypatch.undo()
    output = ok(["train", env / "scored.parquet", *config(env), "--out", out])
    assert f"resumed from step: {steps}" in output
    assert max_weight_diff(out / "final", trained / "final") < 1e-6


# ------------------------------------------------------------------------------------------ SIGKILL mid-epoch


def test_train_resumes_after_sigkill_mid_epoch_with_the_same_result(env, tmp_path):
    """Kill -9 a training run mid-epoch, rerun it: the same steps, logged once, and the same final weights
    (within 1e-6) as an uninterrupted run with the same seed."""
    common = ["train", env / "scored.parquet", *config(env), "--save-every", 1, "--epochs", 2]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert wait_exit(fork_cli([*common, "--out", full], tmp_path)) == 0
    steps_per_epoch = len(_steps(full)) // 2

    def state_at_3() -> bool:
        try:
            return _state_step(killed) >= 3
        except (OSError, ValueError):
            return False

    pid = fork_cli([*common, "--out", killed], tmp_path, slow=0.15)
    assert kill_when(pid, state_at_3, delay=0.05)
    at_kill = _state_step(killed)
    assert 0 < at_kill < steps_per_epoch  # mid-epoch
    assert not (killed / "final").exists()
    assert wait_exit(fork_cli([*common, "--out", killed], tmp_path)) == 0
    assert _steps(killed) == _steps(full) == list(range(1, 2 * steps_per_epoch + 1))
    assert max_weight_diff(killed / "final", full / "final") < 1e-6


@pytest.mark.parametrize("damaged", ["state.json", "trainable.safetensors", "optimizer.safetensors"])
def test_an_unreadable_training_state_is_one_line_naming_it(env, trained, tmp_path, damaged):
    """A state damaged on disk (it is written atomically: a bad disk or a hand edit) used to end in a
    JSONDecodeError or SafetensorError traceback, and under `run` on every cron firing."""
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "final")  # a run stopped after its last state: a finished one has nothing to read
    path = out / "state" / damaged
    path.write_bytes(path.read_bytes()[:50])
    fails(["train", env / "scored.parquet", *config(env), "--out", out],
          f"{out / 'state'}: unreadable training state (")
