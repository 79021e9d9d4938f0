"""A second pass of hostile but realistic use (issue 37): never a silent exit 0, never a wrong file. Each case
through the command a user runs (or, where the command would run for minutes or take gigabytes, the function
that plans its work).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import config, fails, fork_cli, ok, one_round_run, wait_exit

REWARD_FNS = '''
import os

def dies(prompts, responses):
    print("the reward's last words", flush=True)
    os._exit(0)

def length(prompts, responses):
    return [len(r) / 10.0 for r in responses]
'''


def modpo_pipe(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """The real entry point (`python -m modpo_pipe`, as the `modpo-pipe` script runs it), in a process of its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "modpo_pipe", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def rewards(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARD_FNS)
    return path


# ------------------------------------------------------------- 1. a stage that dies says so, and run stops


def test_a_score_ended_from_inside_exits_1_naming_how(faults_env, rewards, tmp_path):
    """A py: reward that calls os._exit(0) ended `score` with exit 0 and no output: cron saw success."""
    out = tmp_path / "scored.parquet"
    done = modpo_pipe(["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out,
                       "--reward", f"r=py:{rewards}:dies"], tmp_path)
    assert done.returncode == 1, done.stderr
    # (a progress bar the death cut short may share the line: the message starts at "error: ")
    errors = [line[line.index("error: "):] for line in done.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, done.stderr
    assert "modpo-pipe score did not finish" in errors[0] and "os._exit" in errors[0]
    assert not out.exists()
    assert modpo_pipe(["inspect", faults_env / "pairs.parquet"], tmp_path).returncode == 0  # a finished command


def test_run_stops_retrying_a_stage_that_died_three_times_until_retry(tiny, rewards, tmp_path):
    """`run` recorded a silent death as interrupted and retried it on every firing with exit 0, forever. Now the
    dying invocation exits 1, and after [run].max_failures deaths in a row every invocation exits 1 with one line
    naming the stage and its log, without trying it, until `run --retry`; `status` shows the count."""
    run_dir = one_round_run(tmp_path / "run", tiny, "r", f"py:{rewards}:dies")
    first = modpo_pipe(["run", "--workdir", run_dir], tmp_path)
    assert first.returncode == 1 and "modpo-pipe run did not finish" in first.stderr, first.stderr
    for _ in range(2):  # the same death in a process without a watcher: exit 0, the record left `running`
        assert wait_exit(fork_cli(["run", "--workdir", run_dir], tmp_path)) == 0
    log = run_dir / "round-000" / "score.log"
    for _ in range(2):  # every later invocation, and nothing tried: no fourth attempt
        line = fails(["run", "--workdir", run_dir], "round-000 score failed 3 times in a row")
        assert f"its log: {log}" in line and "--retry" in line and "interrupted (the process died)" in line
    state = json.loads((run_dir / "state.json").read_text())
    assert state["rounds"]["0"]["score"]["attempt"] == 3
    text = log.read_text()
    assert text.count("round-000 score: attempt ") == 3
    assert "the reward's last words" in text  # what the stage printed before it died (the watched attempt)
    report = json.loads(ok(["status", "--workdir", run_dir, "--json"]))
    score = next(row for row in report["table"] if row["stage"] == "score")
    assert score["status"] == "failed" and score["failures"] == 3
    assert "failed 3 times in a row: not tried again until `run --retry`" in ok(["status", "--workdir", run_dir])

    fixed = f"--score-reward=r=py:{rewards}:length"
    fails(["run", "--workdir", run_dir, fixed], "failed 3 times in a row")  # a fix alone: still refused
    ok(["run", "--workdir", run_dir, fixed, "--retry"])
    report = json.loads(ok(["status", "--workdir", run_dir, "--json", fixed]))
    assert [row["status"] for row in report["table"]] == ["done"] * 3
    assert all(row["failures"] == 0 for row in report["table"])


def test_max_failures_0_retries_forever_and_failures_count_too(tiny, rewards, tmp_path):
    raising = tmp_path / "raising.py"
    raising.write_text("def fn(prompts, responses):\n    raise RuntimeError('reward server down')\n")
    run_dir = one_round_run(tmp_path / "run", tiny, "r", f"py:{raising}:fn", max_failures=2)
    for _ in range(2):
        fails(["run", "--workdir", run_dir], "reward server down")
    fails(["run", "--workdir", run_dir], "round-000 score failed 2 times in a row ([run].max_failures = 2")
    fails(["run", "--workdir", run_dir, "--max-failures", 0], "reward server down")  # 0: tried again
    assert json.loads((run_dir / "state.json").read_text())["rounds"]["0"]["score"]["attempt"] == 3
    fails(["run", "--workdir", run_dir, "--max-failures", -1], "[run].max_failures must be >= 0")


# ---------------------------------------------------------------------------------- 12. tracebacks left


@pytest.mark.parametrize("seconds", ["twelve", "7.5", None, True, [1]])
def test_status_reads_a_manifest_whose_seconds_is_no_number(tiny, rewards, tmp_path, seconds):
    """state.json is JSON a person may edit: `status` (text) died on a string `seconds` with a traceback."""
    run_dir = one_round_run(tmp_path / "run", tiny, "r", f"py:{rewards}:length")
    record = {"status": "failed", "error": "RuntimeError: boom", "attempt": 1, "seconds": seconds}
    (run_dir / "state.json").write_text(json.dumps({"version": 1, "rounds": {"0": {"generate": record}}}))
    text = ok(["status", "--workdir", run_dir])
    row = next(line for line in text.splitlines() if line.startswith("round-000  generate"))
    assert ("7.5s" if seconds == "7.5" else " - ") in row and "RuntimeError: boom" in row
    assert json.loads(ok(["status", "--workdir", run_dir, "--json"]))["table"][0]["seconds"] == seconds


# -------------------------------------------------------- 2. prompt + response beyond the model's context


@pytest.fixture(scope="module")
def short_context(tiny, tmp_path_factory) -> Path:
    """The tiny policy with a context window of 8 tokens: shorter than any prompt + response of the fault files."""
    import shutil

    path = tmp_path_factory.mktemp("short") / "policy"
    shutil.copytree(tiny.policy, path)
    settings = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 8}))
    return path


def test_score_refuses_responses_beyond_the_references_context_before_any_work(faults_env, short_context, tmp_path):
    """score computed reference log-probs past the context window without a word."""
    out = tmp_path / "scored.parquet"
    line = fails(["score", faults_env / "pairs.parquet", *config(faults_env), "--ref", short_context, "--out", out],
                 f"{faults_env / 'pairs.parquet'}: group 'r0/p0' response 1: prompt + response are ")
    assert f"beyond the 8 of the reference {short_context}'s context window" in line
    assert not out.exists() and not Path(f"{out}.parts").exists()  # refused before any reward ran


def test_train_refuses_responses_beyond_the_policys_context_before_any_work(faults_env, short_context, tmp_path):
    """train warned of a huge log-prob gap, trained on it and exited 0."""
    out = tmp_path / "ckpt"
    line = fails(["train", faults_env / "scored.parquet", *config(faults_env), "--policy", short_context,
                  "--out", out], f"{faults_env / 'scored.parquet'}: group 'r0/p0' response 1: prompt + response are ")
    assert f"beyond the 8 of the policy {short_context}'s context window" in line
    assert not out.exists()
