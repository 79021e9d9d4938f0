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


# ------------------------------------------------------------------ 4. huge numbers: refused, or lazy


GROWTH_LIMIT = 1 << 30  # bytes a child may grow by before it is taken for one that plans a typo's worth of work


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def watch_memory(pid: int, ready=lambda: False) -> str:
    """Wait for a forked child: "exit N" when it exits, "ready" (and killed) once ready() holds, "grew" (and killed)
    once it holds GROWTH_LIMIT more memory than at its start. Whatever the code under test does, the test ends."""
    import signal
    import time

    start = _rss(pid)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit {os.waitstatus_to_exitcode(status)}"
        outcome = "ready" if ready() else "grew" if _rss(pid) - start > GROWTH_LIMIT else ""
        if outcome:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return outcome
        time.sleep(0.05)


def in_child(check) -> int:
    """Run check() in a forked child; its pid (it exits 0 when check returned, 1 when it raised)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            check()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_a_billion_epochs_are_planned_lazily():
    """train --epochs 1000000000 grew by 55 MB/s before its first step: every step of every epoch was planned up
    front. The plan is made step by step now: its size does not grow with the epochs."""
    import tracemalloc

    from modpo_pipe.config import TrainSettings
    from modpo_pipe.train import epoch_order, optimizer_step_groups

    def check():
        tracemalloc.start()
        plan = optimizer_step_groups(17, TrainSettings(batch_size=4, grad_accum=2, epochs=10**9, seed=5))
        assert len(plan) == 2 * 10**9
        last_epoch = 10**9 - 1
        assert plan[-1] == plan[len(plan) - 1] == (last_epoch, epoch_order(17, 5, last_epoch)[8:])
        assert plan[2] == (1, epoch_order(17, 5, 1)[:8])
        assert tracemalloc.get_traced_memory()[1] < 1 << 20  # nothing of the epochs' size was built

    assert watch_memory(in_child(check)) == "exit 0"


def test_train_of_a_billion_epochs_starts_at_once(faults_env, tmp_path):
    out = tmp_path / "ckpt"
    metrics = out / "metrics.jsonl"
    pid = fork_cli(["train", faults_env / "scored.parquet", *config(faults_env), "--epochs", 10**9,
                    "--out", out], tmp_path)
    assert watch_memory(pid, lambda: metrics.is_file() and '"loss"' in metrics.read_text()) == "ready"


def test_generate_refuses_a_billion_samples_per_prompt_naming_the_bound(faults_env, tmp_path):
    """generate --samples-per-prompt 1000000000 grew to 4.8 GB in 32 s with nothing printed."""
    args = ["generate", faults_env / "prompts.jsonl", *config(faults_env), "--samples-per-prompt", 10**9,
            "--out", tmp_path / "pairs.parquet"]
    assert watch_memory(fork_cli(args, tmp_path)) == "exit 1"
    fails(args, "[generate].samples_per_prompt must be at most 1024")  # (now that it is known to stop at once)
    fails([*args[:-4], "--samples-per-prompt", 1025, "--out", tmp_path / "pairs.parquet"], "got 1025")
    assert not (tmp_path / "pairs.parquet").exists()


# --------------------------------------------------------------- 5-9. advice that sends the user the wrong way


@pytest.fixture
def read_only(tmp_path):
    """A directory this process cannot write in (the immutable flag: root ignores modes), made writable again after
    the test."""
    import shutil

    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("running as root where the immutable flag is not supported: no way to make a directory "
                    "read-only here")
    yield path
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


@pytest.mark.parametrize("stage", ["generate", "score"])
def test_an_output_that_cannot_be_written_asks_for_permissions_not_a_rerun(faults_env, read_only, stage):
    """generate and score said "the finished parts are kept: rerun the same command to continue" when nothing
    could be written."""
    source = faults_env / ("prompts.jsonl" if stage == "generate" else "pairs.parquet")
    out = read_only / "out.parquet"
    line = fails([stage, source, *config(faults_env), "--out", out], "fix the permissions or choose another path")
    assert "rerun" not in line and str(read_only) in line


def test_run_in_a_round_directory_that_cannot_be_written_asks_for_a_writable_one(tiny, tmp_path):
    import shutil

    run_dir = one_round_run(tmp_path / "run", tiny, "r", tiny.reward_fn)
    ok(["run", "--workdir", run_dir, "--max-stages", 1])  # generate
    round_dir = run_dir / "round-000"
    if os.geteuid() != 0:
        round_dir.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(round_dir)]).returncode != 0:
        pytest.skip("no way to make a directory read-only here")
    try:
        line = fails(["run", "--workdir", run_dir], "the run directory must be writable")
        assert "rerun" not in line and str(round_dir) in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(round_dir)], check=True)
        else:
            round_dir.chmod(0o755)


def test_a_missing_policy_path_with_slashes_is_no_such_directory(faults_env, tmp_path):
    """A local path such as q/a/b that does not exist got the Hub's "Repo id must be in the form ..."."""
    line = fails(["generate", faults_env / "prompts.jsonl", *config(faults_env), "--policy", "q/a/b",
                  "--out", tmp_path / "pairs.parquet"], "q/a/b: no such model directory")
    assert "Repo id" not in line


