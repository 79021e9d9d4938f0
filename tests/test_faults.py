"""Bad input, faults and resumption, end to end through the commands: every case costs a clear one-line
message and at most the unfinished chunk, never a half file, a silently wrong result or lost work.

Single-module validation lives beside the modules (test_prompts.py, test_schema.py, test_rewards.py,
test_config.py); here each case goes through `generate`, `score` or `train` as a user runs them. Kills are
real SIGKILLs of forked child processes, at seeded points.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli, config, fails, ok, scored_env

from modpo_pipe import parts, schema
from modpo_pipe.cli import app

MAX_NEW_TOKENS = 6
CONTEXT = 512  # the tiny models' max_position_embeddings

REWARD_FNS = '''
import math

def length(prompts, responses):
    return [len(r) / 10.0 for r in responses]

def raises(prompts, responses):
    raise ValueError("model server unreachable")

def wrong_count(prompts, responses):
    return [0.0] * (len(responses) - 1)

def _france(value):
    def fn(prompts, responses):
        return [value if "France" in p else len(r) / 10.0 for p, r in zip(prompts, responses)]
    return fn

nan = _france(math.nan)
inf = _france(math.inf)
none = _france(None)

def all_nan(prompts, responses):
    return [math.nan for r in responses]
'''


# ----------------------------------------------------------------------------------------------- helpers



def rows_of(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def same_rows(a: Path, b: Path) -> None:
    ra, rb = rows_of(a), rows_of(b)
    assert [r["group_id"] for r in ra] == [r["group_id"] for r in rb]
    assert ra == rb


def no_leftovers(out: Path) -> None:
    """Nothing but finished files: no work directory, no temporary file beside the output."""
    assert not parts.work_dir(out).exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory):
    """A directory with a modpo.toml, 6 prompts, and a good pairs.parquet and scored.parquet (6 groups of 4
    responses; one group a step, as one pair a step before groups: 6 steps an epoch)."""
    work = tmp_path_factory.mktemp("faults")
    return scored_env(work, tiny, REWARD_FNS, MAX_NEW_TOKENS, epochs=2)


# ------------------------------------------------------------------------------------------------ prompts

LONG = "Tell me a story about a brave little robot who learns to paint. " * 30


def _jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD = [{"id": "a", "prompt": "Why is the sky blue?"}, {"id": "b", "prompt": "Count from one to five."}]

# (case, file bytes, extra flags, expected: an error fragment, or the counts the summary and metadata show)
PROMPT_CASES = [
    ("invalid-json", _jsonl(GOOD[0], b'{"id": "x", "prompt": "unterminated', GOOD[1]), [],
     "prompts.jsonl:2: invalid JSON"),
    ("invalid-json-skipped", _jsonl(GOOD[0], b'{"id": "x", "prompt": "unterminated', GOOD[1]), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 1}),
    ("missing-prompt", _jsonl(GOOD[0], {"id": "x"}), [], "prompts.jsonl:2: missing field 'prompt'"),
    ("empty-prompt", _jsonl({"id": "x", "prompt": "  "}, GOOD[1]), [], "prompts.jsonl:1: field 'prompt' is empty"),
    ("non-string-prompt", _jsonl(GOOD[0], {"id": "x", "prompt": 42}), [],
     "prompts.jsonl:2: field 'prompt' must be a string, got int"),
    ("bad-rows-skipped", _jsonl({"id": "x"}, {"prompt": ""}, {"prompt": 1}, *GOOD), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 3}),
    ("duplicate-id", _jsonl(GOOD[0], {"id": "a", "prompt": "again"}), [],
     "prompts.jsonl:2: duplicate id 'a' (first at "),
    ("duplicate-id-skipped", _jsonl(GOOD[0], {"id": "a", "prompt": "again"}, GOOD[1]), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 1}),
    ("empty-file", b"", [], "prompts.jsonl: no prompts"),
    ("blank-lines-only", b"\n \n", [], "prompts.jsonl: no prompts"),
    ("all-invalid-skipped", _jsonl(b"nope", b"{"), ["--skip-invalid"], "no prompts (2 invalid rows skipped)"),
    ("non-utf8", _jsonl(GOOD[0], b'{"prompt": "caf\xe9"}'), [], "prompts.jsonl:2: not valid UTF-8"),
    ("non-utf8-skipped", _jsonl(GOOD[0], b'{"prompt": "caf\xe9"}', GOOD[1]), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 1}),
    ("utf16-file", json.dumps(GOOD[0]).encode("utf-16"), [], "prompts.jsonl:1: not valid UTF-8"),
    ("utf8-bom", b"\xef\xbb\xbf" + _jsonl(*GOOD), [], {"prompts": 2, "skipped_invalid": 0}),
    ("long-prompt-dropped", _jsonl(GOOD[0], {"id": "long", "prompt": LONG}, GOOD[1]), [],
     {"prompts": 2, "long_prompts_dropped": 1}),
    ("long-prompt-truncated", _jsonl(GOOD[0], {"id": "long", "prompt": LONG}, GOOD[1]), ["--long-prompts", "truncate"],
     {"prompts": 3, "long_prompts_truncated": 1}),
    ("every-prompt-too-long", _jsonl({"prompt": LONG}), [], "every prompt is longer than 506 tokens"),
    ("no-room-in-context", _jsonl(*GOOD), ["--max-new-tokens", CONTEXT],
     "[generate].max_new_tokens=512 leaves no room for a prompt in the policy's context of 512 tokens"),
]


@pytest.mark.parametrize(("case", "content", "flags", "expected"), PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_prompt_file_cases(env, tmp_path, tiny_tokenizer, case, content, flags, expected):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.parquet"
    prompts.write_bytes(content)
    args = ["generate", prompts, *config(env), "--out", out, "--samples-per-prompt", 2, *flags]
    if isinstance(expected, str):
        line = fails(args, expected)
        if case != "no-room-in-context":
            assert str(prompts) in line  # the error names the file
        assert not out.exists() and not parts.work_dir(out).exists()
        return
    output = ok(args)
    table, meta = schema.read_table(out, "pairs")
    for key, value in expected.items():
        assert meta["counts"][key] == value, (key, meta["counts"])
    assert table.num_rows == expected["prompts"]
    labels = {"skipped_invalid": "skipped invalid prompts", "long_prompts_dropped": "long prompts dropped",
              "long_prompts_truncated": "long prompts truncated"}
    for key, label in labels.items():
        assert f"{label}: {meta['counts'][key]}" in output
    if case.startswith("long-prompt"):
        # Longer than the context leaves for a response: max_prompt_tokens (1024) alone would keep it.
        rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": LONG}], tokenize=False,
                                                      add_generation_prompt=True)
        assert CONTEXT - MAX_NEW_TOKENS < len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]) < 1024
        assert meta["sampling"]["prompt_token_limit"] == CONTEXT - MAX_NEW_TOKENS
        lengths = {r["prompt_id"]: len(r["prompt_ids"]) for r in table.to_pylist()}
        if case == "long-prompt-truncated":
            assert lengths["long"] == CONTEXT - MAX_NEW_TOKENS
        else:
            assert "long" not in lengths


# --------------------------------------------------------------------------------------- parquet inputs


def _raw(table: pa.Table, meta: dict, path: Path) -> Path:
    """Write without the contract's checks: what a foreign, older or buggy writer could leave."""
    pq.write_table(schema.with_metadata(table, meta), path)
    return path


