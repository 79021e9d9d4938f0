"""The GPU check's dry run: benchmarks/gpu_check.py on tiny shapes on the CPU, every section, every check passed
(its numbers mean nothing here; on a GPU the same script writes benchmarks/RESULTS-gpu.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "RESULTS-gpu.md"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = out.read_text()
    assert "CPU dry run" in table and "FAILED" not in table and "| NO |" not in table
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()
            if line.startswith("| ") and "---" not in line]
    assert {"update", "optimum", "train", "score", "sample"} <= set(rows)
    assert table.count("| yes |") == 4  # cosine, norm ratio, first-batch gap, optimum
