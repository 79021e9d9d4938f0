"""TRL reward functions, unchanged: a `py:` callable written for TRL's GRPOTrainer is called as TRL
calls it (strings or message lists, completion_ids, the prompt file's other columns as keyword arguments), and
those columns travel from prompts.jsonl through pairs.parquet (the optional prompt_columns column)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PROMPTS, fails, generate_settings, ok, write_unchecked

from modpo_pipe import schema
from modpo_pipe.config import RunSettings, ScoreSettings
from modpo_pipe.errors import ModpoError
from modpo_pipe.prompts import PromptFields, read_prompts
from modpo_pipe.rewards import RewardInput, load_reward

# Reward functions exactly as TRL's documentation writes them (one file each: two are named reward_func).
TRL_DOCS = {
    # GRPOTrainer quick start ("Define the reward function, which rewards completions that are close to 20
    # characters"), standard format.
    "reward_len.py": '''
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]
''',
    # docs/source/grpo_trainer.md, "Example 1.1: Reward longer completions (based on the number of characters)".
    "characters.py": '''
def reward_func(completions, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of character count)."""
    return [float(len(completion)) for completion in completions]
''',
    # "Example 2: Reward completions with a specific format", conversational format.
    "format.py": '''
import re

def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]
''',
    # "Example 3: Reward completions based on a reference", standard format with a `ground_truth` column.
    "reference.py": r'''
import re

def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]
''',
    # "Example 5: Asynchronous reward functions".
    "asynchronous.py": '''
import asyncio

async def async_reward_func(prompts, completions, **kwargs):
    # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
    await asyncio.sleep(0.01)
    # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
    return [1.0 if completion else 0.0 for completion in completions]
''',
    # Not TRL's: records what it is called with, in TRL's form.
    "recorder.py": '''
import json, os