def _bad_pairs(kind: str, env: Path, tmp_path: Path) -> Path:
    table, meta = schema.read_table(env / "pairs.parquet", "pairs")
    path = tmp_path / "in.parquet"
    if kind == "schema-version":
        return _raw(table, {**meta, "schema_version": 99}, path)
    if kind == "missing-column":
        return _raw(table.drop_columns(["response_ids"]), meta, path)
    if kind == "mistyped-column":
        return _raw(table.set_column(table.schema.get_field_index("round"), "round",
                                     table.column("round").cast(pa.int64())), meta, path)
    if kind == "other-stage":
        return env / "scored.parquet"
    if kind == "not-modpo":
        pq.write_table(table.replace_schema_metadata(None), path)
        return path
    if kind == "truncated":
        data = (env / "pairs.parquet").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    if kind == "zero-rows":
        return _raw(table.slice(0, 0), meta, path)
    if kind == "ids-outside-vocab":
        rows = table.to_pylist()
        rows[3]["response_ids"][0] = [5, 100_000]
        return _raw(pa.Table.from_pylist(rows, schema=table.schema), meta, path)
    if kind == "duplicate-group-id":
        rows = table.to_pylist()
        rows[1]["group_id"] = rows[0]["group_id"]
        return _raw(pa.Table.from_pylist(rows, schema=table.schema), meta, path)
    raise AssertionError(kind)


