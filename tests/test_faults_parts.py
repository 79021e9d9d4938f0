"""Faults of the chunked parts generate and score write (modpo_pipe/parts.py): how chunks are handed out, and
SIGKILLs at random points of both stages.

Each case goes through the commands as a user runs them (test_faults_*.py, one a stage; conftest.py says more).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import config, fork_cli, kill_when, no_leftovers, same_rows, wait_exit

from modpo_pipe import parts, schema


@pytest.fixture(scope="module")
def env(faults_env: Path) -> Path:
    """The fault suites' one shared directory (conftest.faults_env): modpo.toml, prompts, pairs and scored."""
    return faults_env


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


@pytest.mark.slow
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