def record(prompts, completions, **kwargs):
    with open(os.environ["MODPO_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "kwargs": kwargs}) + "\\n")
    return [float(len(kwargs["completion_ids"][i])) for i in range(len(completions))]

def named_only(completions, solution):
    return [float(s in (c[0]["content"] if isinstance(c, list) else c)) for c, s in zip(completions, solution)]

def modpos_own(prompts, responses):
    return [len(p) + len(r) / 100 for p, r in zip(prompts, responses)]
''',
}


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trl_docs")
    for name, source in TRL_DOCS.items():
        (root / name).write_text(source)
    return root


def reward(docs_dir: Path, target: str):
    return load_reward("r", f"py:{docs_dir / target}", dtype=None, device=None, trust_remote_code=False)


USER = [{"role": "user", "content": "What is the result of (1 + 2) * 4?"}]
THINK = "<think>The sum of 1 and 2 is 3, which we multiply by 4 to get 12.</think><answer>(1 + 2) * 4 = 12</answer>"


def test_standard_format_rewards_get_strings(docs_dir):
    texts = [" blue.", " in the sky.", ""]
    inputs = [RewardInput([{"role": "user", "content": "The sky is"}], t, chat=False) for t in texts]
    assert reward(docs_dir, "reward_len.py:reward_len").score(inputs, 8) == [-abs(20 - len(t)) for t in texts]
    assert reward(docs_dir, "characters.py:reward_func").score(inputs, 2) == [6.0, 12.0, 0.0]
    assert reward(docs_dir, "asynchronous.py:async_reward_func").score(inputs, 8) == [1.0, 1.0, 0.0]


def test_conversational_rewards_get_message_lists(docs_dir):
    inputs = [RewardInput(USER, THINK, chat=True), RewardInput(USER, "12.", chat=True)]
    assert reward(docs_dir, "format.py:format_reward_func").score(inputs, 8) == [1.0, 0.0]
    # The same function on plain prompts fails as it fails under TRL: it indexes a string.
    plain = [RewardInput(USER, THINK, chat=False)]
    with pytest.raises(ModpoError, match=r"reward 'r' \(py:.*format.py:format_reward_func\) raised TypeError"):
        reward(docs_dir, "format.py:format_reward_func").score(plain, 8)


def test_columns_are_keyword_arguments(docs_dir):
    inputs = [RewardInput(USER, r" The solution is \boxed{2}.", chat=False, columns={"ground_truth": "2"}),
              RewardInput(USER, r" The solution is \boxed{6}.", chat=False, columns={"ground_truth": "5"})]
    assert reward(docs_dir, "reference.py:reward_func").score(inputs, 8) == [1.0, 0.0]
    # Without **kwargs, a function gets only the arguments it names.
    named = [RewardInput(USER, "x 12", chat=True, columns={"solution": "12", "other": 1}),
             RewardInput(USER, "x 13", chat=True, columns={"solution": "12", "other": 2})]
    assert reward(docs_dir, "recorder.py:named_only").score(named, 8) == [1.0, 0.0]


def test_what_a_trl_function_is_called_with(docs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MODPO_TEST_RECORD", str(tmp_path / "calls.jsonl"))
    chat = [{"role": "system", "content": "Be brief."}, *USER]
    inputs = [RewardInput(chat, "12", chat=True, columns={"solution": "12", "completion": "x"},
                          response_ids=[5, 6, 7]),
              RewardInput(chat, "13", chat=True, columns={"solution": "12", "completion": "y"}, response_ids=[8])]
    assert reward(docs_dir, "recorder.py:record").score(inputs, 8) == [3.0, 1.0]
    call = json.loads((tmp_path / "calls.jsonl").read_text())
    assert call["prompts"] == [chat, chat]
    assert call["completions"] == [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "13"}]]
    # completion_ids and the columns; a column TRL keeps for itself (completion) is left out, as TRL does
    assert call["kwargs"] == {"completion_ids": [[5, 6, 7], [8]], "solution": ["12", "12"]}


def test_modpo_pipes_own_signature_is_called_as_before(docs_dir):
    inputs = [RewardInput(USER, "abc", chat=True, columns={"solution": "12"})]
    assert reward(docs_dir, "recorder.py:modpos_own").score(inputs, 8) == [len(USER[0]["content"]) + 0.03]


def test_a_column_named_like_trls_own_arguments_is_refused(docs_dir):
    inputs = [RewardInput(USER, "a", chat=False, columns={"completions": "x"})]
    with pytest.raises(ModpoError, match="the prompts have a column 'completions'"):
        reward(docs_dir, "reward_len.py:reward_len").score(inputs, 8)


def test_trls_own_library_rewards():
    pytest.importorskip("trl")  # (TRL is no dependency of modpo-pipe; the docs' examples above run without it)
    think = load_reward("t", "py:trl.rewards:think_format_reward", dtype=None, device=None, trust_remote_code=False)
    inputs = [RewardInput(USER, "<think>\nreasoning\n</think>\nanswer", chat=True),
              RewardInput(USER, "<think>\nreasoning\nanswer", chat=True)]
    assert think.score(inputs, 8) == [1.0, 0.0]


# ------------------------------------------------------------------------------------------ prompts: the columns


def test_prompt_files_carry_their_other_columns(tmp_path):
    rows = [{"id": "a", "prompt": "Q1", "solution": "4", "meta": {"level": 2}},
            {"id": "b", "messages": USER, "solution": None, "tags": ["x"]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = read_prompts(tmp_path / "p.jsonl")
    assert [r.columns for r in records] == [{"solution": "4", "meta": {"level": 2}},
                                            {"solution": None, "tags": ["x"]}]
    # Parquet: every row has every column (null where a row has no value)
    pq.write_table(pa.table({"prompt": ["Q1", None], "messages": [None, USER], "solution": ["4", None],
                             "meta": [{"level": 2}, None]}), tmp_path / "p.parquet")
    records, _ = read_prompts(tmp_path / "p.parquet")
    assert [r.columns for r in records] == [{"solution": "4", "meta": {"level": 2}},
                                            {"solution": None, "meta": None}]
    # Named fields are not columns, whatever they are called; a column named prompt never is either.
    (tmp_path / "q.jsonl").write_text(json.dumps({"qid": 1, "question": "Q", "prompt": "P", "answer": "A"}) + "\n")
    records, _ = read_prompts(tmp_path / "q.jsonl", fields=PromptFields(prompt="question", id="qid"))
    assert (records[0].id, records[0].prompt, records[0].columns) == ("1", "Q", {"answer": "A"})


def test_columns_that_are_no_json_are_left_out_with_a_note(tmp_path, capsys):
    import datetime

    pq.write_table(pa.table({"prompt": ["Q"], "when": [datetime.datetime(2024, 1, 1)], "answer": ["A"]}),
                   tmp_path / "p.parquet")
    records, _ = read_prompts(tmp_path / "p.parquet")
    assert records[0].columns == {"answer": "A"}
    assert "'when'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def work(tiny, docs_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("trl_work")
    (work / "modpo.toml").write_text(generate_settings(tiny, 2))
    plain = [{"id": f"p{i}", "prompt": p, "ground_truth": str(i)} for i, p in enumerate(PROMPTS)]
    (work / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    chats = [{"id": f"c{i}", "messages": [{"role": "user", "content": p}], "solution": f"s{i}"}
             for i, p in enumerate(PROMPTS)]
    (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    for kind in ("plain", "chats"):
        ok(["generate", f"{kind}.jsonl", "--out", f"{kind}-pairs.parquet"], work)
    return work


def score(work: Path, kind: str, **rewards: str) -> pa.Table:
    out = work / f"{kind}-{'-'.join(rewards)}.parquet"
    ok(["score", f"{kind}-pairs.parquet", "--out", out, *[a for n, spec in rewards.items()
                                                         for a in ("--reward", f"{n}={spec}")]], work)
    return schema.read_table(out, "scored")[0]


def test_pairs_files_hold_the_columns_and_the_prompt_format(work):
    table, meta = schema.read_table(work / "plain-pairs.parquet", "pairs")
    assert meta["prompt_format"] == "text"
    assert [json.loads(c) for c in table.column("prompt_columns").to_pylist()] == [
        {"ground_truth": str(i)} for i in range(len(PROMPTS))]
    assert schema.read_metadata(work / "chats-pairs.parquet")["prompt_format"] == "chat"


def test_score_calls_trl_rewards_trls_way(work, docs_dir):
    table = score(work, "plain", length=f"py:{docs_dir / 'reward_len.py'}:reward_len",
                  exact=f"py:{docs_dir / 'reference.py'}:reward_func")
    for row in table.to_pylist():
        assert row["reward_length"] == [-abs(20 - len(r)) for r in row["responses"]]
        truth = json.loads(row["prompt_columns"])["ground_truth"]
        expected = [1.0 if (m := re.search(r"\\boxed\{(.*?)\}", r)) and m.group(1) == truth else 0.0
                    for r in row["responses"]]
        assert row["reward_exact"] == expected
    chats = score(work, "chats", named=f"py:{docs_dir / 'recorder.py'}:named_only",
                  format=f"py:{docs_dir / 'format.py'}:format_reward_func")
    for row in chats.to_pylist():
        solution = json.loads(row["prompt_columns"])["solution"]
        assert row["reward_named"] == [float(solution in r) for r in row["responses"]]
        assert row["reward_format"] == [0.0] * len(row["responses"])  # (a random tiny policy writes no <think>)


def test_the_column_survives_shards_and_old_files_still_read(work, tmp_path):
    for i in range(2):
        ok(["generate", "plain.jsonl", "--shard", f"{i}/2", "--shard-size", 3, "--out", tmp_path / "p.parquet"],
           work)
    ok(["merge", tmp_path / "p.shards", "--out", tmp_path / "merged.parquet"])
    merged, whole = (schema.read_table(p, "pairs")[0] for p in (tmp_path / "merged.parquet",
                                                                 work / "plain-pairs.parquet"))
    assert merged.column("prompt_columns").to_pylist() == whole.column("prompt_columns").to_pylist()
    # A pairs file without the column (any file written before it, or of prompts without other fields) reads.
    table, meta = pq.read_table(work / "plain-pairs.parquet"), schema.read_metadata(work / "plain-pairs.parquet")
    old = write_unchecked(table.drop_columns(["prompt_columns"]), meta, tmp_path / "old.parquet")
    assert not schema.has_prompt_columns(schema.read_table(old, "pairs")[0].schema)
    # ... but not one whose column is of another type, or null
    bad = table.set_column(table.schema.get_field_index("prompt_columns"), "prompt_columns",
                           pa.array([1] * table.num_rows, pa.int64()))
    with pytest.raises(ModpoError, match="column 'prompt_columns' has type int64, expected string"):
        schema.read_table(write_unchecked(bad, meta, tmp_path / "bad.parquet"), "pairs")


def test_a_damaged_column_is_one_line_naming_the_group(work, docs_dir, tmp_path):
    table, meta = pq.read_table(work / "plain-pairs.parquet"), schema.read_metadata(work / "plain-pairs.parquet")
    values = table.column("prompt_columns").to_pylist()
    values[1] = "[1, 2]"
    damaged = table.set_column(table.schema.get_field_index("prompt_columns"), "prompt_columns",
                               pa.array(values, pa.string()))
    path = write_unchecked(damaged, meta, tmp_path / "damaged.parquet")
    fails(["score", path, "--out", tmp_path / "s.parquet", "--reward",
           f"x=py:{docs_dir / 'reward_len.py'}:reward_len"], "group 'r0/p1': prompt_columns must be a JSON object",
          cwd=work)


def test_mixed_prompts_are_refused_for_trl_rewards_only(work, docs_dir, tmp_path):
    rows = [{"id": "a", "prompt": PROMPTS[0]}, {"id": "b", "messages": [{"role": "user", "content": PROMPTS[1]}]}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok(["generate", tmp_path / "mixed.jsonl", "--out", tmp_path / "pairs.parquet"], work)
    assert schema.read_metadata(tmp_path / "pairs.parquet")["prompt_format"] == "mixed"
    fails(["score", tmp_path / "pairs.parquet", "--out", tmp_path / "s.parquet", "--reward",
           f"x=py:{docs_dir / 'reward_len.py'}:reward_len"], "its prompts mix plain text and chats", cwd=work)
    ok(["score", tmp_path / "pairs.parquet", "--out", tmp_path / "s.parquet", "--reward",
        f"x=py:{docs_dir / 'recorder.py'}:modpos_own"], work)


def test_rounds_carry_the_columns_into_each_round(work, docs_dir, tiny):
    run = work / "run"
    run.mkdir()
    (run / "modpo.toml").write_text(generate_settings(
        tiny, 2, score=ScoreSettings(rewards={"exact": f"py:{docs_dir / 'reference.py'}:reward_func"}),
        run=RunSettings(rounds=1, prompts=str(work / "plain.jsonl"), prompts_per_round=2)))
    ok(["run", "--workdir", run, "--max-stages", 2])
    lines = [json.loads(line) for line in (run / "round-000" / "prompts.jsonl").read_text().splitlines()]
    assert lines == [{"id": "p0", "ground_truth": "0", "prompt": PROMPTS[0]},
                     {"id": "p1", "ground_truth": "1", "prompt": PROMPTS[1]}]
    scored = schema.read_table(run / "round-000" / "scored.parquet", "scored")[0]
    assert all(math.isfinite(v) for row in scored.column("reward_exact").to_pylist() for v in row)


def test_eval_calls_trl_rewards_with_the_prompt_columns(work, docs_dir, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MODPO_TEST_RECORD", str(tmp_path / "calls.jsonl"))
    ok(["eval", "plain.jsonl", "--policies", f"p={tiny.policy}", "--out", tmp_path / "eval.json",
        "--reward", f"exact=py:{docs_dir / 'reference.py'}:reward_func",
        "--reward", f"ids=py:{docs_dir / 'recorder.py'}:record"], work)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    truths = {(p, t) for call in calls for p, t in zip(call["prompts"], call["kwargs"]["ground_truth"])}
    assert truths == {(p, str(i)) for i, p in enumerate(PROMPTS)}
    summaries = json.loads((tmp_path / "eval.json").read_text())
    for summary in summaries:  # `ids` scores each response by its number of completion_ids
        assert summary["rewards"]["ids"]["mean"] == pytest.approx(summary["response_tokens"]["mean"])