PAIRS_CASES = [
    ("schema-version", "schema version 99 is not supported (this modpo-pipe reads 1, 2)"),
    ("missing-column", "missing column 'response_ids'"),
    ("mistyped-column", "column 'round' has type int64, expected int32"),
    ("other-stage", "is a 'scored' file, expected a 'pairs' file"),
    ("not-modpo", "not a modpo-pipe file"),
    ("truncated", "not a readable Parquet file (truncated or corrupt?)"),
    ("zero-rows", "has no rows"),
    ("ids-outside-vocab", "row 3: response_ids holds id 100000 >= vocab size"),
    ("duplicate-group-id", "row 1: duplicate group_id"),
]


@pytest.mark.parametrize(("kind", "fragment"), PAIRS_CASES, ids=[c[0] for c in PAIRS_CASES])
def test_score_refuses_bad_pairs_files(env, tmp_path, kind, fragment):
    path = _bad_pairs(kind, env, tmp_path)
    out = tmp_path / "scored.parquet"
    line = fails(["score", path, *config(env), "--out", out], fragment)
    assert str(path) in line
    assert not out.exists() and not parts.work_dir(out).exists()


def _bad_scored(kind: str, env: Path, tmp_path: Path) -> Path:
    table, meta = schema.read_table(env / "scored.parquet", "scored")
    path = tmp_path / "in.parquet"
    if kind == "pairs-file":
        return env / "pairs.parquet"
    if kind == "missing-reward-column":
        return _raw(table.drop_columns(["reward_length"]), meta, path)
    if kind in ("nan-reward", "inf-ref-logp"):
        col = "reward_length" if kind == "nan-reward" else "ref_logps"
        values = table.column(col).to_pylist()
        if kind == "nan-reward":
            values[2][1] = float("nan")
        else:
            values[2][0] = float("-inf")
        table = table.set_column(table.schema.get_field_index(col), col, pa.array(values, pa.list_(pa.float32())))
        return _raw(table, meta, path)
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


# ------------------------------------------------------------------------------------------------ rewards

# (case, reward spec, on_invalid_reward, expected: an error fragment, or the pairs dropped)
REWARD_CASES = [
    ("raises", "raises", "error", "raised ValueError: model server unreachable"),
    ("raises-even-with-drop", "raises", "drop", "raised ValueError: model server unreachable"),
    ("wrong-count", "wrong_count", "error", "returned 23 scores for 24 responses"),
    ("wrong-count-even-with-drop", "wrong_count", "drop", "returned 23 scores for 24 responses"),
    ("nan", "nan", "error", "group 'r0/p0' response 1: score is nan; [score].on_invalid_reward = \"drop\""),
    ("inf", "inf", "error", "group 'r0/p0' response 1: score is inf"),
    ("none", "none", "error", "group 'r0/p0' response 1: score None is not a number"),
    ("nan-dropped", "nan", "drop", 1),
    ("inf-dropped", "inf", "drop", 1),
    ("none-dropped", "none", "drop", 1),
    ("all-nan-dropped", "all_nan", "drop", "every group has a NaN, inf or None reward (bad: 6); nothing to write"),
]


