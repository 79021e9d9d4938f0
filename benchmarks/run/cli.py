"""`python -m benchmarks.run`: the options, and the parent that runs every variant and prints the table."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import benchmarks.run
from benchmarks.run.measure import machine_description
from benchmarks.run.report import Report, Row, fmt, format_table, summarise
from benchmarks.run.score import planned_shares
from benchmarks.run.variants import EXTRAS, RESULT_MARK, SECTIONS, run_child, spawn
from benchmarks.run.workload import SIZES, build_workload


def run_benchmark(size_name: str, sections: list[str], repeats: int = 1, workdir: Path | None = None,
                  isolate: bool = True, extras: bool = True, threads: int | None = None, log=print) -> Report:
    """Build (or reuse) the workload, run every variant of `sections` `repeats` times, alternating their order,
    and summarise them into a Report."""
    size = SIZES[size_name]
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="modpo-bench-")
        workdir = Path(tmp.name)
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        t = time.perf_counter()
        build_workload(size, workdir)
        spec_path = workdir / "workload.json"
        log(f"workload '{size_name}' ready in {time.perf_counter() - t:.0f}s under {workdir}")
        report = Report(size_name, machine_description(threads), repeats)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for k in range(repeats):
            for section in sections:
                names = SECTIONS[section] + (EXTRAS.get(section, []) if extras and size.extras else [])
                for name in (names if k % 2 == 0 else list(reversed(names))):  # alternate to cancel drift
                    result = spawn(name, spec_path, isolate, threads)
                    report.runs.setdefault(name, []).append(result)
                    brief = {key: result[key] for key in ("pairs_per_s", "tokens_per_s", "peak_rss", "error",
                                                          "skipped", "wall_s") if key in result}
                    log(f"[{k + 1}/{repeats}] {name}: {json.dumps(brief)}")
        summarise(report)
        if "score" in sections:
            ours, base = planned_shares(size)
            report.rows.append(Row("score", "real-token share, reference log-probs, 1024 pairs (batch plan only)",
                                   fmt(ours), fmt(base), None, ">= 0.9", ours >= 0.9))
        if load_before is not None:
            report.notes.append(f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
                                f"the end ({os.cpu_count()} cores): other jobs share the machine when it exceeds 0")
        if not isolate:
            report.notes.append("variants ran in one process (--no-isolate): peak RSS values are not comparable")
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=benchmarks.run.__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small model: a short check")
    parser.add_argument("--size", choices=sorted(SIZES), help="workload size (overrides --quick)")
    parser.add_argument("--only", default="train,score,generate", help="comma-separated sections")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every variant")
    parser.add_argument("--no-extras", action="store_true", help="skip the ablations (ours without packing, "
                        "gradient checkpointing; --quick skips them anyway)")
    parser.add_argument("--threads", type=int, help="torch threads per variant (default: torch's, all cores); 1 "
                        "keeps ratios meaningful on a machine other jobs are loading")
    parser.add_argument("--workdir", type=Path, help="keep the workload here (reused when it matches)")
    parser.add_argument("--json", type=Path, help="write every variant's raw results and the table here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-isolate", action="store_true", help="run variants in this process (tests only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        print(RESULT_MARK + json.dumps(run_child(args.child, args.spec)), flush=True)
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    size = args.size or ("quick" if args.quick else "default")
    started = time.perf_counter()
    if args.threads and args.no_isolate:
        import torch

        torch.set_num_threads(args.threads)
    report = run_benchmark(size, sections, args.repeats, args.workdir, isolate=not args.no_isolate,
                           extras=not args.no_extras, threads=args.threads,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report.notes.append(f"benchmark wall time {time.perf_counter() - started:.0f}s")
    table = format_table(report, markdown=args.markdown)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "table": table}, indent=1, default=str))
    return 0
