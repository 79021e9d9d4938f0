"""A stage that fails, exits or dies: the command exits 1 with one line saying so (never 0), `run` records the
failure, retries it up to [run].max_failures times in a row and then refuses until `--retry`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import config, fails, fork_cli, modpo_pipe, ok, one_round_run, settings_toml, wait_exit

from modpo_pipe.config import GenerateSettings, RunSettings, ScoreSettings


@pytest.fixture(scope="module")
def env(failures_env: Path) -> Path:
    """conftest.failures_env: modpo.toml, reward callables (rewards.py), prompts, pairs and scored (one epoch)."""
    return failures_env


DYING_REWARD_FNS = '''
import os

def dies(prompts, responses):
    print("the reward's last words", flush=True)
    os._exit(0)

def length(prompts, responses):
    return [len(r) / 10.0 for r in responses]
'''


@pytest.fixture(scope="module")
def rewards(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(DYING_REWARD_FNS)
    return path


@pytest.mark.slow
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


def test_run_exits_1_on_every_firing_while_a_reward_exits_and_status_says_so(env, tiny, tmp_path):
    run_dir = one_round_run(tmp_path / "run", tiny, "bad", f"py:{env / 'rewards.py'}:exits_0")
    for _ in range(2):  # every firing, not only the first
        fails(["run", "--workdir", run_dir], f"reward 'bad' (py:{env / 'rewards.py'}:exits_0) raised SystemExit: 0")
    report = json.loads(ok(["status", "--workdir", run_dir, "--json"]))
    by_stage = {row["stage"]: row for row in report["table"]}
    assert by_stage["generate"]["status"] == "done"
    assert by_stage["score"]["status"] == "failed"
    assert "reward 'bad'" in by_stage["score"]["reason"] and "SystemExit: 0" in by_stage["score"]["reason"]
    assert report["next"] == "round-000 score"


def test_run_turns_a_stage_that_exits_into_a_failure(env, tiny, tmp_path, monkeypatch):
    """Whatever calls sys.exit(0) inside a stage (a library, a plugin), `run` records a failure and exits 1."""
    import modpo_pipe.generate as generate

    def exits(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(generate, "run_generate", exits)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "modpo.toml").write_text(settings_toml(
        generate=GenerateSettings(policy=str(tiny.policy)), score=ScoreSettings(rewards={"length": tiny.reward_fn}),
        run=RunSettings(rounds=1, prompts=str(tiny.prompts))))
    fails(["run", "--workdir", run_dir], "round-000 generate failed: SystemExit: 0")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["rounds"]["0"]["generate"]["status"] == "failed"


@pytest.mark.slow
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
