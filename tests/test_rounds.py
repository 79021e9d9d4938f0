"""Iterative rounds in a run directory (`modpo-pipe run` / `status`, modpo_pipe/rounds.py).

One uninterrupted three-round run (several short invocations) is the reference; a second run of the same
settings is killed with SIGKILL inside each stage, with a concurrent invocation refused along the way, and
must finish with the same rows and ids. Copies of the reference check corruption and settings changes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import two_reward_run_settings
from typer.testing import CliRunner

from modpo_pipe import rounds, runstate
from modpo_pipe.cli import app
from modpo_pipe.config import _toml_value, load_settings
from modpo_pipe.errors import ModpoError

runner = CliRunner()
ROUNDS = 3


def write_config(run_dir: Path, tiny, **extra: dict[str, object]) -> Path:
    """A small but complete run: 4 prompts, 1 pair each, 8 new tokens, 2 epochs of 4 train steps of 1 pair."""
    sections: dict[str, dict[str, object]] = {
        "model": {"device": "cpu", "dtype": "float32"},
        "generate": {"policy": str(tiny.policy), "backend": "transformers", "max_new_tokens": 8,
                     "samples_per_prompt": 2, "seed": 3},
        "score.rewards": {"rm": str(tiny.reward), "length": tiny.reward_fn},
        "train": {"lr": 5e-4, "epochs": 2, "batch_size": 1, "save_every": 1},
        "run": {"rounds": ROUNDS, "prompts": str(run_dir.parent / "prompts.jsonl")},
    }
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "modpo.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_prompts(path: Path, tiny, n: int = 4) -> None:
    path.write_text("".join(tiny.prompts.read_text().splitlines(keepends=True)[:n]))


def invoke(args: list[str], expect: int = 0) -> str:
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.output


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def record(run_dir: Path, k: int, stage: str) -> dict | None:
    if not (run_dir / "state.json").is_file():
        return None
    try:
        return manifest(run_dir)["rounds"].get(str(k), {}).get(stage)
    except json.JSONDecodeError:  # never happens: it is replaced atomically
        raise


def stages_ran(output: str) -> list[str]:
    return [line.split()[1] + " " + line.split()[2].rstrip(":") for line in output.splitlines()
            if line.endswith(("starting", "resuming")) or ": starting (" in line or ": resuming (" in line]


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rounds")
    write_prompts(root / "prompts.jsonl", tiny)
    return root


@pytest.fixture(scope="module")
def reference_invocations(base, tiny) -> tuple[Path, list[list[str]]]:
    """Three rounds advanced by repeated short invocations, as cron would: the run directory and the stages each
    invocation ran."""
    run_dir = base / "reference"
    write_config(run_dir, tiny)
    w = str(run_dir)
    invocations = [["--max-stages", "1"], ["--until", "round"], ["--max-stages", "4"], []]
    return run_dir, [stages_ran(invoke(["run", "-w", w, *flags])) for flags in invocations]


@pytest.fixture(scope="module")
def reference(reference_invocations) -> Path:
    return reference_invocations[0]


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in run_dir.rglob("*")}


def assert_same_run(a: Path, b: Path) -> None:
    """Same rows and ids in every round, the same trained weights, no duplicates or gaps, no leftovers."""
    from safetensors.torch import load_file

    for k in range(ROUNDS):
        ra, rb = a / rounds.round_name(k), b / rounds.round_name(k)
        for name in ("pairs.parquet", "scored.parquet"):
            ta, tb = pq.read_table(ra / name), pq.read_table(rb / name)
            for column in ("group_id", "prompt_ids", "response_ids", "round"):
                assert ta.column(column).to_pylist() == tb.column(column).to_pylist(), (k, name, column)
            assert len(set(tb.column("group_id").to_pylist())) == tb.num_rows
        sa, sb = pq.read_table(ra / "scored.parquet"), pq.read_table(rb / "scored.parquet")
        for column in ("reward_rm", "reward_length", "ref_logps"):
            flat_a = [v for values in sa.column(column).to_pylist() for v in values]
            flat_b = [v for values in sb.column(column).to_pylist() for v in values]
            assert flat_a == pytest.approx(flat_b, abs=1e-5)
        wa = load_file(str(ra / "policy" / "model.safetensors"))
        wb = load_file(str(rb / "policy" / "model.safetensors"))
        # Adam turns float noise (reduction order under thread contention) into up to a fraction of one lr
        # step on weights whose gradients are near zero; a skipped or repeated step would move most weights
        # by about lr (5e-4). So: the worst weight within half a step, the mean far below it.
        diffs = torch.cat([(wa[n] - wb[n]).abs().flatten() for n in wa])
        assert diffs.max().item() < 2.5e-4 and diffs.mean().item() < 1e-6, (diffs.max(), diffs.mean())
        steps = [json.loads(line)["step"] for line in (rb / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)) and steps
        assert (rb / "metrics.jsonl").read_text() == (rb / "train" / "metrics.jsonl").read_text()
        assert not (rb / "train" / "state").exists()  # dropped once the round's policy was written
    leftovers = [p for p in b.rglob("*") if ".tmp" in p.name or p.name.endswith((".parts", ".old"))]
    assert not leftovers
    ma, mb = manifest(a), manifest(b)
    for k in range(ROUNDS):
        for stage in rounds.STAGES:
            assert mb["rounds"][str(k)][stage]["status"] == "done"
            assert mb["rounds"][str(k)][stage]["summary"]["rows"] == ma["rounds"][str(k)][stage]["summary"]["rows"]


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_three_rounds_layout_manifest_and_status(reference_invocations):
    reference, ran = reference_invocations
    assert ran == [["round-000 generate"], ["round-000 score", "round-000 train"],
                   ["round-001 generate", "round-001 score", "round-001 train", "round-002 generate"],
                   ["round-002 score", "round-002 train"]]
    for k in range(ROUNDS):
        rd = reference / rounds.round_name(k)
        assert (rd / "pairs.parquet").is_file() and (rd / "scored.parquet").is_file()
        assert (rd / "metrics.jsonl").is_file()
        assert os.readlink(rd / "policy") == "train/final"
        assert (rd / "policy" / "model.safetensors").is_file()
        table = pq.read_table(rd / "pairs.parquet")
        assert set(table.column("round").to_pylist()) == {k}
        assert all(pid.startswith(f"r{k}/") for pid in table.column("group_id").to_pylist())
    m = manifest(reference)
    assert m["rounds"]["1"]["generate"]["inputs"] == {"round-000/policy": m["rounds"]["0"]["train"]["outputs"][
        "policy"]["fingerprint"]}
    pairs_meta = json.loads(pq.read_schema(reference / "round-001" / "pairs.parquet").metadata[b"modpo_pipe"])
    assert pairs_meta["policy"]["path"] == str(reference / "round-000" / "policy")  # round 1 samples round 0's policy
    scored_meta = json.loads(pq.read_schema(reference / "round-002" / "scored.parquet").metadata[b"modpo_pipe"])
    assert scored_meta["ref"]["path"] == m["initial_policy"]  # reference = fixed: the initial policy
    for stage in rounds.STAGES:
        rec = m["rounds"]["0"][stage]
        assert rec["status"] == "done" and rec["started"] <= rec["finished"] and rec["settings"]

    # Nothing left to do: exit 0, nothing touched.
    before = snapshot(reference)
    assert "nothing to do" in invoke(["run", "-w", str(reference)])
    assert snapshot(reference) == {**before, ".lock": snapshot(reference)[".lock"]}

    text = invoke(["status", "-w", str(reference)])
    assert "9/9 stages done" in text
    for k in range(ROUNDS):
        for stage in rounds.STAGES:
            assert any(line.startswith(f"round-{k:03d}  {stage}") and " done " in line for line in text.splitlines())
    assert "mean reward on each round's samples" in text and "kl_k2" in text
    report = json.loads(invoke(["status", "-w", str(reference), "--json"]))
    assert set(report["reward_mean_by_round"]) == {"0", "1", "2"}
    assert all(set(means) == {"rm", "length"} for means in report["reward_mean_by_round"].values())
    train_row = next(r for r in report["table"] if r["round"] == 2 and r["stage"] == "train")
    assert {"loss", "kl_k2", "loss_start", "loss_span"} <= set(train_row["summary"]) and train_row["seconds"] > 0


def _start(run_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "modpo_pipe", "run", "-w", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)


def _wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _running(run_dir: Path, k: int, stage: str):
    return lambda: (record(run_dir, k, stage) or {}).get("status") == "running"


def _kill(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the `run` started; the process doing its work dies with it (the kernel's parent-death signal, a
    moment later: until then it holds the lock)."""
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.time() + 60
    while runstate.lock_is_held(run_dir):
        assert time.time() < deadline, "the work outlived its watcher"
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_in_every_stage_then_rerun_equals_uninterrupted(base, tiny, reference, tmp_path):
    run_dir = base / "killed"
    write_config(run_dir, tiny)
    log = tmp_path / "runs.log"

    # generate: killed once it is marked running; meanwhile a second invocation finds the lock held.
    first = _start(run_dir, log)
    _wait_for(first, _running(run_dir, 0, "generate"), "round-000 generate starts")
    # Hold it still (and the lock held) while the second one tries: the process doing the work, a child of the one
    # started, which watches it (modpo_pipe/supervise.py).
    worker = record(run_dir, 0, "generate")["pid"]
    os.kill(worker, signal.SIGSTOP)
    before = snapshot(run_dir)
    started = time.time()
    second = subprocess.run([sys.executable, "-m", "modpo_pipe", "run", "-w", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == rounds.EXIT_LOCKED, second.stderr
    assert "another invocation holds the lock" in second.stderr and f"pid {worker}" in second.stderr
    assert snapshot(run_dir) == before  # touched nothing
    assert time.time() - started < 60  # exits at once: no model is loaded before the lock
    _kill(first, run_dir)  # the work dies with its watcher, stopped or not
    assert record(run_dir, 0, "generate")["status"] == "running"

    # score: killed as soon as it is marked running (the dead process's lock does not block the rerun).
    proc = _start(run_dir, log)
    _wait_for(proc, _running(run_dir, 0, "score"), "round-000 score starts")
    _kill(proc, run_dir)
    assert record(run_dir, 0, "generate")["status"] == "done"
    assert record(run_dir, 0, "score")["status"] == "running"

    # train: killed after its first saved state, mid-loop.
    state = run_dir / "round-000" / "train" / "state" / "state.json"
    proc = _start(run_dir, log)
    _wait_for(proc, state.is_file, "round-000 train saves a state")
    _kill(proc, run_dir)
    assert record(run_dir, 0, "train")["status"] == "running", "train finished before the kill"
    if not state.is_file():  # killed between the two renames that swap a new state in
        state = state.parent.with_name("state.old") / "state.json"
    saved_step = json.loads(state.read_text())["step"]
    assert 1 <= saved_step < 8

    text = invoke(["status", "-w", str(run_dir)])
    assert any(line.startswith("round-000  train") and "failed" in line and "interrupted" in line
               for line in text.splitlines()), text

    out = invoke(["run", "-w", str(run_dir), "--train-save-every", "3"])  # saving more or less often keeps the state
    assert stages_ran(out)[0] == "round-000 train" and "round-000 train: resuming" in out
    assert record(run_dir, 0, "train")["summary"]["resumed_from"] == saved_step
    assert record(run_dir, 0, "train")["attempt"] == 2
    assert_same_run(reference, run_dir)


@pytest.mark.slow
def test_truncated_or_corrupted_outputs_are_detected_and_redone(base, reference):
    run_dir = base / "corrupted"
    shutil.copytree(reference, run_dir, symlinks=True)
    scored = run_dir / "round-002" / "scored.parquet"
    scored.write_bytes(scored.read_bytes()[: scored.stat().st_size // 2])
    text = invoke(["status", "-w", str(run_dir)])
    assert any(line.startswith("round-002  score") and "redo" in line and "truncated" in line
               for line in text.splitlines()), text
    out = invoke(["run", "-w", str(run_dir)])
    assert stages_ran(out) == ["round-002 score", "round-002 train"]

    weights = run_dir / "round-002" / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(data))
    out = invoke(["run", "-w", str(run_dir)])
    assert "changed or corrupted" in out
    assert stages_ran(out) == ["round-002 train"]
    assert_same_run(reference, run_dir)


@pytest.mark.slow
def test_settings_change_is_refused_unless_allowed(base, tiny, reference):
    run_dir = base / "changed"
    shutil.copytree(reference, run_dir, symlinks=True)
    write_config(run_dir, tiny, train={"weights": {"rm": 1.0, "length": 0.0}})
    before = snapshot(run_dir)
    out = invoke(["run", "-w", str(run_dir)], expect=rounds.EXIT_CONFIG_CHANGED)
    assert "round-000 train: train.weights" in out and "round-002 train" in out
    assert "round-001 generate" in out  # a finished stage downstream of the change
    assert "--allow-config-change" in out
    assert snapshot(run_dir) == {**before, ".lock": snapshot(run_dir)[".lock"]}

    # A flag changes settings too; the same flag in every invocation is no change.
    out = invoke(["run", "-w", str(run_dir), "--train-beta", "0.2"], expect=rounds.EXIT_CONFIG_CHANGED)
    assert "train.beta: 0.1 -> 0.2" in out
    write_config(run_dir, tiny, train={"beta": 0.2})
    assert "nothing to do" in invoke(["run", "-w", str(run_dir), "--train-beta", "0.1"])

    # A setting added later is left out of the record at the value that behaves as before it existed, so runs
    # recorded before it still match; the other value is a change like any other.
    assert "train.lr_schedule" not in manifest(reference)["rounds"]["0"]["train"]["settings"]
    out = invoke(["run", "-w", str(run_dir), "--train-lr-schedule", "constant"], expect=rounds.EXIT_CONFIG_CHANGED)
    assert "train.lr_schedule: (not recorded) -> constant" in out

    write_config(run_dir, tiny, train={"weights": {"rm": 1.0, "length": 0.0}})
    out = invoke(["run", "-w", str(run_dir), "--allow-config-change", "--max-stages", "1"])
    assert stages_ran(out) == ["round-000 train"]
    report = json.loads(invoke(["status", "-w", str(run_dir), "--json"]))
    status = {(r["round"], r["stage"]): r["status"] for r in report["table"]}
    assert status[(0, "train")] == "done" and status[(1, "generate")] == "redo"
    assert report["next"] == "round-001 generate"
    assert list(report["reward_mean_by_round"]) == ["0"]  # rounds 1 and 2 are sampled and scored again
    assert manifest(run_dir)["rounds"]["0"]["train"]["settings"]["train.weights"] == {"rm": 1.0, "length": 0.0}

    # The acceptance is remembered: cron's next invocation, without the flag, redoes the rest instead of exiting
    # 78 at every tick until someone runs the flag by hand to the end.
    assert not report["config_changed"]
    out = invoke(["run", "-w", str(run_dir), "--max-stages", "1"])
    assert stages_ran(out) == ["round-001 generate"]
    # Only the settings accepted: another change is refused again.
    out = invoke(["run", "-w", str(run_dir), "--train-beta", "0.2"], expect=rounds.EXIT_CONFIG_CHANGED)
    assert "train.beta: 0.1 -> 0.2" in out


@pytest.mark.slow
def test_a_failing_stage_exits_1_is_recorded_and_retried(base, tiny, tmp_path):
    reward = tmp_path / "flaky.py"
    reward.write_text("def score(prompts, responses):\n    raise RuntimeError('reward server down')\n")
    run_dir = base / "failing"
    write_config(run_dir, tiny, **{"score.rewards": {"length": f"py:{reward}:score"}, "run": {"rounds": 1}})
    out = invoke(["run", "-w", str(run_dir)], expect=rounds.EXIT_FAILURE)
    assert "reward server down" in out
    failed = record(run_dir, 0, "score")
    assert failed["status"] == "failed" and "reward server down" in failed["error"]
    text = invoke(["status", "-w", str(run_dir)])
    assert any(line.startswith("round-000  score") and "failed" in line and "reward server down" in line
               for line in text.splitlines()), text

    reward.write_text("def score(prompts, responses):\n    return [len(r) for r in responses]\n")
    out = invoke(["run", "-w", str(run_dir)])  # a failed stage is retried; it never finished, so no refusal
    assert stages_ran(out) == ["round-000 score", "round-000 train"]
    assert record(run_dir, 0, "score")["attempt"] == 2 and "error" not in record(run_dir, 0, "score")


@pytest.mark.slow
def test_lora_rotating_prompts_and_replay(base, tiny):
    run_dir = base / "lora"
    write_config(run_dir, tiny, train={"lora_r": 4, "lr": 1e-3, "batch_size": 2},
                 run={"rounds": 2, "prompts_per_round": 3, "replay": -1})
    invoke(["run", "-w", str(run_dir)])
    for k, ids in ((0, ["p0", "p1", "p2"]), (1, ["p3", "p0", "p1"])):
        table = pq.read_table(run_dir / rounds.round_name(k) / "pairs.parquet")
        assert table.column("prompt_id").to_pylist() == ids
        assert os.readlink(run_dir / rounds.round_name(k) / "policy") == "train/merged"
        assert (run_dir / rounds.round_name(k) / "policy" / "model.safetensors").is_file()
    train_1 = manifest(run_dir)["rounds"]["1"]["train"]
    assert set(train_1["inputs"]) == {"round-001/scored.parquet", "round-000/scored.parquet", "round-000/policy"}
    assert train_1["summary"]["rows"] + train_1["summary"]["dropped_identical"] == 6  # both rounds' pairs
    meta = json.loads((run_dir / "round-001" / "train" / "final" / "modpo_pipe.json").read_text())
    assert meta["policy"]["path"] == str(run_dir / "round-000" / "policy")


@pytest.mark.slow
def test_a_killed_stage_resumes_under_other_batch_sizes_and_intervals(tiny, tmp_path):
    """The resume key once hashed every setting of the stage's section and [model]: a rerun with a smaller batch
    size (after an out-of-memory kill) or another save interval threw away finished parts or training state
    (and a shard worker given such a flag idled forever with exit 0). Results' settings and chunk sizes still
    start afresh."""
    config = write_config(tmp_path / "run", tiny)
    write_prompts(tmp_path / "prompts.jsonl", tiny)
    inputs = {"round-000/pairs.parquet": "x"}

    def key(stage: str, **overrides: dict[str, object]) -> str:
        return rounds.Run(tmp_path / "run", load_settings(config, overrides)).resume_key(0, stage, inputs)

    # model.device "auto" is "cpu" here: the same dtype, so the same key (a worker given --device agrees)
    free = {"generate": {"generate": {"batch_size": 1, "vllm_gpu_memory_utilization": 0.5},
                         "model": {"device": "auto"}},
            "score": {"score": {"batch_tokens": 512, "reward_batch_size": 2}},
            "train": {"train": {"save_every": 5, "log_every": 3, "report_to": "tensorboard", "merge": True}}}
    # what the work directory records: chunk sizes, the prompt limit, the dtype the device resolves "auto" to
    bound = {"generate": [{"generate": {"shard_size": 7}}, {"generate": {"vllm_max_model_len": 1024}},
                          {"model": {"dtype": "bfloat16"}}],
             "score": [{"score": {"shard_size": 7}}, {"model": {"dtype": "bfloat16"}}],
             "train": [{"train": {"lr": 1e-3}}, {"model": {"dtype": "bfloat16"}}, {"train": {"batch_size": 2}}]}
    for stage in rounds.STAGES:
        assert key(stage, **free[stage]) == key(stage), stage
        for overrides in bound[stage]:
            assert key(stage, **overrides) != key(stage), (stage, overrides)
    # a training state resumes under another split of the same global batch (train.run_fingerprint checks it)
    assert key("train", train={"batch_size": 2}) == key("train", train={"batch_size": 1, "grad_accum": 2})

    # A stage killed or waiting under the key of modpo-pipe before this change keeps its work after the upgrade.
    run = rounds.Run(tmp_path / "run", load_settings(config))
    legacy = run.legacy_resume_key(0, "score", inputs)
    assert legacy != run.resume_key(0, "score", inputs)
    assert run.attempt_key(0, "score", inputs, legacy) == legacy
    assert run.attempt_key(0, "score", inputs, "another run's key") == run.resume_key(0, "score", inputs)
    assert run.attempt_key(0, "score", inputs, None) == run.resume_key(0, "score", inputs)


def test_the_legacy_resume_key_is_the_one_runs_before_the_upgrade_recorded(tmp_path, monkeypatch):
    """legacy_resume_key must reproduce, bit for bit, the key modpo-pipe 08cb2d3 (the last release with the old
    key) wrote into manifests and shard directory names; otherwise an upgraded run silently drops the work of a
    killed stage. The hashes below were computed by 08cb2d3's Run.resume_key on these very settings. It hashes
    every field of the stage's section and [model], so a new setting or a changed default breaks it: keep the
    old fields and defaults out of the blob then, rather than updating the hashes."""

    monkeypatch.chdir(tmp_path)  # relative paths: the settings, and so the hashes, do not name tmp_path
    Path("prompts.jsonl").write_text('{"id": "p0", "prompt": "Hello"}\n{"id": "p1", "prompt": "Bye"}\n')
    settings = two_reward_run_settings()
    run = rounds.Run(Path("run"), settings)
    inputs = {"round-000/pairs.parquet": "x"}
    assert {stage: run.legacy_resume_key(0, stage, inputs) for stage in rounds.STAGES} == {
        "generate": "6a14b416c0cb993e56e988f5a1676171",
        "score": "4c04719fe9eaf8fbd55594ce9588cbd4",
        "train": "5c886889b24900de9bbb1c6590f32d13",
    }


def test_round_semantics_and_refusals(base, tiny, tmp_path):

    config = write_config(tmp_path / "run", tiny, run={"rounds": 4, "prompts_per_round": 3, "replay": 2,
                                                       "prompts": str(tiny.prompts)})
    settings = load_settings(config)
    run = rounds.Run(tmp_path / "run", settings)
    assert [r.id for r in run.prompt_slice(0)] == ["p0", "p1", "p2"]
    assert [r.id for r in run.prompt_slice(1)] == ["p3", "p4", "p5"]
    assert [r.id for r in run.prompt_slice(2)] == ["p0", "p1", "p2"]
    assert run.replay_rounds(0) == [] and run.replay_rounds(1) == [0] and run.replay_rounds(3) == [1, 2]
    assert run.sampling_policy(0) == str(tiny.policy)
    assert run.sampling_policy(2) == str(run.dir / "round-001" / "policy")
    assert run.reference(2) == str(tiny.policy)  # fixed

    previous = load_settings(config, {"run": {"reference": "previous", "replay": 0}})
    run = rounds.Run(tmp_path / "run", previous)
    assert run.reference(0) == str(tiny.policy) and run.reference(2) == str(run.dir / "round-001" / "policy")
    assert run.stage_settings(0, "score")["run.reference"] == rounds.Run(tmp_path / "run", settings).stage_settings(
        0, "score")["run.reference"]  # round 0 is scored against the initial policy either way

    with pytest.raises(ModpoError, match="replay needs"):
        rounds.Run(tmp_path / "run", load_settings(config, {"run": {"reference": "previous"}}))
    with pytest.raises(ModpoError, match="reference must be one of"):
        rounds.Run(tmp_path / "run", load_settings(config, {"run": {"reference": "latest"}}))
    out = invoke(["run", "-w", str(tmp_path / "elsewhere")], expect=rounds.EXIT_FAILURE)
    assert "modpo-pipe init" in out


def test_lock_is_exclusive_and_released_with_its_holder(tmp_path):
    with runstate.run_lock(tmp_path):
        assert runstate.lock_is_held(tmp_path)
        with pytest.raises(runstate.LockHeld, match=f"pid {os.getpid()}"), runstate.run_lock(tmp_path):
            pass
    assert not runstate.lock_is_held(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               f"fd = os.open({str(tmp_path / runstate.LOCK_NAME)!r}, os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert runstate.lock_is_held(tmp_path)
    holder.kill()
    holder.wait()
    with runstate.run_lock(tmp_path):  # the dead holder's lock is gone with it
        pass


@pytest.mark.slow
def test_round_zero_is_shared_between_runs_that_differ_only_in_train(base, tiny, reference):
    """Two weight vectors sample and score round 0 identically: a run given the reference run's round 0
    (rounds.share_stages) trains at once on the same rows, and its survey verifies the copies. Different
    sampling settings, a source that has not scored, a corrupt source file and train itself are refused."""
    weights = {"train": {"weights": {"rm": 0.3, "length": 0.7}}}
    run_dir = base / "share-other-weights"
    settings = load_settings(write_config(run_dir, tiny, **weights))
    assert rounds.share_stages(reference, run_dir, settings, 0, log=lambda m: None) == [
        "round-000 generate", "round-000 score"]
    assert (run_dir / "round-000" / "scored.parquet").read_bytes() == (
        reference / "round-000" / "scored.parquet").read_bytes()
    assert record(run_dir, 0, "score")["shared_from"] == str(reference.resolve())
    assert rounds.share_stages(reference, run_dir, settings, 0, log=lambda m: None) == []  # already there
    out = invoke(["run", "-w", str(run_dir), "--until", "round"])
    assert stages_ran(out) == ["round-000 train"]

    hotter = base / "share-hotter"
    hot = load_settings(write_config(hotter, tiny, generate={"temperature": 0.7}))
    with pytest.raises(ModpoError, match=r"round-000 generate ran with other settings .*generate.temperature"):
        rounds.share_stages(reference, hotter, hot, 0)
    assert not (hotter / "state.json").exists()
    fresh = base / "share-fresh"
    write_config(fresh, tiny)
    with pytest.raises(ModpoError, match="round-000 generate is not done; nothing to share"):
        rounds.share_stages(fresh, base / "share-nowhere", settings, 0)
    with pytest.raises(ModpoError, match="only generate and score can be shared"):
        rounds.share_stages(reference, run_dir, settings, 0, stages=("train",))
    broken = base / "share-broken"
    shutil.copytree(reference, broken, symlinks=True)
    with open(broken / "round-000" / "pairs.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(ModpoError, match="nothing shared"):
        rounds.share_stages(broken, base / "share-third", settings, 0)


def test_a_rounds_loss_headline_compares_first_and_last_step_in_one_epoch(tmp_path):
    # One epoch used to be shown as its mean twice ("loss 1.879 -> 1.879"), as if training had not moved it.
    metrics = tmp_path / "metrics.jsonl"
    steps = [(1, 1.9, 0.0), (2, 1.5, 2.0), (3, 1.2, 4.0)]
    lines = [{"step": s, "epoch": 0, "loss": loss, "kl_k2": kl} for s, loss, kl in steps]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = rounds.metrics_summary(metrics)
    assert (summary["loss_start"], summary["loss"], summary["kl_k2"]) == (1.9, 1.2, 2.0)
    assert rounds.headline("train", {"rows": 6, "steps": 3, **summary}) == (
        "6 pairs, 3 steps, loss 1.9 -> 1.2 (first -> last step), kl_k2 2")

    # Over several epochs each epoch sees the same pairs, so epoch means are compared.
    lines += [{"step": s, "epoch": 1, "loss": loss} for s, loss in [(4, 1.0), (5, 0.8)]]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = rounds.metrics_summary(metrics)
    assert summary["loss_start"] == pytest.approx(1.5333333) and summary["loss"] == pytest.approx(0.9)
    assert "(first -> last epoch)" in rounds.headline("train", {"rows": 6, "steps": 5, **summary})


@pytest.mark.parametrize("text,problem", [
    ("{not json", "Expecting property name"),
    ("[]", "no 'rounds' object"),
    ('{"version": 1}', "no 'rounds' object"),
    ('{"version": 1, "rounds": {"0": {"generate": {"status": "done"}}}}',
     "round 0 generate: done, without settings, inputs, outputs"),
    ('{"version": 1, "rounds": {"0": {"generate": {"status": "finished"}}}}', "round 0 generate: no status"),
])
def test_a_damaged_manifest_is_one_line_for_run_and_status(base, tiny, text, problem):
    """Valid JSON of the wrong shape used to end in AttributeError / KeyError tracebacks in both commands."""
    run_dir = base / "damaged-manifest"
    write_config(run_dir, tiny)
    (run_dir / "state.json").write_text(text)
    for command in ("run", "status"):
        out = invoke([command, "-w", str(run_dir)], expect=rounds.EXIT_FAILURE)
        assert "unreadable manifest (" in out and problem in out and "Traceback" not in out


def test_a_hub_model_is_the_same_before_and_after_its_download(tiny, tmp_path, monkeypatch):
    """A Hub id was fingerprinted as `id:NAME` while uncached and by its content once the stage had downloaded it:
    the next `run` saw a changed initial policy and exited 78. It is fetched before it is fingerprinted."""
    import shutil

    from modpo_pipe import models

    cache: dict[str, Path] = {}
    monkeypatch.setattr(models, "_cached_snapshot", lambda repo_id: cache.get(repo_id))

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):  # the Hub, from a local copy
        cache[repo_id] = Path(shutil.copytree(tiny.policy, tmp_path / "hub" / repo_id))
        return str(cache[repo_id])

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    # status writes nothing: it fingerprints what it finds (and starts no download)
    assert runstate.model_identity("tiny-org/tiny-policy", fetch=False) == "id:tiny-org/tiny-policy"
    assert not cache
    before = runstate.model_identity("tiny-org/tiny-policy")  # not cached yet
    assert before == runstate.model_identity("tiny-org/tiny-policy") == models.fingerprint(str(tiny.policy))
    assert runstate.model_identity(str(tmp_path / "missing")) == "id:" + str(tmp_path / "missing")

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(ModpoError, match="other-org/model: not a local directory, not in the Hugging Face cache"):
        runstate.model_identity("other-org/model")
