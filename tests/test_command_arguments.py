"""Flags and arguments at their edges: sizes beyond reason refused or planned lazily, sizes of 0 refused,
malformed sweep, front and eval arguments refused at once, seeds and log intervals of any size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import cli, config, fails, fork_cli, ok

from modpo_pipe import schema


@pytest.fixture(scope="module")
def env(failures_env: Path) -> Path:
    """conftest.failures_env: modpo.toml, reward callables (rewards.py), prompts, pairs and scored (one epoch)."""
    return failures_env


# ------------------------------------------------------------------ huge numbers: refused, or lazy


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


@pytest.mark.slow
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


def test_a_large_seed_trains(env, tmp_path):
    """A seed past about 9.2e12 overflowed torch.manual_seed at the first step (seed * 1_000_003 > 2**64), after
    the model had loaded: a traceback. Derived seeds wrap; seeds that fit draw what they drew before."""
    from modpo_pipe.train import torch_seed

    assert torch_seed(12345) == 12345 and torch_seed(-7) == -7 and torch_seed(2**64 + 5) == 5
    ok(["train", env / "scored.parquet", *config(env), "--seed", 92233720368547, "--out", tmp_path / "ckpt"])
    assert (tmp_path / "ckpt" / "final").is_dir()


@pytest.mark.slow
def test_metrics_keep_the_first_step_whatever_log_every(env, tmp_path):
    """log_every beyond the step count logged the last step alone: run's and status's headline showed its loss as
    both the first and the last, and the first batch's gap to the reference was never recorded."""
    ok(["train", env / "scored.parquet", *config(env), "--log-every", 1000, "--out", tmp_path / "x"])
    records = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 6]
    assert "first_batch_ref_gap" in records[0]


# ----------------------------------------------------------------------------------- sweep, front, eval


@pytest.mark.parametrize("grid", [1, 0, -2])
def test_sweep_refuses_a_grid_of_fewer_than_two_points(env, tmp_path, grid):
    out = tmp_path / "sweep"
    scored = tmp_path / "two.parquet"
    table, meta = schema.read_table(env / "scored.parquet", "scored")
    # a second reward: the grid spans two
    table = table.append_column("reward_other", table.column("reward_length"))
    order = [c for c in table.column_names if not c.startswith("ref_")] + ["ref_logps"]
    meta["rewards"]["other"] = meta["rewards"]["length"]
    schema.write_table(table.select(order), scored, meta)
    fails(["sweep", scored, *config(env), "--out", out, "--grid", grid], f"--grid must be >= 2 (the two ends of "
                                                                        f"the front); got {grid}")
    assert not out.exists()


def test_sweep_takes_no_weights_and_needs_two_rewards(env, tmp_path):
    """sweep took --weights and ignored it (it sets each policy's weights), and on a one-reward file it blamed a
    --vector nobody gave ("would both train into ...")."""
    out = tmp_path / "sweep"
    result = cli(["sweep", env / "scored.parquet", *config(env), "--weights", "length=1", "--out", out])
    assert result.exit_code == 2 and "No such option: --weights" in result.output, result.output
    fails(["sweep", env / "scored.parquet", *config(env), "--out", out],
          "holds one reward (length); a sweep trades rewards off, so it needs two or more")
    assert not out.exists()


FRONT_FILES = [
    ("an-object", {"x": 1}, "expected a non-empty list of policy summaries"),
    ("empty-list", [], "expected a non-empty list of policy summaries"),
    ("list-of-numbers", [1, 2], "summary 0: expected an object, got a number"),
    ("no-rewards", [{"label": "a", "is_reference": False}], "summary 0: 'rewards' is missing or null, expected dict"),
    ("bad-estimate", [{"label": "a", "is_reference": True, "rewards": {"r": 1.0}}],
     "summary 0: rewards.r must be an object with numbers 'mean' and 'sem'"),
]


@pytest.mark.parametrize(("case", "content", "fragment"), FRONT_FILES, ids=[c[0] for c in FRONT_FILES])
def test_front_refuses_an_eval_file_of_another_shape(tmp_path, case, content, fragment):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(content))
    line = fails(["front", path, "--out", tmp_path / "front"], fragment)
    assert str(path) in line
    assert not (tmp_path / "front.png").exists()


def test_front_names_the_summary_that_lacks_a_reward(tmp_path):
    def entry(label, rewards):
        return {"label": label, "policy": label, "is_reference": label == "reference", "weights": None,
                "samples": 1, "rewards": {r: {"mean": 0.5, "sem": 0.1} for r in rewards}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([entry("reference", ["x", "y"])]))
    b.write_text(json.dumps([entry("pol", ["x", "z"])]))
    fails(["front", a, b, "--out", tmp_path / "front"], "no reward 'y' in the summary of 'pol'")


@pytest.mark.parametrize(("spec", "fragment"), [
    ("NAME", "--policies 'NAME': no such directory; give PATH (a model directory) or LABEL=PATH"),
    ("=some/where", "--policies '=some/where': expected PATH or LABEL=PATH, with neither part empty"),
    ("label=", "--policies 'label=': expected PATH or LABEL=PATH, with neither part empty"),
    ("reference=org/model", "the label 'reference' is the reference's own"),
])
def test_eval_refuses_a_malformed_policy_spec_at_once(env, tmp_path, monkeypatch, spec, fragment):
    import modpo_pipe.evaluate as evaluate
    from modpo_pipe import models

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluate ran"))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("a model was looked up"))
    fails(["eval", env / "prompts.jsonl", *config(env), "--policies", spec,
           "--summary-out", tmp_path / "eval.json"], fragment)


def test_eval_refuses_a_label_given_twice(env, tiny, tmp_path, monkeypatch):
    import modpo_pipe.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluate ran"))
    fails(["eval", env / "prompts.jsonl", *config(env), "--policies", f"a={tiny.policy}", "--policies",
           f"a={tiny.reward}", "--summary-out", tmp_path / "eval.json"], "label 'a' is given twice")


def test_eval_says_how_many_held_out_prompts_it_dropped_as_too_long(env, tmp_path):
    """eval dropped long held-out prompts without a word: its means covered fewer prompts than the file."""
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "word " * 200}) + "\n")
    output = ok(["eval", prompts, *config(env), "--max-prompt-tokens", 32, "--out", tmp_path / "eval.json"])
    assert "note: 1 held-out prompts longer than 32 tokens dropped, 0 truncated" in output, output


# ---------------------------------------------------------------------------------------- demo sizes


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


# ---------------------------------------------------------------------------- processes of a run


@pytest.mark.parametrize("rank,world,printed", [("1", "2", False), ("1", None, True), ("", "2", True),
                                                ("x", "2", True), ("0", "2", True)])
def test_only_the_other_processes_of_a_multi_process_run_keep_quiet(tmp_path, monkeypatch, rank, world, printed):
    """A RANK set by a platform for a one-process job hid the error line; an empty or odd RANK was a traceback."""
    monkeypatch.setenv("RANK", rank)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    result = cli(["inspect", tmp_path / "missing.parquet"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert ("error: " in result.output) == printed, result.output