def test_run_given_a_file_as_its_workdir_says_so(tmp_path):
    """`run --workdir FILE` advised `init FILE/modpo.toml`, which cannot be written."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for command in ("run", "status"):
        line = fails([command, "--workdir", file], f"--workdir {file} is a file, not a run directory")
        assert "init" not in line


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


def test_a_classifier_given_as_the_policy_is_refused_without_the_load_report(faults_env, tiny, tmp_path):
    """The refusal came after transformers' multi-line LOAD REPORT table."""
    done = modpo_pipe(["generate", faults_env / "prompts.jsonl", *config(faults_env), "--policy", tiny.reward,
                       "--out", tmp_path / "pairs.parquet"], tmp_path)
    assert done.returncode == 1
    assert "has no causal-LM head in its weights" in done.stderr
    assert "LOAD REPORT" not in done.stderr and "MISSING" not in done.stderr, done.stderr


def test_held_transformers_logs_are_shown_after_a_load_that_succeeds():
    import logging

    from modpo_pipe.models import held_logs

    shown: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            shown.append(record.getMessage())

    root = logging.getLogger("transformers")
    collect = Collect()
    root.addHandler(collect)
    try:
        with held_logs():
            logging.getLogger("transformers.modeling_utils").warning("a report")
            assert shown == []  # held while the load runs
        assert shown == ["a report"]
        with pytest.raises(RuntimeError), held_logs():
            logging.getLogger("transformers.modeling_utils").warning("the report of a refused load")
            raise RuntimeError("refused")
        assert shown == ["a report"]
    finally:
        root.removeHandler(collect)


# ---------------------------------------------------------------------------------- 10-13. tracebacks left


