"""Faults of `score`: bad pairs files, reward callables and reward models that fail, and interrupted or foreign
chunked runs.

Each case goes through the commands as a user runs them (test_faults_*.py, one a stage; conftest.py says more).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli, config, fails, interrupt, no_leftovers, ok, same_rows, write_unchecked

from modpo_pipe import parts, schema


@pytest.fixture(scope="module")
def env(faults_env: Path) -> Path:
    """The fault suites' one shared directory (conftest.faults_env): modpo.toml, prompts, pairs and scored."""
    return faults_env


# ------------------------------------------------------------------------------------------------ pairs files


def _bad_pairs(kind: str, env: Path, tmp_path: Path) -> Path:
    table, meta = schema.read_table(env / "pairs.parquet", "pairs")
    path = tmp_path / "in.parquet"
    if kind == "schema-version":
        return write_unchecked(table, {**meta, "schema_version": 99}, path)
    if kind == "missing-column":
        return write_unchecked(table.drop_columns(["response_ids"]), meta, path)
    if kind == "mistyped-column":
        return write_unchecked(table.set_column(table.schema.get_field_index("round"), "round",
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
        return write_unchecked(table.slice(0, 0), meta, path)
    if kind == "ids-outside-vocab":
        rows = table.to_pylist()
        rows[3]["response_ids"][0] = [5, 100_000]
        return write_unchecked(pa.Table.from_pylist(rows, schema=table.schema), meta, path)
    if kind == "duplicate-group-id":
        rows = table.to_pylist()
        rows[1]["group_id"] = rows[0]["group_id"]
        return write_unchecked(pa.Table.from_pylist(rows, schema=table.schema), meta, path)
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


# ------------------------------------------------------------------------------------------- reward callables


# (case, reward spec, on_invalid_reward, expected: an error fragment, or (groups, responses) dropped)
REWARD_CASES = [
    ("raises", "raises", "error", "raised ValueError: model server unreachable"),
    ("raises-even-with-drop", "raises", "drop", "raised ValueError: model server unreachable"),
    ("wrong-count", "wrong_count", "error", "returned 23 scores for 24 responses"),
    ("wrong-count-even-with-drop", "wrong_count", "drop", "returned 23 scores for 24 responses"),
    ("nan", "nan", "error", "group 'r0/p0' response 1: score is nan; [score].on_invalid_reward = \"drop\""),
    ("inf", "inf", "error", "group 'r0/p0' response 1: score is inf"),
    ("none", "none", "error", "group 'r0/p0' response 1: score None is not a number"),
    ("nan-dropped", "nan", "drop", (1, 4)),  # every response of the France group
    ("inf-dropped", "inf", "drop", (1, 4)),
    ("none-dropped", "none", "drop", (1, 4)),
    ("one-nan-dropped", "one_nan", "drop", (0, 1)),  # the group keeps its 3 other responses
    ("three-nan-dropped", "three_nan", "drop", (1, 3)),  # 1 left: no pair, the group goes
    ("all-nan-dropped", "all_nan", "drop",
     "no group keeps 2 responses without a NaN, inf or None reward (bad: 24 responses); nothing to write"),
]


@pytest.mark.parametrize(("case", "fn", "mode", "expected"), REWARD_CASES, ids=[c[0] for c in REWARD_CASES])
def test_reward_callable_cases(env, tmp_path, case, fn, mode, expected):
    out = tmp_path / "scored.parquet"
    args = ["score", env / "pairs.parquet", *config(env), "--out", out, "--on-invalid-reward", mode,
            "--reward", f"bad=py:{env / 'rewards.py'}:{fn}", "--reward", f"length=py:{env / 'rewards.py'}:length",
            "--reward-batch-size", 64]
    if isinstance(expected, str):
        line = fails(args, expected)
        assert "reward 'bad'" in line or "no group keeps" in line
        assert not out.exists()
        return
    groups, responses = expected
    output = ok(args)
    table, meta = schema.read_table(out, "scored")
    assert table.num_rows == 6 - groups
    counts = meta["score_counts"]
    assert counts["dropped_invalid_reward"] == groups and counts["groups_in"] == 6
    assert counts["dropped_invalid_responses"] == responses
    assert counts["invalid_by_reward"] == {"bad": responses, "length": 0}
    assert f"responses dropped (NaN/inf/None reward): {responses} (bad: {responses})" in output
    assert f"groups dropped (fewer than 2 responses left): {groups}" in output
    france = {r["group_id"]: r for r in table.to_pylist()}.get("r0/p0")
    if groups:
        assert france is None
    else:  # the same group less its first response, in every per-response column; the others untouched
        before = {r["group_id"]: r for r in schema.read_table(env / "scored.parquet", "scored")[0].to_pylist()}
        for name in ("responses", "response_ids", "finish_reasons", "gen_logps", "ref_logps", "reward_length"):
            assert france[name] == before["r0/p0"][name][1:], name
        assert france["reward_bad"] == before["r0/p0"]["reward_length"][1:]
        assert [r for r in table.to_pylist() if r["group_id"] != "r0/p0"] == [
            {**r, "reward_bad": r["reward_length"]} for g, r in before.items() if g != "r0/p0"]
    for name in ("bad", "length"):  # the stored statistics are over the kept responses: finite
        assert math.isfinite(meta["rewards"][name]["mean"]) and math.isfinite(meta["rewards"][name]["std"])
    # and training reads it: nothing NaN reaches the loss
    ok(["train", out, *config(env), "--out", tmp_path / "ckpt", "--epochs", 1])


# ---------------------------------------------------------------------------------------------- reward models


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


# -------------------------------------------------------------------------------------------- resumable score


def test_interrupted_score_recomputes_no_finished_part(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.rewards as rewards
    import modpo_pipe.score as score

    out = tmp_path / "scored.parquet"
    args = ["score", chunked["pairs"], *config(env), "--shard-size", 2, "--out", out]
    interrupt(monkeypatch, score, "batched_sequence_logps", after=1)  # all reward chunks done, 1 of 3 ref chunks
    result = cli(args)
    assert isinstance(result.exception, RuntimeError)
    names = sorted(p.name for p in parts.work_dir(out).glob("*.parquet"))
    assert names == [f"ref-{0:05d}.parquet"] + [f"reward-length-{c:05d}.parquet" for c in range(3)]
    monkeypatch.undo()
    reward_calls = interrupt(monkeypatch, rewards.CallableReward, "_score_batch", after=10**6)
    ref_calls = interrupt(monkeypatch, score, "batched_sequence_logps", after=10**6)
    output = ok(args)
    assert reward_calls["n"] == 0 and ref_calls["n"] == 2
    assert "parts reused from a killed run: 4" in output
    same_rows(out, chunked["scored"])
    no_leftovers(out)


def test_score_parts_of_other_rewards_are_refused(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.score as score

    out = tmp_path / "scored.parquet"
    args = ["score", chunked["pairs"], *config(env), "--shard-size", 2, "--out", out]
    interrupt(monkeypatch, score, "batched_sequence_logps", after=0)
    cli(args)
    monkeypatch.undo()
    fails([*args, "--reward", f"other=py:{env / 'rewards.py'}:inf"], "(it differs in: rewards)")


def test_drop_mode_parts_are_not_merged_in_error_mode(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.score as score

    out = tmp_path / "scored.parquet"
    args = ["score", chunked["pairs"], *config(env), "--shard-size", 2, "--out", out,
            "--reward", f"bad=py:{env / 'rewards.py'}:nan"]
    interrupt(monkeypatch, score, "batched_sequence_logps", after=0)
    cli([*args, "--on-invalid-reward", "drop"])
    monkeypatch.undo()
    fails([*args, "--on-invalid-reward", "error"], "reward 'bad': group 'r0/p0' response 1 has a non-finite score")
    assert not out.exists()
    ok([*args, "--on-invalid-reward", "drop"])
    assert schema.read_table(out, "scored")[1]["score_counts"]["dropped_invalid_reward"] == 1


def test_sharded_drop_mode_merges_to_the_unsharded_rows_and_counts(env, chunked, tmp_path):
    """Dropped responses are counted per shard and summed by merge; the merged rows are the unsharded run's."""
    args = [*config(env), "--shard-size", 2, "--reward", f"bad=py:{env / 'rewards.py'}:one_nan",
            "--on-invalid-reward", "drop"]
    ok(["score", chunked["pairs"], *args, "--out", tmp_path / "whole.parquet"])
    for i in range(3):
        ok(["score", chunked["pairs"], *args, "--shard", f"{i}/3", "--out", tmp_path / "scored.parquet"])
    ok(["merge", *sorted((tmp_path / "scored.shards").glob("*.parquet")), "--out", tmp_path / "merged.parquet"])
    (whole, whole_meta), (merged, merged_meta) = (schema.read_table(tmp_path / f, "scored")
                                                  for f in ("whole.parquet", "merged.parquet"))
    assert merged.to_pylist() == whole.to_pylist()
    counts = merged_meta["score_counts"]
    assert counts["dropped_invalid_responses"] == 1 and counts["dropped_invalid_reward"] == 0
    assert counts["invalid_by_reward"] == whole_meta["score_counts"]["invalid_by_reward"] == {"bad": 1}
    # a drop-mode shard scored before drops were per response (no such count): refused, not mixed in
    old = sorted((tmp_path / "scored.shards").glob("*.parquet"))[1]
    table, meta = pq.read_table(old), schema.read_metadata(old)
    del meta["score_counts"]["dropped_invalid_responses"]
    write_unchecked(table, meta, old)
    fails(["merge", *sorted((tmp_path / "scored.shards").glob("*.parquet")), "--out", tmp_path / "again.parquet"],
          "scored by an older modpo-pipe, whose on_invalid_reward = \"drop\" dropped whole groups")