@pytest.mark.parametrize(("case", "fn", "mode", "expected"), REWARD_CASES, ids=[c[0] for c in REWARD_CASES])
def test_reward_callable_cases(env, tmp_path, case, fn, mode, expected):
    out = tmp_path / "scored.parquet"
    args = ["score", env / "pairs.parquet", *config(env), "--out", out, "--on-invalid-reward", mode,
            "--reward", f"bad=py:{env / 'rewards.py'}:{fn}", "--reward", f"length=py:{env / 'rewards.py'}:length",
            "--reward-batch-size", 64]
    if isinstance(expected, str):
        line = fails(args, expected)
        assert "reward 'bad'" in line or "every group" in line
        assert not out.exists()
        return
    output = ok(args)
    table, meta = schema.read_table(out, "scored")
    assert table.num_rows == 6 - expected
    assert "r0/p0" not in table.column("group_id").to_pylist()
    counts = meta["score_counts"]
    assert counts["dropped_invalid_reward"] == expected and counts["groups_in"] == 6
    assert counts["invalid_by_reward"] == {"bad": expected, "length": 0}
    assert f"groups dropped (NaN/inf/None reward): {expected} (bad: {expected})" in output
    for name in ("bad", "length"):  # the stored statistics are over the kept pairs: finite
        assert math.isfinite(meta["rewards"][name]["mean"]) and math.isfinite(meta["rewards"][name]["std"])
    # and training reads it: nothing NaN reaches the loss
    ok(["train", out, *config(env), "--out", tmp_path / "ckpt", "--epochs", 1])


@pytest.fixture(scope="module")
def reward_dirs(tiny, tmp_path_factory) -> dict[str, Path]:
    from conftest import REWARD_TEMPLATE, llama_config, make_tokenizer
    from transformers import LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("reward-dirs")
    tokenizer = make_tokenizer(REWARD_TEMPLATE)
    two = root / "two-labels"
    LlamaForSequenceClassification(llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                num_labels=2)).save_pretrained(two, safe_serialization=True)
    tokenizer.save_pretrained(two)
    corrupt = root / "corrupt"
    shutil.copytree(tiny.reward, corrupt)
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[:1000])  # a truncated download
    pickled = root / "pickled"
    shutil.copytree(tiny.reward, pickled)
    (pickled / "model.safetensors").unlink()
    from safetensors.torch import load_file

    torch.save(load_file(str(tiny.reward / "model.safetensors")), pickled / "pytorch_model.bin")
    return {"two-labels": two, "corrupt": corrupt, "pickled": pickled, "missing": root / "nowhere"}


# The whole line each case must print, up to where the library's own words begin ({dir}: the model directory).
REWARD_MODEL_CASES = [
    ("two-labels", "error: reward 'rm': {dir} has 2 labels; a reward model needs exactly 1"),
    ("corrupt", "error: reward 'rm': cannot load {dir}: SafetensorError: "),
    ("missing", "error: reward 'rm': {dir}: no such model directory"),
    ("pickled", "error: reward 'rm': {dir} holds only pickle weights (pytorch_model.bin), which can run code when "
                "loaded; modpo-pipe loads safetensors only"),
]


@pytest.mark.parametrize(("kind", "expected"), REWARD_MODEL_CASES, ids=[c[0] for c in REWARD_MODEL_CASES])
def test_reward_model_cases(env, tmp_path, reward_dirs, monkeypatch, kind, expected):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    out = tmp_path / "scored.parquet"
    expected = expected.format(dir=reward_dirs[kind])
    line = fails(["score", env / "pairs.parquet", *config(env), "--out", out,
                  "--reward", f"rm={reward_dirs[kind]}"], "")
    assert line.startswith(expected), (line, expected)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ training faults


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


