"""The process launcher behind `train --num-processes N`: accelerate's own `launch` (torchrun underneath), with
its ending made quiet. A worker that fails has printed its one `error:` line already; accelerate then raised
torch elastic's ChildFailedError, 30 lines of launcher traceback after it that read like a crash of the tool.
Here the launcher exits with the failed worker's code (128 + N for signal N, as a shell says) instead.

Only the first process prints its error line (every process meets the same bad input, and N copies read like N
problems), so a failure that another process meets alone (out of memory on its own GPU) would end in silence.
Every process also leaves its line in a directory the launcher gives them (ERROR_DIR); the launcher prints the
lines the first process did not, naming the processes.

Run as `python -m modpo_pipe.launcher ACCELERATE-LAUNCH-ARGS...`; cli.launch_train builds the command line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

ERROR_DIR = "MODPO_PIPE_ERROR_DIR"


def exit_code(code: int) -> int:
    """A process's status as a shell reports it: a negative code is death by that signal."""
    return code if code >= 0 else 128 - code


def record_error(rank: int, line: str) -> None:
    """A worker's error line, left for the launcher (under this launcher only; a no-op elsewhere)."""
    directory = os.environ.get(ERROR_DIR)
    if directory:
        with contextlib.suppress(OSError):  # the error being reported matters more than this note of it
            (Path(directory) / f"rank-{rank}.txt").write_text(line)


def unsaid_errors(directory: Path, processes: int) -> list[str]:
    """The error lines the first process did not print: one per distinct line, naming the processes that met
    it (`process 2 of 4: ...`, `processes 1, 3 of 4: ...`)."""
    lines = {int(p.stem.removeprefix("rank-")): p.read_text() for p in directory.glob("rank-*.txt")}
    said = lines.get(0)
    ranks_by_line: dict[str, list[int]] = {}
    for rank in sorted(lines):
        if rank != 0 and lines[rank] != said:
            ranks_by_line.setdefault(lines[rank], []).append(rank)
    return [f"{'process' if len(ranks) == 1 else 'processes'} {', '.join(map(str, ranks))} of {processes}: {line}"
            for line, ranks in ranks_by_line.items()]


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # Its "failed (exitcode: 1) local_rank: 0" line repeats what the worker's error line said.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="modpo-pipe-errors-") as errors:
        os.environ[ERROR_DIR] = errors  # the workers inherit it
        try:
            launch_command(args)
        except ChildFailedError as e:
            unsaid = unsaid_errors(Path(errors), args.num_processes)
            if unsaid:  # the first process was stopped mid-line (its progress bar): start a line of our own
                print("\n" + "\n".join(f"error: {line}" for line in unsaid), file=sys.stderr)
            _, failure = e.get_first_failure()
            return exit_code(failure.exitcode) or 1
        except SignalException as e:  # a SIGTERM or SIGINT forwarded to the launcher: the workers are stopped
            return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
