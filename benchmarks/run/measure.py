"""Measuring helpers: wall and CPU clocks, peak resident memory, the machine's matmul ceiling, and the line
that says which machine ran it."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the last reset (Linux), else the process's ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process_peak_rss_bytes()


def process_peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def clock() -> tuple[float, float]:
    """(wall, CPU) time now; the CPU time is this process's, all threads."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def matmul_flops(seconds: float = 2.0, n: int = 2048) -> tuple[float, float]:
    """The machine's fp32 arithmetic ceiling from n x n matmuls over about `seconds`: the best FLOP per wall
    second, and the best FLOP per CPU second (all threads; the figure a busy shared machine distorts least)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best_wall = best_cpu = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        torch.mm(a, b)
        wall, cpu = since(start)
        best_wall, best_cpu = max(best_wall, 2 * n**3 / wall), max(best_cpu, 2 * n**3 / max(cpu, 1e-9))
    return best_wall, best_cpu


def machine_description(threads: int | None = None) -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads or torch.get_num_threads()} threads)"
            f"{gpu}, Python {platform.python_version()}")
