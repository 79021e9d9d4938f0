"""A reward that exits, raises, returns anything but numbers or numbers beyond float32: `score` fails with one
line naming the reward (or drops what `--on-invalid-reward drop` allows), and keeps nothing half-done.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
from conftest import config, fails, modpo_pipe, ok

from modpo_pipe import parts, schema
from modpo_pipe.errors import ModpoError
from modpo_pipe.rewards import CallableReward, RewardInput


@pytest.fixture(scope="module")
def env(failures_env: Path) -> Path:
    """conftest.failures_env: modpo.toml, reward callables (rewards.py), prompts, pairs and scored (one epoch)."""
    return failures_env


# ------------------------------------------------------------------------ rewards that exit or close streams


def _score(env: Path, out: Path, fn: str, *flags) -> list:
    return ["score", env / "pairs.parquet", *config(env), "--out", out, "--reward-batch-size", 64,
            "--reward", f"bad=py:{env / 'rewards.py'}:{fn}", "--reward", f"length=py:{env / 'rewards.py'}:length",
            *flags]


@pytest.mark.parametrize(("fn", "raised"), [
    ("exits_0", "raised SystemExit: 0"),
    ("exits_bare", "raised SystemExit"),
    ("exits_text", "raised SystemExit: bye"),
    ("base_exception", "raised Stop: not an Exception"),
])
def test_a_reward_that_exits_fails_score_with_one_line(env, tmp_path, fn, raised):
    out = tmp_path / "scored.parquet"
    line = fails(_score(env, out, fn), raised)
    assert line.startswith(f"error: reward 'bad' (py:{env / 'rewards.py'}:{fn}) raised")
    assert not out.exists()


def test_a_reward_module_that_exits_on_import_fails_with_one_line(env, tmp_path):
    module = tmp_path / "exiting.py"
    module.write_text("import sys\nsys.exit(0)\n\ndef fn(prompts, responses):\n    return [0.0] * len(responses)\n")
    fails(["score", env / "pairs.parquet", *config(env), "--out", tmp_path / "s.parquet",
           "--reward", f"bad=py:{module}:fn"], f"reward 'bad': cannot import {module}: SystemExit: 0")


@pytest.mark.slow
def test_a_reward_that_closes_stdout_is_named(faults_env, tmp_path):
    """A reward that closed sys.stdout was reported as a failure to load the reference policy."""
    module = tmp_path / "closing.py"
    module.write_text("import sys\n\ndef fn(prompts, responses):\n    sys.stdout.close()\n"
                      "    return [0.0] * len(responses)\n")
    out = tmp_path / "scored.parquet"
    done = modpo_pipe(["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out,
                       "--reward", f"r=py:{module}:fn"], tmp_path)
    assert done.returncode == 1
    errors = [line[line.index("error: "):] for line in done.stderr.splitlines() if "error: " in line]
    assert errors == [f"error: reward 'r' (py:{module}:fn) closed sys.stdout, which the rest of the process writes "
                      "to: a reward must leave the process's streams open"], done.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- scores checked as stored


def test_a_reward_beyond_float32_is_an_error_naming_the_pair_and_value(env, tmp_path):
    out = tmp_path / "scored.parquet"
    line = fails(_score(env, out, "huge"), "group 'r0/p0' response 1: score 1e+300 is beyond float32 (inf)")
    assert line.startswith("error: reward 'bad' (py:") and "earlier run" not in line
    assert not out.exists()
    # no part holds a value that is not finite as stored
    for part in parts.work_dir(out).glob("*.parquet"):
        table = pq.read_table(part)
        for col in table.column_names:
            values = table.column(col)
            if pa.types.is_list(values.type):
                values = pa.compute.list_flatten(values)
            assert all(np.isfinite(values.to_numpy())), (part, col)
    assert not list(parts.work_dir(out).glob("reward-bad-*.parquet"))


def test_a_reward_beyond_float32_is_dropped_and_counted_in_drop_mode(env, tmp_path):
    out = tmp_path / "scored.parquet"
    ok(_score(env, out, "huge", "--on-invalid-reward", "drop"))
    table, meta = schema.read_table(out, "scored")
    assert meta["score_counts"]["invalid_by_reward"] == {"bad": 4, "length": 0}  # every response of p0's group
    assert meta["score_counts"]["dropped_invalid_reward"] == 1  # so the group goes whole
    assert "r0/p0" not in table.column("group_id").to_pylist()
    assert np.isfinite(pa.compute.list_flatten(table.column("reward_bad")).to_numpy()).all()


def test_a_reward_of_an_int_beyond_any_float_is_one_line(faults_env, tmp_path):
    module = tmp_path / "huge.py"
    module.write_text("def fn(prompts, responses):\n    return [10**400] * len(responses)\n")
    out = tmp_path / "scored.parquet"
    args = ["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out, "--reward", f"r=py:{module}:fn"]
    fails(args, "response 1: score 10000000000")
    assert "is beyond float32 (inf)" in fails(args, "score ")
    assert not out.exists()
    fails([*args, "--on-invalid-reward", "drop"], "no group keeps 2 responses")  # dropped, as an inf is


# ---------------------------------------------------------------------- only a sequence of numbers is a score


def _reward(fn) -> CallableReward:
    reward = CallableReward.__new__(CallableReward)
    reward.name, reward.spec, reward.fn, reward.source = "r", "py:test:fn", fn, None
    return reward


@pytest.mark.parametrize(("returned", "fragment"), [
    (lambda n: {f"k{i}": 1.0 for i in range(n)}, "returned dict, expected a list of floats"),
    (lambda n: set(range(n)), "returned set, expected a list of floats"),
    (lambda n: (float(i) for i in range(n)), "returned generator, expected a list of floats"),
    (lambda n: np.zeros((n, 1)), "returned a 2-D array of shape (3, 1), expected a list of floats"),
    (lambda n: torch.zeros(n, 2), "returned a 2-D array of shape (3, 2)"),
    (lambda n: "abc", "returned str, expected a list of floats"),
    (lambda n: ["1.5"] * n, "response 0: score '1.5' is not a number"),
    (lambda n: [[1.0]] * n, "response 0: score [1.0] is not a number"),
])
def test_a_reward_returning_anything_but_numbers_is_refused(returned, fragment):
    reward = _reward(lambda prompts, responses: returned(len(responses)))
    inputs = [RewardInput([{"role": "user", "content": "hi"}], r) for r in ("a", "bb", "ccc")]
    with pytest.raises(ModpoError, match="reward 'r' \\(py:test:fn\\)") as error:
        reward.score(inputs, batch_size=8)
    assert fragment in str(error.value)


@pytest.mark.parametrize("returned", [
    lambda n: [1, 2.5, True][:n], lambda n: (1.0, 2.0, 3.0), lambda n: np.arange(n, dtype=np.float32),
    lambda n: torch.arange(n, dtype=torch.float64), lambda n: [np.float64(1), torch.tensor(2.0), 3],
])
def test_lists_tuples_and_1d_arrays_of_numbers_are_scores(returned):
    reward = _reward(lambda prompts, responses: returned(len(responses)))
    inputs = [RewardInput([{"role": "user", "content": "hi"}], r) for r in ("a", "bb", "ccc")]
    scores = reward.score(inputs, batch_size=8)
    assert scores == [float(v) for v in returned(3)]


def test_a_reward_returning_a_dict_fails_score(env, tmp_path):
    line = fails(_score(env, tmp_path / "s.parquet", "as_dict"), "returned dict, expected a list of floats")
    assert line.startswith("error: reward 'bad' (py:")


# ------------------------------------------------------------------------------ names, models, statistics


def test_a_reward_name_too_long_for_a_file_name_is_refused_before_any_work(faults_env, tmp_path):
    """A 300-character reward name ended in OSError "File name too long", with a half-made .parts left behind."""
    out = tmp_path / "scored.parquet"
    name = "a" * 300
    fails(["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out,
           "--reward", f"{name}=py:{faults_env / 'rewards.py'}:length"], "reward name 'aaaa")
    assert not out.exists() and not list(tmp_path.glob("*.parts"))
    fails(["init", tmp_path / "modpo.toml", "--reward", f"{name}=py:x.py:fn"], "at most 100 characters")
    ok(["init", tmp_path / "modpo.toml", "--reward", f"{'a' * 100}=py:x.py:fn"])


def test_a_reward_model_without_its_head_is_refused(env, tiny, tmp_path):
    """A causal LM given as a reward (its config saying one label) loaded with a random `score` head: score
    exited 0 with rewards that changed from load to load."""
    lm = tmp_path / "lm-as-rm"
    shutil.copytree(tiny.policy, lm)
    config_json = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config_json, "id2label": {"0": "LABEL_0"},
                                                 "label2id": {"LABEL_0": 0}}))
    fails(["score", env / "pairs.parquet", *config(env), "--reward", f"x={lm}", "--out", tmp_path / "s.parquet"],
          f"{lm} lacks weights of a sequence-classification reward model (score.weight missing; it was saved as "
          "LlamaForCausalLM)")
    assert not (tmp_path / "s.parquet").exists()


def test_max_min_pairs_of_a_constant_reward_say_the_rewards_tie(env, tmp_path):
    """The error blamed a collapsed policy and its learning rate: nothing had collapsed, the rewards tied."""
    fn = tmp_path / "const.py"
    fn.write_text("def const(prompts, responses):\n    return [1.0] * len(responses)\n")
    ok(["score", env / "pairs.parquet", *config(env), "--reward", f"c=py:{fn}:const", "--out", tmp_path / "s.parquet"])
    fails(["train", tmp_path / "s.parquet", *config(env), "--pairs", "max-min", "--out", tmp_path / "x"],
          "no pairs left to train on: in 6 groups every response has the same weighted reward")


def test_reward_stats_of_other_rewards_is_no_corrupt_file(env, tmp_path):
    """--reward-stats naming a good scored file of other rewards was called 'corrupt or not written by
    modpo-pipe'."""
    fn = tmp_path / "const.py"
    fn.write_text("def const(prompts, responses):\n    return [1.0] * len(responses)\n")
    ok(["score", env / "pairs.parquet", *config(env), "--reward", f"c=py:{fn}:const", "--out", tmp_path / "s.parquet"])
    output = fails(["train", env / "scored.parquet", *config(env), "--reward-stats", tmp_path / "s.parquet",
                    "--out", tmp_path / "x"], "holds no reward 'length'; it was scored with the rewards ['c']")
    assert "corrupt" not in output