# ------------------------------------------------------------------------------- forked children, SIGKILL


def _slow_down(seconds: float) -> None:
    """In a child: make every chunk, reward call, training step and atomic rename slower, so that kills
    land mid-run (and sometimes between a temporary file's write and its rename)."""
    import modpo_pipe.generate as generate
    import modpo_pipe.rewards as rewards
    import modpo_pipe.score as score
    import modpo_pipe.train as train_module

    def slowed(fn, delay):
        def wrapper(*args, **kwargs):
            time.sleep(delay)
            return fn(*args, **kwargs)
        return wrapper

    generate.sample = slowed(generate.sample, seconds)
    score.batched_sequence_logps = slowed(score.batched_sequence_logps, seconds)
    rewards.CallableReward._score_batch = slowed(rewards.CallableReward._score_batch, seconds)
    train_module.pair_loss = slowed(train_module.pair_loss, seconds)
    schema.fsync_replace = slowed(schema.fsync_replace, seconds / 4)


def fork_cli(args: list, cwd: Path, slow: float = 0.0) -> int:
    """Run the command in a forked child (one torch thread, so every child computes bit for bit alike)."""
    pid = os.fork()
    if pid:
        return pid
    code = 99
    try:
        torch.set_num_threads(1)
        os.chdir(cwd)
        if slow:
            _slow_down(slow)
        try:
            app([str(a) for a in args], prog_name="modpo-pipe")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def wait_exit(pid: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def kill_when(pid: int, ready: Callable[[], bool], delay: float, timeout: float = 240) -> bool:
    """SIGKILL the child `delay` seconds after `ready()` holds; False when it exited on its own first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return False
        if ready():
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                return True
            assert os.waitstatus_to_exitcode(status) == 0
            return False
        time.sleep(0.003)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("child did not reach the kill point")


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


# ------------------------------------------------------------------------- resumable generate and score


@pytest.fixture(scope="module")
def chunked(env) -> dict[str, Path]:
    """Uninterrupted generate (3 chunks of 2 prompts) and score (3 chunks of 2 groups) runs to compare with."""
    base = env / "chunked"
    base.mkdir()
    ok(["generate", env / "prompts.jsonl", *config(env), "--shard-size", 2, "--out", base / "pairs.parquet"])
    ok(["score", base / "pairs.parquet", *config(env), "--shard-size", 2, "--out", base / "scored.parquet"])
    return {"pairs": base / "pairs.parquet", "scored": base / "scored.parquet"}


def _interrupt(monkeypatch, module, name: str, after: int) -> dict:
    """Make module.name raise (as a kill would stop it) on call `after + 1`; count calls."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _generate(env: Path, out: Path, *flags) -> list:
    return ["generate", env / "prompts.jsonl", *config(env), "--shard-size", 2, "--out", out, *flags]


def test_interrupted_generate_resumes_with_the_same_rows(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    _interrupt(monkeypatch, generate, "sample", after=2)
    result = cli(_generate(env, out))
    assert isinstance(result.exception, RuntimeError)
    work = parts.work_dir(out)
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "part-00000.parquet", "part-00001.parquet"]
    assert not out.exists()
    monkeypatch.undo()
    calls = _interrupt(monkeypatch, generate, "sample", after=10)
    output = ok(_generate(env, out))
    assert calls["n"] == 1  # only the unfinished chunk is sampled again
    assert f"resuming: 2 of 3 chunks already done in {work}" in output
    assert "chunks (reused from a killed run): 3 (2)" in output
    same_rows(out, chunked["pairs"])
    no_leftovers(out)


@pytest.mark.parametrize(("flags", "differs"), [
    (["--seed", 1], "seed"),
    (["--temperature", 0.7], "sampling"),
    (["--shard-size", 3], "shard_size"),
    (["--samples-per-prompt", 2], "sampling"),
])
def test_parts_of_another_run_are_refused_never_merged(env, chunked, tmp_path, monkeypatch, flags, differs):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    _interrupt(monkeypatch, generate, "sample", after=1)
    cli(_generate(env, out))
    monkeypatch.undo()
    work = parts.work_dir(out)
    before = sorted(p.name for p in work.iterdir())
    fails([*_generate(env, out), *flags],
          f"{work} holds the unfinished parts of another run of this stage (it differs in: {differs}")
    assert sorted(p.name for p in work.iterdir()) == before and not out.exists()
    if differs == "seed":
        ok(_generate(env, out))  # the run they belong to finishes them
        same_rows(out, chunked["pairs"])


def test_other_prompts_are_a_different_run(env, tmp_path, monkeypatch):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(env / "prompts.jsonl", prompts)
    _interrupt(monkeypatch, generate, "sample", after=1)
    cli(["generate", prompts, *config(env), "--shard-size", 2, "--out", out])
    monkeypatch.undo()
    with open(prompts, "a") as f:
        f.write(json.dumps({"id": "new", "prompt": "One more?"}) + "\n")
    fails(["generate", prompts, *config(env), "--shard-size", 2, "--out", out], "(it differs in: prompts)")


@pytest.mark.parametrize("damage", ["truncated", "foreign", "wrong-rows"])
def test_a_damaged_part_is_redone_not_merged(env, chunked, tmp_path, monkeypatch, damage):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    _interrupt(monkeypatch, generate, "sample", after=2)
    cli(_generate(env, out))
    monkeypatch.undo()
    part = parts.work_dir(out) / "part-00001.parquet"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:200])
    elif damage == "foreign":  # a part with another run's key
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({parts.PART_KEY: b'{"run": "other", "name": "part-00001"}'}),
                       part)
    else:
        table = pq.read_table(part)
        pq.write_table(table.slice(0, 1).replace_schema_metadata(table.schema.metadata), part)
    calls = _interrupt(monkeypatch, generate, "sample", after=10)
    output = ok(_generate(env, out))
    assert calls["n"] == 2  # the damaged chunk and the unfinished one
    assert f"{part}: " in output and "computing it again" in output
    same_rows(out, chunked["pairs"])
    no_leftovers(out)


