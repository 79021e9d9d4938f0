"""Scaling out: data-parallel training on several processes, sharded generate and score, and merging.

Two CPU processes (gloo), started by accelerate's own launcher, must train to the weights one process reaches
with the same global batch (within float tolerance); N=3 shards of generate and score, merged, must hold the
rows of the unsharded run, in its order; a bad set of shards is refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import config, fails, generate_and_score, ok, settings_toml, tiny_generate
from typer.testing import CliRunner

from modpo_pipe import rounds, schema, shards
from modpo_pipe.cli import app
from modpo_pipe.config import ModelSettings, ScoreSettings, TrainSettings, load_settings

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
# Float tolerance of the two-process run: batch composition (padding) and the all-reduce change float
# rounding; Adam turns that into weight differences around 1e-5 here, against updates of about 2e-3.
WEIGHT_TOLERANCE = 1e-4



@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory) -> Path:
    """A modpo.toml on the CPU; an unsharded pairs.parquet (6 chunks of 1 prompt, a group of 6 responses each) and
    scored.parquet (6 chunks of 1 group) to compare the sharded runs with."""
    work = tmp_path_factory.mktemp("scale")
    (work / "modpo.toml").write_text(settings_toml(
        model=ModelSettings(device="cpu", dtype="float32"),
        generate=tiny_generate(tiny, max_new_tokens=8, samples_per_prompt=6, chunk_size=1),
        score=ScoreSettings(chunk_size=1, rewards={"rm": str(tiny.reward), "length": tiny.reward_fn}),
        train=TrainSettings(lr=0.0005, epochs=2, save_every=2)))
    return generate_and_score(work, tiny.prompts)


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def steps_logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ data-parallel training


def test_micro_batches_split_every_step_across_processes_and_pad_the_short_ones():
    from modpo_pipe.train import micro_batch_groups

    step = list(range(100, 109))  # 9 pairs, 2 processes, micro-batches of 2
    rank_0, rank_1 = micro_batch_groups(step, 2, 0, 2), micro_batch_groups(step, 2, 1, 2)
    assert rank_0 == [[100, 102], [104, 106], [108]]
    assert rank_1 == [[101, 103], [105, 107], []]  # as many backward passes as rank 0
    assert sorted(i for mb in rank_0 + rank_1 for i in mb) == step
    assert micro_batch_groups([7], 4, 1, 2) == [[]]  # a last step of one pair: the second process only pads
    assert micro_batch_groups(step, 4) == [step[:4], step[4:8], step[8:]]  # one process: as before


def test_one_process_steps_are_the_global_batch_of_many():
    from modpo_pipe.config import TrainSettings
    from modpo_pipe.train import optimizer_step_groups

    one = optimizer_step_groups(17, TrainSettings(batch_size=4, grad_accum=2, epochs=2))
    two = optimizer_step_groups(17, TrainSettings(batch_size=2, grad_accum=2, epochs=2), processes=2)
    assert one == two and [len(pairs) for _, pairs in one] == [8, 9, 8, 9]  # the remainder folded in


PER_RESPONSE = ("responses", "response_ids", "finish_reasons", "gen_logps", "reward_rm", "reward_length",
                "ref_logps")


@pytest.fixture(scope="module")
def odd_scored(env) -> Path:
    """17 groups of mixed sizes (16 of 2 responses, one of 4), cut from the 6 groups of 6: with a global batch
    of 8, every epoch ends with a step of 9 groups (the remainder folded in), whose odd group one of two
    processes takes alone while the other runs a zero-weight pass."""
    table, meta = schema.read_table(env / "scored.parquet", "scored")
    rows = []
    for k, row in enumerate(table.to_pylist()):
        for piece, (a, b) in enumerate([(0, 2), (2, 6)] if k == 5 else [(0, 2), (2, 4), (4, 6)]):
            rows.append({**row, "group_id": f"{row['group_id']}/{piece}",
                         **{c: row[c][a:b] for c in PER_RESPONSE}})
    path = env / "scored-17.parquet"
    schema.write_table(pa.Table.from_pylist(rows, schema=table.schema), path, meta)
    return path


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(env, odd_scored, tiny, tmp_path):
    """`--num-processes 2` runs this command under `accelerate launch` (torchrun, gloo on the CPU): 2 processes
    x 2 micro-batches x 2 groups per step against 1 process x 2 x 4. Same steps, losses, final weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(["train", odd_scored, *config(env), "--batch-size", 4, "--grad-accum", 2, "--out", one])
    result = subprocess.run(
        [sys.executable, "-m", "modpo_pipe", "train", str(odd_scored), *map(str, config(env)), "--batch-size", "2",
         "--grad-accum", "2", "--num-processes", "2", "--out", str(two)],
        cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes: 2" in result.stderr and result.stderr.count("wrote ") == 1  # the main process reports

    a, b = steps_logged(one), steps_logged(two)
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # one metrics line a step: only the main process writes
    assert [m["groups"] for m in b] == [m["groups"] for m in a] == [8, 9, 8, 9]
    assert [m["pairs"] for m in b] == [m["pairs"] for m in a]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        assert y["sign_agreement"] == x["sign_agreement"]
    wa, wb = weights(one / "final"), weights(two / "final")
    gap = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    moved = max((wa[k] - v).abs().max().item() for k, v in weights(tiny.policy).items())
    print(f"\ntwo processes vs one, same global batch: max |weight gap| {gap:.3g} (largest update {moved:.3g})")
    assert gap < WEIGHT_TOLERANCE
    assert json.loads((two / "state" / "state.json").read_text())["step"] == 4
    assert not list(two.glob("*.tmp")) and not list(two.glob("*.old"))


@pytest.mark.slow
def test_a_state_resumes_under_another_process_count_with_the_same_global_batch(env, odd_scored, tmp_path,
                                                                              monkeypatch):
    """A one-process run killed in step 3 resumes on two processes at step 2: global batch 8 both times."""
    import modpo_pipe.train as train_module

    full, part = tmp_path / "full", tmp_path / "part"
    common = ["train", odd_scored, *config(env)]
    ok([*common, "--batch-size", 8, "--out", full])
    real, calls = train_module.pair_loss, {"n": 0}

    def dies_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # micro-batches of 8: one in step 1, two in step 2 (9 groups), then step 3
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "pair_loss", dies_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        runner.invoke(app, [str(a) for a in [*common, "--batch-size", 8, "--out", part]], catch_exceptions=False)
    monkeypatch.undo()
    assert json.loads((part / "state" / "state.json").read_text())["step"] == 2
    # Another global batch is another run: refused, nothing touched.
    fails([*common, "--batch-size", 2, "--out", part], "holds a training state for other data or settings")

    result = subprocess.run(
        [sys.executable, "-m", "modpo_pipe", "train", str(odd_scored), *map(str, config(env)), "--batch-size", "4",
         "--num-processes", "2", "--out", str(part)],
        cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from step: 2" in result.stderr
    assert [m["step"] for m in steps_logged(part)] == [1, 2, 3, 4]
    wa, wb = weights(full / "final"), weights(part / "final")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_TOLERANCE


def _processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line holds `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_to_a_multi_process_train_stops_every_process(env, odd_scored, tmp_path, signum):
    """SIGTERM (or Ctrl-C's SIGINT) to `train --num-processes 2` used to end that process alone: the launcher and
    its workers ran on to the end, orphaned, and wrote OUT/final."""
    import os
    import signal
    import time

    out = tmp_path / f"killed-{signum}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modpo_pipe", "train", str(odd_scored), *map(str, config(env)), "--batch-size", "1",
         "--epochs", "200", "--save-every", "0", "--num-processes", "2", "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file():  # the workers train
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(getattr(signal, signum))
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert code == 128 + getattr(signal, signum), (code, stderr)
    assert "Traceback" not in stderr, stderr
    deadline = time.time() + 60
    while _processes_naming(str(out)) and time.time() < deadline:
        time.sleep(0.5)
    left = _processes_naming(str(out))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after {signum}: {left}"
    assert not (out / "final").exists()


@pytest.mark.slow
def test_a_bad_input_to_a_multi_process_train_is_one_error_line(env, tmp_path):
    """Every process met the same bad input, and each printed it: N error lines."""
    result = subprocess.run(
        [sys.executable, "-m", "modpo_pipe", "train", str(env / "pairs.parquet"), *map(str, config(env)),
         "--num-processes", "2", "--out", str(tmp_path / "x")],
        cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 1
    assert result.stderr.count("error: ") == 1, result.stderr
    assert "is a 'pairs' file, expected a 'scored' file" in result.stderr
    # ... and the launcher added torch elastic's ChildFailedError: 30 lines of traceback after the error line
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr
    assert "exitcode" not in result.stderr, result.stderr


@pytest.mark.slow
def test_a_failure_of_another_process_than_the_first_is_its_error_line(env, odd_scored, tmp_path):
    """One process out of memory on its own device (its GPU fuller than the others'): only the first process
    printed error lines, so the launcher exited 1 with nothing said at all. A sitecustomize on the workers' path
    makes process 1's optimizer step raise the OutOfMemoryError that torch raises."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch\n"
        "    def step(self, *args, **kwargs):\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB.')\n"
        "    torch.optim.AdamW.step = step\n")
    result = subprocess.run(
        [sys.executable, "-m", "modpo_pipe", "train", str(odd_scored), *map(str, config(env)),
         "--num-processes", "2", "--out", str(tmp_path / "x")],
        cwd=tmp_path, capture_output=True, text=True, timeout=400,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: process 1 of 2: train: out of device memory (CUDA out of memory. Tried to "
                                "allocate 2.00 GiB.); lower [train].micro_batch_tokens"), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "x" / "final").exists()


def test_the_launcher_says_each_line_the_first_process_did_not(tmp_path):
    from modpo_pipe.launcher import unsaid_errors

    for rank, line in [(0, "bad input"), (1, "bad input"), (2, "out of memory"), (3, "out of memory"), (5, "disk")]:
        (tmp_path / f"rank-{rank}.txt").write_text(line)
    assert unsaid_errors(tmp_path, 6) == ["processes 2, 3 of 6: out of memory", "process 5 of 6: disk"]
    (tmp_path / "rank-0.txt").unlink()  # the first process met nothing (it was stopped)
    assert unsaid_errors(tmp_path, 6)[0] == "process 1 of 6: bad input"


@pytest.mark.slow
def test_num_processes_is_refused_under_a_launcher(env, odd_scored, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    fails(["train", odd_scored, *config(env), "--num-processes", 2, "--out", tmp_path / "x"],
          "--num-processes starts `accelerate launch` itself")


# A process of a multi-process run: a gloo group (of one, to stay fast), a collective on tensors made in Python,
# then the command; an atexit hook stands for interpreter finalization.
PROCESS_OF_A_RUN = """
import atexit, pathlib, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
dist.broadcast_object_list(["the last collective"])
atexit.register(pathlib.Path(sys.argv[2]).write_text, "finalized")
sys.argv = ["modpo-pipe", *sys.argv[3:]]
from modpo_pipe.cli import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("group", [True, False], ids=["process-group", "one-process"])
@pytest.mark.parametrize("args, code", [(["--help"], 0), (["merge", "missing.parquet"], 1)], ids=["done", "error"])
def test_a_process_of_a_multi_process_run_ends_without_finalizing(tmp_path, group, args, code):
    """Gloo's worker threads free a collective's tensors after it returns, taking the GIL for those made in
    Python; one that asks while the interpreter finalizes aborts the process (SIGABRT after all the work, 4 of
    41 two-process trainings). With a process group, the command's exit code and output, and no finalization;
    without one, a normal exit."""
    script = PROCESS_OF_A_RUN if group else PROCESS_OF_A_RUN.replace("dist.", "# dist.")
    marker = tmp_path / "finalized"
    result = subprocess.run([sys.executable, "-c", script, f"file://{tmp_path / 'store'}", str(marker), *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert ("Usage" in result.stdout) if code == 0 else ("error:" in result.stderr), result.stdout + result.stderr
    assert marker.exists() is not group


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"])
def test_example_accelerate_configs_load(name):
    """The shipped configs parse as accelerate config files (FSDP and DeepSpeed need GPUs to run)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "examples" / "accelerate" / name))
    assert config.distributed_type.value in {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP",
                                              "deepspeed_zero2.yaml": "DEEPSPEED"}[name]
    assert config.num_processes >= 2


# ------------------------------------------------------------------------------------------ sharded stages


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def sharded(env) -> dict[str, Path]:
    """generate and score, each as 3 shards (0-based), merged."""
    out = env / "sharded"
    out.mkdir()
    for i in range(3):
        ok(["generate", env / "prompts.jsonl", *config(env), "--shard", f"{i}/3", "--out", out / "pairs.parquet"])
    ok(["merge", out / "pairs.shards"])  # default output: pairs.parquet beside the directory
    for i in range(3):
        ok(["score", out / "pairs.parquet", *config(env), "--shard", f"{i}/3", "--out", out / "scored.parquet"])
    ok(["merge", *sorted((out / "scored.shards").glob("*.parquet")), "--out", out / "scored.parquet"])
    return {"dir": out, "pairs": out / "pairs.parquet", "scored": out / "scored.parquet"}


@pytest.mark.slow
def test_three_shards_merge_to_the_unsharded_rows(env, sharded):
    """Each chunk samples with its own seed and is scored on its own: the merged files hold exactly the rows
    (ids, token ids, texts, rewards, reference log-probs) of the unsharded run, in its order."""
    pair_shards = sorted((sharded["dir"] / "pairs.shards").glob("*.parquet"))
    assert [p.name for p in pair_shards] == ["00000-of-00003.parquet", "00001-of-00003.parquet",
                                             "00002-of-00003.parquet"]
    # Shard i holds chunks i and i+3 of the 6: disjoint, deterministic slices.
    held = [schema.read_metadata(p)["shard"]["chunks"] for p in pair_shards]
    assert held == [[0, 3], [1, 4], [2, 5]]
    assert sorted(r["group_id"] for p in pair_shards for r in rows(p)) == sorted(
        r["group_id"] for r in rows(env / "pairs.parquet"))
    assert rows(sharded["pairs"]) == rows(env / "pairs.parquet")
    assert rows(sharded["scored"]) == rows(env / "scored.parquet")
    unsharded, merged = schema.read_metadata(env / "scored.parquet"), schema.read_metadata(sharded["scored"])
    assert merged["rewards"] == unsharded["rewards"]  # statistics over all rows, as train's z-score needs
    assert merged["score_counts"]["groups_in"] == merged["score_counts"]["groups_out"] == 6
    assert "shard" not in merged and merged["merged_shards"] == 3
    # the workers' time, summed: the merge's own clock is all a merged stage's record had
    worker_seconds = [schema.read_metadata(p)["shard"]["seconds"] for p in pair_shards]
    assert all(s > 0 for s in worker_seconds)
    assert schema.read_metadata(sharded["pairs"])["shard_seconds"] == pytest.approx(sum(worker_seconds), abs=1e-3)


@pytest.mark.slow
def test_a_finished_shard_is_not_redone(env, sharded):
    path = sharded["dir"] / "pairs.shards" / "00001-of-00003.parquet"
    before = path.stat().st_mtime_ns
    output = ok(["generate", env / "prompts.jsonl", *config(env), "--shard", "1/3", "--out",
                 sharded["dir"] / "pairs.parquet"])
    assert "wrote shard 1/3" in output and path.stat().st_mtime_ns == before


@pytest.mark.slow
def test_more_shards_than_chunks_leave_empty_shards_that_merge(env, tmp_path):
    out = tmp_path / "pairs.parquet"
    for i in range(4):  # 3 chunks of 2 prompts: shard 3 has none
        ok(["generate", env / "prompts.jsonl", *config(env), "--shard-size", 2, "--shard", f"{i}/4", "--out", out])
    assert pq.read_metadata(shards.shard_path(out, (3, 4))).num_rows == 0
    ok(["merge", shards.shard_dir(out)])
    assert len({r["group_id"] for r in rows(out)}) == 6


@pytest.mark.slow
def test_shard_files_are_not_stage_inputs(env, sharded):
    shard = sharded["dir"] / "pairs.shards" / "00000-of-00003.parquet"
    fails(["score", shard, *config(env), "--out", sharded["dir"] / "x.parquet"],
          "is one shard of a pairs file: join the shards first (modpo-pipe merge")
    scored_shard = sharded["dir"] / "scored.shards" / "00000-of-00003.parquet"
    fails(["train", scored_shard, *config(env), "--out", sharded["dir"] / "ckpt"],
          "is one shard of a scored file: join the shards first")


@pytest.mark.parametrize("text", ["3/3", "-1/3", "1", "a/b", "0/0"])
def test_bad_shard_specs_are_refused(faults_env, text, tmp_path):
    """A prompts file and settings are all it needs: the fault suites' shared ones serve."""
    fails(["generate", faults_env / "prompts.jsonl", *config(faults_env), "--shard", text, "--out",
           tmp_path / "p.parquet"], "--shard must be I/N with 0 <= I < N")


def _copy(files: list[Path], where: Path) -> Path:
    where.mkdir(parents=True)
    for f in files:
        shutil.copy(f, where / f.name)
    return where


@pytest.mark.slow
def test_merge_refuses_missing_duplicate_and_mismatched_shards(env, sharded, tmp_path):
    pair_shards = sorted((sharded["dir"] / "pairs.shards").glob("*.parquet"))
    out = tmp_path / "merged.parquet"
    # missing
    fails(["merge", _copy([pair_shards[0], pair_shards[2]], tmp_path / "missing"), "--out", out],
          "missing 1 of 3 shards: 1/3")
    # duplicate: the same shard twice
    twice = _copy(pair_shards, tmp_path / "twice")
    shutil.copy(pair_shards[1], twice / "copy-of-1.parquet")
    fails(["merge", twice, "--out", out], "shard 1/3 given twice")
    # mismatched: a shard of another run (another seed), of another N, of another stage, not a shard at all
    other = tmp_path / "other" / "pairs.parquet"
    ok(["generate", env / "prompts.jsonl", *config(env), "--seed", 7, "--shard", "1/3", "--out", other])
    fails(["merge", pair_shards[0], shards.shard_path(other, (1, 3)), pair_shards[2], "--out", out],
          "are shards of different runs (they differ in: seed)")
    ok(["generate", env / "prompts.jsonl", *config(env), "--shard", "1/2", "--out", other])
    fails(["merge", pair_shards[0], shards.shard_path(other, (1, 2)), pair_shards[2], "--out", out],
          "is shard 1/2 but")
    fails(["merge", pair_shards[0], sharded["dir"] / "scored.shards" / "00001-of-00003.parquet", pair_shards[2],
           "--out", out], "is a 'scored' shard but")
    fails(["merge", pair_shards[0], env / "pairs.parquet", "--out", out], "not a shard file (written without --shard)")
    fails(["merge", *pair_shards], "give --out")
    assert not out.exists()


# -------------------------------------------------------------------------------------- rounds with shards


def _run_config(run_dir: Path, tiny, prompts: Path, **run: object) -> None:
    from modpo_pipe.config import _toml_value

    sections = {
        "model": {"device": "cpu", "dtype": "float32"},
        "generate": {"policy": str(tiny.policy), "backend": "transformers", "max_new_tokens": 8,
                     "samples_per_prompt": 2, "seed": 3, "shard_size": 1},
        "score": {"shard_size": 1},
        "score.rewards": {"rm": str(tiny.reward), "length": tiny.reward_fn},
        "train": {"lr": 5e-4, "epochs": 1, "batch_size": 2, "save_every": 1},
        "run": {"rounds": 2, "prompts": str(prompts), **run},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "modpo.toml").write_text("".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()) for name, values in
        sections.items()))


@pytest.mark.slow
def test_rounds_with_shard_workers_equal_rounds_without(tiny, tmp_path):
    """[run].shards = 2: the plain `run` opens generate and score and waits; two `run --shard I/2` workers
    compute the shards; the next `run` merges them and goes on. Every round's files equal an unsharded run's."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(tiny.prompts.read_text().splitlines(keepends=True)[:4]))
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    _run_config(plain, tiny, prompts)
    _run_config(sharded, tiny, prompts, shards=2)
    ok(["run", "--workdir", plain])

    waited = 0
    for _ in range(8):  # each pass: the coordinator, then both workers
        output = ok(["run", "--workdir", sharded])
        if "all 2 rounds done" in output:
            break
        assert "waiting for shard workers: 0 of 2 shards written (missing 0/2, 1/2)" in output, output
        waited += 1
        status = ok(["status", "--workdir", sharded])
        assert "waiting" in status
        assert "shard" in ok(["run", "--workdir", sharded, "--shard", "0/2"])
        # status counts the shards on disk now (it showed the count recorded when the stage was opened)
        assert "1 of 2 shards written (missing 1/2)" in ok(["status", "--workdir", sharded])
        assert "shard" in ok(["run", "--workdir", sharded, "--shard", "1/2"])
        assert "every shard is written: the next `run` merges them" in ok(["status", "--workdir", sharded])
    assert waited == 4  # generate and score of both rounds
    # A merged stage's wall time is the coordinator's merge alone (about 0.1 s): its workers' time is the headline's.
    merged = [line for line in ok(["status", "--workdir", sharded]).splitlines() if "merged from 2 shards, " in line]
    assert len(merged) == 4 and all(float(line.split(", ")[-1].split("s of work")[0]) > 0 for line in merged), merged
    assert "nothing to do now; every round is done" in ok(["run", "--workdir", sharded, "--shard", "0/2"])
    fails(["run", "--workdir", sharded, "--shard", "0/3"], "the run is split into [run].shards = 2")
    for k in range(2):
        for name in ("pairs.parquet", "scored.parquet"):
            assert rows(sharded / f"round-00{k}" / name) == rows(plain / f"round-00{k}" / name)
        assert not list((sharded / f"round-00{k}").glob("*.shards"))  # merged, then removed
        wa, wb = weights(plain / f"round-00{k}" / "policy"), weights(sharded / f"round-00{k}" / "policy")
        assert all((wa[n] == wb[n]).all() for n in wa)

    # A change accepted by the coordinator: round 0's train is redone and round 1's generate opened; the
    # workers used to refuse (exit 78) over round 1's later stages, which are redone anyway: a deadlock.
    ok(["run", "--workdir", sharded, "--train-lr", "1e-3", "--allow-config-change"])
    assert "waiting for shard workers: 0 of 2" in ok(["status", "--workdir", sharded, "--train-lr", "1e-3"])
    # A worker given other settings than the coordinator's used to idle with exit 0, forever: now 78, saying why.
    fails(["run", "--workdir", sharded, "--shard", "0/2", "--train-lr", "1e-3",
           "--generate-vllm-max-model-len", "512"],
          "round-001 generate was opened with other settings than this worker's (chunk size, dtype or prompt "
          "limit)", code=78)
    # ... unless the worker reads the run's own modpo.toml alone: then the file changed after the opening, and the
    # coordinator's next firing reopens the stage (exit 0, nothing to do yet)
    other = load_settings(sharded / "modpo.toml", {"train": {"lr": 1e-3}, "generate": {"vllm_max_model_len": 512}})
    assert rounds.work_shard(sharded, other, (0, 2), own_settings=True) is None
    for i in range(2):
        assert "round-001 generate: shard" in ok(["run", "--workdir", sharded, "--shard", f"{i}/2",
                                                  "--train-lr", "1e-3"])
    assert "every shard is written" in ok(["status", "--workdir", sharded, "--train-lr", "1e-3"])

    # A damaged shard used to fail every coordinator run (exit 1) while the workers saw nothing to do: it is set
    # aside, the stage waits, its worker computes it again, and the run goes on.
    shard = next((sharded / "round-001").glob("pairs-*.shards")) / "00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    output = ok(["run", "--workdir", sharded, "--train-lr", "1e-3", "--allow-config-change"])
    assert "not a readable Parquet file" in output and "set aside as .00001-of-00002.parquet.damaged" in output
    assert "1 of 2 shards written (missing 1/2)" in ok(["status", "--workdir", sharded, "--train-lr", "1e-3"])
    assert "round-001 generate: shard 1/2" in ok(["run", "--workdir", sharded, "--shard", "1/2", "--train-lr", "1e-3"])
    assert "round-001 generate: done" in ok(["run", "--workdir", sharded, "--train-lr", "1e-3", "--max-stages", "1",
                                             "--allow-config-change"])


@pytest.mark.slow
def test_a_shard_the_machine_will_not_read_is_no_damaged_shard(env, sharded, monkeypatch):
    """Set aside as damaged, an unreadable shard (EACCES) would be recomputed, with the same permissions, on
    every firing; the machine's error goes on instead."""
    import errno

    files = sorted((sharded["dir"] / "pairs.shards").glob("*.parquet"))
    real_open = Path.open

    def forbidden(self, *args, **kwargs):
        if self == files[1]:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", forbidden)
    with pytest.raises(PermissionError):
        shards.merge(files, sharded["dir"] / "never.parquet")


@pytest.mark.slow
def test_a_failed_shard_worker_is_reported_by_status(tiny, tmp_path):
    """A worker that failed used to leave only a missing shard: status and the coordinator said "waiting" with no
    hint why, while the error sat in some batch system's log. Its note names the shard, host and error, and goes
    once the shard is written."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(tiny.prompts.read_text().splitlines(keepends=True)[:2]))
    down = tmp_path / "reward-server-down"
    reward = tmp_path / "flaky.py"
    reward.write_text("import pathlib\n"
                      "def score(prompts, responses):\n"
                      f"    if pathlib.Path({str(down)!r}).exists():\n"
                      "        raise RuntimeError('reward server down')\n"
                      "    return [float(len(r)) for r in responses]\n")
    run_dir = tmp_path / "sharded"
    _run_config(run_dir, tiny, prompts, shards=2, rounds=1)
    settings = (run_dir / "modpo.toml").read_text().replace(tiny.reward_fn, f"py:{reward}:score")
    (run_dir / "modpo.toml").write_text(settings)
    ok(["run", "--workdir", run_dir])  # opens generate
    for i in range(2):
        ok(["run", "--workdir", run_dir, "--shard", f"{i}/2"])
    assert "waiting for shard workers: 0 of 2" in ok(["run", "--workdir", run_dir])  # merged; score opened
    ok(["run", "--workdir", run_dir, "--shard", "0/2"])
    down.touch()
    fails(["run", "--workdir", run_dir, "--shard", "1/2"], "reward server down")
    text = ok(["status", "--workdir", run_dir])
    assert "missing 1/2; shard 1/2 failed on " in text and "RuntimeError: reward server down" in text, text
    assert "shard 1/2 failed" in ok(["run", "--workdir", run_dir])  # the coordinator's waiting line too
    down.unlink()
    ok(["run", "--workdir", run_dir, "--shard", "1/2"])
    text = ok(["status", "--workdir", run_dir])
    assert "every shard is written" in text and "shard 1/2 failed" not in text, text
    assert "round-000 train: done" in ok(["run", "--workdir", run_dir])
