"""The process launcher behind `train --num-processes N`: accelerate's own `launch` (torchrun underneath), with
its ending made quiet. A worker that fails has printed its one `error:` line already; accelerate then raised
torch elastic's ChildFailedError, 30 lines of launcher traceback after it that read like a crash of the tool.
Here the launcher exits with the failed worker's code (128 + N for signal N, as a shell says) instead.

Only the first process prints its error line (every process meets the same bad input, and N copies read like N
problems), so a failure that another process meets alone (out of memory on its own GPU) would end in silence.
Every process also leaves its line in a directory the launcher gives them (ERROR_DIR); the launcher prints the
lines the first process did not, naming the processes.

Run as `python -m modpo_pipe.launcher ACCELERATE-LAUNCH-ARGS...`; launch_train (below, what `train
--num-processes` calls) builds the command line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

from modpo_pipe.errors import ModpoError

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


def launch_train(num_processes: int, arguments: list[str]) -> None:
    """`train --num-processes N`: this very command line, without the flag, on N processes started by
    accelerate's own launcher (torchrun underneath; modpo_pipe.launcher); its exit status is ours."""
    import contextlib
    import signal
    import socket
    import subprocess

    from modpo_pipe.launcher import exit_code

    if num_processes < 1:
        raise ModpoError(f"--num-processes must be >= 1; got {num_processes}")
    if os.environ.get("LOCAL_RANK") is not None:
        raise ModpoError("--num-processes starts `accelerate launch` itself; under a launcher, leave it out")
    with socket.socket() as probe:  # a free port for the processes' rendezvous, so runs side by side never clash
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "modpo_pipe.launcher", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "modpo_pipe", "train", *arguments]
    typer.secho(f"launching {num_processes} processes: {' '.join(command[1:])}", err=True)
    # The launcher and its workers in a process group of their own, and a Ctrl-C, SIGTERM or hangup (a dropped
    # ssh session) sent to this process passed on to all of them: subprocess.call left them running (and
    # writing OUT/final) after a kill.
    launcher = subprocess.Popen(command, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signum)

    handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                                               signal.SIGQUIT)}
    try:
        code = launcher.wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if code:
        raise typer.Exit(exit_code(code))


def given_arguments(ctx: typer.Context, drop: set[str]) -> list[str]:
    """The arguments and flags this invocation was given (not their defaults), as a command line."""
    args: list[str] = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in drop or source is None or source.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if param.param_type_name == "argument":
            args += [str(v) for v in values]
        elif param.is_flag:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for v in values:
                args += [param.opts[0], str(v)]
    return args