def test_a_reward_of_an_int_beyond_any_float_is_one_line(faults_env, tmp_path):
    module = tmp_path / "huge.py"
    module.write_text("def fn(prompts, responses):\n    return [10**400] * len(responses)\n")
    out = tmp_path / "scored.parquet"
    args = ["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out, "--reward", f"r=py:{module}:fn"]
    fails(args, "response 1: score 10000000000")
    assert "is beyond float32 (inf)" in fails(args, "score ")
    assert not out.exists()
    fails([*args, "--on-invalid-reward", "drop"], "no group keeps 2 responses")  # dropped, as an inf is


def test_a_prompts_path_that_is_a_symlink_loop_is_one_line(faults_env, tmp_path):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    fails(["generate", loop, *config(faults_env), "--out", tmp_path / "pairs.parquet"],
          f"{loop}: a symbolic link that leads nowhere")
    fails(["score", loop, *config(faults_env), "--out", tmp_path / "scored.parquet"], f"{loop}")


def test_a_reward_name_too_long_for_a_file_name_is_refused_before_any_work(faults_env, tmp_path):
    """A 300-character reward name ended in OSError "File name too long", with a half-made .parts left behind."""
    out = tmp_path / "scored.parquet"
    name = "a" * 300
    fails(["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out,
           "--reward", f"{name}=py:{faults_env / 'rewards.py'}:length"], "reward name 'aaaa")
    assert not out.exists() and not list(tmp_path.glob("*.parts"))
    fails(["init", tmp_path / "modpo.toml", "--reward", f"{name}=py:x.py:fn"], "at most 100 characters")
    ok(["init", tmp_path / "modpo.toml", "--reward", f"{'a' * 100}=py:x.py:fn"])


# ------------------------------------------------------------------------------ 14. reruns of finished work


def test_rerunning_a_finished_score_has_nothing_to_do(faults_env, tmp_path):
    """A rerun of a finished generate said "nothing to do"; one of a finished score computed everything again."""
    calls = tmp_path / "calls.txt"
    module = tmp_path / "counted.py"
    module.write_text(f"def fn(prompts, responses):\n    with open({str(calls)!r}, 'a') as f:\n"
                      "        f.write('call\\n')\n    return [len(r) / 10.0 for r in responses]\n")
    out = tmp_path / "scored.parquet"
    args = ["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out, "--reward", f"r=py:{module}:fn"]
    ok(args)
    before, called = out.read_bytes(), calls.read_text()
    assert "nothing to do" in ok(args)
    assert out.read_bytes() == before and calls.read_text() == called  # no reward called, nothing written
    ok([*args, "--on-invalid-reward", "drop"])  # a setting that decides the rows: scored again
    assert calls.read_text() != called


def test_rerunning_a_finished_train_has_nothing_to_do(faults_env, tmp_path):
    out = tmp_path / "ckpt"
    args = ["train", faults_env / "scored.parquet", *config(faults_env), "--epochs", 1, "--out", out]
    ok(args)
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    text = ok(args)
    assert "nothing to do" in text and "already trained" in text
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == final


# ---------------------------------------------------------------------------- 15. demo sizes of 0 and below


DEMO_SIZES = [("--train-prompts", "--train-prompts must be between 1 and"),
              ("--eval-prompts", "--eval-prompts must be between 1 and"),
              ("--eval-samples", "--eval-samples must be at least 1"), ("--rounds", "--rounds must be at least 1"),
              ("--train-steps", "--train-steps (0) must be at least --rounds"),
              ("--samples-per-prompt", "--samples-per-prompt must be at least 2")]


@pytest.fixture
def demo_not_run(monkeypatch):
    """The demo's model is never converted and nothing samples: a demo that gets past its size checks stops here."""
    import modpo_pipe.embedded

    def started(*args, **kwargs):
        raise AssertionError("the demo started")

    monkeypatch.setattr(modpo_pipe.embedded, "embedded_policy_dir", started)


@pytest.mark.parametrize(("flag", "refusal"), DEMO_SIZES, ids=[f for f, _ in DEMO_SIZES])
@pytest.mark.parametrize("quick", [False, True])
def test_a_demo_size_of_0_is_refused_not_read_as_the_default(demo_not_run, tmp_path, flag, refusal, quick):
    """`demo --rounds 0` said 0 meant the default, and with --quick 0 meant another default than the help said."""
    fails(["demo", "--out", tmp_path / "demo", *(["--quick"] if quick else []), flag, 0], refusal)
    assert not (tmp_path / "demo").exists()


def test_the_demo_sizes_the_cli_builds(monkeypatch, tmp_path):
    import dataclasses

    import modpo_pipe.demo as demo

    built = []
    monkeypatch.setattr(demo, "run_demo", lambda out, size: built.append(size))
    ok(["demo", "--out", tmp_path])
    ok(["demo", "--out", tmp_path, "--quick"])
    ok(["demo", "--out", tmp_path, "--quick", "--rounds", 3, "--eval-samples", 2, "--seed", 4])
    assert built == [demo.DemoSize(), demo.QUICK, dataclasses.replace(demo.QUICK, rounds=3, eval_samples=2, seed=4)]
    help_text = " ".join(ok(["demo", "--help"]).split())
    assert f"(default {demo.DemoSize().rounds}; --quick: {demo.QUICK.rounds})" in help_text
    assert f"(default {demo.DemoSize().train_prompts}; --quick: {demo.QUICK.train_prompts})" in help_text
