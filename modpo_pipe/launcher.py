"""The process launcher behind `train --num-processes N`: accelerate's own `launch` (torchrun underneath), with
its ending made quiet. A worker that fails has printed its one `error:` line already; accelerate then raised
torch elastic's ChildFailedError, 30 lines of launcher traceback after it that read like a crash of the tool.
Here the launcher exits with the failed worker's code (128 + N for signal N, as a shell says) instead.

Run as `python -m modpo_pipe.launcher ACCELERATE-LAUNCH-ARGS...`; cli.launch_train builds the command line."""

from __future__ import annotations

import logging
import sys


def exit_code(code: int) -> int:
    """A process's status as a shell reports it: a negative code is death by that signal."""
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # Its "failed (exitcode: 1) local_rank: 0" line repeats what the worker's error line said.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return exit_code(failure.exitcode) or 1
    except SignalException as e:  # a SIGTERM or SIGINT forwarded to the launcher: the workers are stopped
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