def test_disk_full_while_writing_a_part(env, chunked, tmp_path, monkeypatch):
    out = tmp_path / "pairs.parquet"
    real = pq.write_table

    def fills_the_disk(table, where, *args, **kwargs):
        if "part-00001" in str(where):
            Path(where).write_bytes(b"PAR1 half a file")
            enospc()
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", fills_the_disk)
    work = parts.work_dir(out)
    fails(_generate(env, out), f"cannot write {work / 'part-00001.parquet'}: No space left on device; the "
                               f"finished parts in {work} are kept: rerun the same command to continue from them")
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "part-00000.parquet"]  # no half part
    monkeypatch.undo()
    output = ok(_generate(env, out))
    assert "resuming: 1 of 3 chunks" in output
    same_rows(out, chunked["pairs"])


def test_disk_full_while_merging_keeps_every_part(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    real = pq.write_table

    def fills_the_disk(table, where, *args, **kwargs):
        if Path(where).name.startswith(".pairs.parquet.tmp"):
            Path(where).write_bytes(b"PAR1 half a file")
            enospc()
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", fills_the_disk)
    work = parts.work_dir(out)
    fails(_generate(env, out), f"cannot write {out}: No space left on device; the parts in {work} are kept: "
                               "rerun the same command to merge them")
    assert not out.exists() and not list(tmp_path.glob(".pairs.parquet.tmp*"))
    assert len(list(work.glob("part-*.parquet"))) == 3
    monkeypatch.undo()
    calls = _interrupt(monkeypatch, generate, "sample", after=0)
    ok(_generate(env, out))
    assert calls["n"] == 0  # nothing sampled again: only merged
    same_rows(out, chunked["pairs"])
    no_leftovers(out)


def test_interrupted_score_recomputes_no_finished_part(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.rewards as rewards
    import modpo_pipe.score as score

    out = tmp_path / "scored.parquet"
    args = ["score", chunked["pairs"], *config(env), "--shard-size", 2, "--out", out]
    _interrupt(monkeypatch, score, "batched_sequence_logps", after=1)  # all reward chunks done, 1 of 3 ref chunks
    result = cli(args)
    assert isinstance(result.exception, RuntimeError)
    names = sorted(p.name for p in parts.work_dir(out).glob("*.parquet"))
    assert names == [f"ref-{0:05d}.parquet"] + [f"reward-length-{c:05d}.parquet" for c in range(3)]
    monkeypatch.undo()
    reward_calls = _interrupt(monkeypatch, rewards.CallableReward, "_score_batch", after=10**6)
    ref_calls = _interrupt(monkeypatch, score, "batched_sequence_logps", after=10**6)
    output = ok(args)
    assert reward_calls["n"] == 0 and ref_calls["n"] == 2
    assert "parts reused from a killed run: 4" in output
    same_rows(out, chunked["scored"])
    no_leftovers(out)


def test_score_parts_of_other_rewards_are_refused(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.score as score

    out = tmp_path / "scored.parquet"
    args = ["score", chunked["pairs"], *config(env), "--shard-size", 2, "--out", out]
    _interrupt(monkeypatch, score, "batched_sequence_logps", after=0)
    cli(args)
    monkeypatch.undo()
    fails([*args, "--reward", f"other=py:{env / 'rewards.py'}:inf"], "(it differs in: rewards)")


def test_drop_mode_parts_are_not_merged_in_error_mode(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.score as score

    out = tmp_path / "scored.parquet"
    args = ["score", chunked["pairs"], *config(env), "--shard-size", 2, "--out", out,
            "--reward", f"bad=py:{env / 'rewards.py'}:nan"]
    _interrupt(monkeypatch, score, "batched_sequence_logps", after=0)
    cli([*args, "--on-invalid-reward", "drop"])
    monkeypatch.undo()
    fails([*args, "--on-invalid-reward", "error"], "reward 'bad': group 'r0/p0' has a non-finite score")
    assert not out.exists()
    ok([*args, "--on-invalid-reward", "drop"])
    assert schema.read_table(out, "scored")[1]["score_counts"]["dropped_invalid_reward"] == 1


def test_chunk_selection_is_ready_for_disjoint_workers():
    """`--shard i/N` is a small addition: each worker takes every N-th chunk; together they cover each once."""
    chunks = parts.chunk_ranges(23, 5)
    assert [(r.start, r.stop) for r in chunks] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert parts.select_chunks(5) == [0, 1, 2, 3, 4]
    taken = [c for i in range(3) for c in parts.select_chunks(5, (i, 3))]
    assert sorted(taken) == [0, 1, 2, 3, 4]


def _readable_parts(work: Path) -> int:
    """Every part file on disk is whole (atomic writes): count them, failing on a half one."""
    n = 0
    for path in work.glob("*.parquet"):
        pq.read_table(path)
        n += 1
    return n


def _stress(args: list, out: Path, cwd: Path, rng: random.Random, max_runs: int = 20) -> int:
    """Run the command again and again, SIGKILLing each run at a random point after a random number of new
    parts, until a run finishes; check after every kill that nothing half-written is on disk."""
    work = parts.work_dir(out)
    for kills in range(max_runs):
        existing = _readable_parts(work) if work.exists() else 0
        target = existing + rng.randint(2, 6)
        pid = fork_cli(args, cwd, slow=0.04)

        def ready(target: int = target) -> bool:
            return work.exists() and len(list(work.glob("*.parquet"))) >= target

        if not kill_when(pid, ready, delay=rng.uniform(0, 0.06)):
            return kills
        if out.exists():  # killed after the merge: the output is whole
            schema.read_metadata(out)
        if work.exists():
            _readable_parts(work)
    raise AssertionError(f"no run finished in {max_runs} tries")


def test_stress_random_kills_lose_and_duplicate_nothing(env, tmp_path):
    """Many small chunks, SIGKILL at seeded random points of generate and score, rerun until done: the
    output equals an uninterrupted run's, every group_id once."""
    rng = random.Random(20261125)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Question {i}: why is the sky blue?"})
                               + "\n" for i in range(24)))
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir()
    killed.mkdir()

    def generate(out: Path) -> list:
        return ["generate", prompts, *config(env), "--shard-size", 2, "--samples-per-prompt", 2, "--out", out]

    def score(pairs: Path, out: Path) -> list:
        return ["score", pairs, *config(env), "--shard-size", 2, "--out", out]

    assert wait_exit(fork_cli(generate(full / "pairs.parquet"), tmp_path)) == 0
    assert wait_exit(fork_cli(score(full / "pairs.parquet", full / "scored.parquet"), tmp_path)) == 0

    kills = _stress(generate(killed / "pairs.parquet"), killed / "pairs.parquet", tmp_path, rng)
    kills += _stress(score(killed / "pairs.parquet", killed / "scored.parquet"), killed / "scored.parquet",
                     tmp_path, rng)
    assert kills >= 4, kills
    for name in ("pairs.parquet", "scored.parquet"):
        ids = pq.read_table(killed / name).column("group_id").to_pylist()
        assert len(ids) == len(set(ids)) == 24
        assert ids == [f"r0/q{i:02d}" for i in range(24)]
        same_rows(killed / name, full / name)
        no_leftovers(killed / name)


# --------------------------------------------------------------------------------------------------- security


def _spy_loaders(monkeypatch) -> list[tuple[str, dict]]:
    import transformers

    calls: list[tuple[str, dict]] = []
    for cls_name in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls_name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("modpo_pipe"):  # our calls only
                calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.mark.parametrize("flag", [None, "--trust-remote-code"])
def test_trust_remote_code_only_with_the_flag_and_safetensors_only(env, tiny, tmp_path, monkeypatch, flag):
    calls = _spy_loaders(monkeypatch)
    extra = [flag] if flag else []
    ok(["generate", env / "prompts.jsonl", *config(env), "--out", tmp_path / "p.parquet", *extra])
    ok(["score", tmp_path / "p.parquet", *config(env), "--out", tmp_path / "s.parquet", "--reward",
        f"rm={tiny.reward}", *extra])
    ok(["train", tmp_path / "s.parquet", *config(env), "--out", tmp_path / "ckpt", "--epochs", 1, *extra])
    loaded = {name for name, _ in calls}
    assert loaded == {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    for name, kwargs in calls:
        assert kwargs.get("trust_remote_code") is (flag is not None), (name, kwargs)
        if name.startswith("AutoModel"):
            assert kwargs.get("use_safetensors") is True, (name, kwargs)


def test_pickle_weights_are_never_loaded(env, tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    policy = tmp_path / "policy"
    shutil.copytree(tiny.policy, policy)
    (policy / "model.safetensors").unlink()
    torch.save(load_file(str(tiny.policy / "model.safetensors")), policy / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    fails(["generate", env / "prompts.jsonl", *config(env), "--policy", policy, "--out", tmp_path / "p.parquet"],
          f"[generate].policy: {policy} holds only pickle weights (pytorch_model.bin), which can run code when "
          "loaded; modpo-pipe loads safetensors only")
    fails(["train", env / "scored.parquet", *config(env), "--policy", policy, "--out", tmp_path / "ckpt"],
          "holds only pickle weights")


def test_py_reward_is_documented_as_code_the_user_runs():
    from modpo_pipe import config, rewards

    assert "runs code the user chose" in rewards.__doc__
    assert "A py: callable is code you chose to run" in config.render_template()
