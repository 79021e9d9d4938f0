"""Every variant by name, the sections that group them, and how one runs: in a child process of its own
(`--child NAME`), its result read back as one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.run.generate import child_generate_baseline, child_generate_ours, child_generate_vllm
from benchmarks.run.score import child_score_baseline, child_score_ours
from benchmarks.run.train import child_train_baseline, child_train_ours
from benchmarks.run.workload import size_of

RESULT_MARK = "BENCHMARK_RESULT "  # a child prints its result on one line after this mark


VARIANTS = {
    "train-ours-full": lambda s, z: child_train_ours(s, z, lora=False, flops=True),
    "train-base-full": lambda s, z: child_train_baseline(s, z, lora=False),
    "train-ours-lora": lambda s, z: child_train_ours(s, z, lora=True),
    "train-base-lora": lambda s, z: child_train_baseline(s, z, lora=True),
    "train-ours-full-padded": lambda s, z: child_train_ours(s, z, lora=False, pack=False),
    "train-ours-lora-ckpt": lambda s, z: child_train_ours(s, z, lora=True, checkpointing=True),
    "score-ours": lambda s, z: child_score_ours(s, z),
    "score-base": lambda s, z: child_score_baseline(s, z),
    "score-ours-padded": lambda s, z: child_score_ours(s, z, pack=False),
    "gen-ours": lambda s, z: child_generate_ours(s, z),
    "gen-base": lambda s, z: child_generate_baseline(s, z),
    "gen-vllm": lambda s, z: child_generate_vllm(s, z),
}
SECTIONS = {
    "train": ["train-ours-full", "train-base-full", "train-ours-lora", "train-base-lora"],
    "score": ["score-ours", "score-base"],
    "generate": ["gen-ours", "gen-base", "gen-vllm"],
}
# What the changes measured here are worth: our code with the new packing off, and a memory option.
EXTRAS = {"train": ["train-ours-full-padded", "train-ours-lora-ckpt"], "score": ["score-ours-padded"]}


def run_child(name: str, spec_path: Path) -> dict[str, Any]:
    """One variant on the workload that `spec_path` (workload.json) describes, in this process."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    spec = json.loads(spec_path.read_text())
    size = size_of(spec)
    cpu = time.process_time()
    result = VARIANTS[name](spec, size)
    result["cpu_s"] = time.process_time() - cpu  # all threads: compare with wall time to see contention
    return result


def spawn(name: str, spec_path: Path, isolate: bool, threads: int | None = None) -> dict[str, Any]:
    """One variant in a child process of its own (`python -m benchmarks.run --child NAME`), so that its peak
    memory is its own; with isolate=False in this process (tests only). Its result, or {"error": ...}."""
    started = time.perf_counter()
    if not isolate:
        try:
            result = run_child(name, spec_path)
        except Exception as e:  # noqa: BLE001 - one variant's failure is reported, the others still run
            result = {"error": f"{type(e).__name__}: {e}"}
    else:
        repo = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--child", name, "--spec", str(spec_path)],
                              cwd=repo, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1][len(RESULT_MARK):])
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            result = {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result["wall_s"] = time.perf_counter() - started
    return result
