"""The `modpo-pipe` process watches the one doing the work, so that its exit status says whether the work finished.

A process ended from inside (a py: reward calling os._exit(0), a library calling exit()) exits 0 having written
nothing, and one killed from outside (the kernel's out-of-memory killer sends SIGKILL) says nothing at all: a
shell script or cron took the first for success. So `main` forks first thing: the child runs the command and,
once the command has returned or raised, tells the parent its exit code through a pipe; the parent waits and
exits with that code, or, when the child ended without telling it, prints one `error:` line saying how it
ended and exits non-zero (1, or 128 + N for death by signal N, as a shell says).

The child has a session of its own, as `train --num-processes`' launcher has: a Ctrl-C, SIGTERM, hangup or quit
reaches it once, passed on by the parent whether it was sent to the parent alone or to the terminal's process
group; a Ctrl-Z stops both and a `fg` continues both. The child dies with the parent (Linux's parent-death
signal): a `kill -9` of the pid the user sees stops the work as it did before there were two processes.
Elsewhere, under a launcher (whose workers it starts and signals itself), and in a process that already runs
threads (a fork would copy their locks held), the command runs in the one process as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

_report_fd: int | None = None  # the child's end of the pipe; None in an unsupervised process
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCONT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def supervised() -> bool:
    """Whether `main` should fork: on Linux (the parent-death signal), outside a launcher's workers, and only while
    this process has one thread. A fork copies the calling thread alone: a lock another thread held (gloo's,
    OpenMP's, a tokenizer's) stays held in the child forever, so a process that already started threads (main()
    called from Python after `import torch` or a process group) runs the command itself, unwatched."""
    return (sys.platform.startswith("linux") and "LOCAL_RANK" not in os.environ and "RANK" not in os.environ
            and _threads() == 1)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: assume the worst
        return 2


def fork() -> None:
    """Returns in the child, which goes on to run the command; the parent waits for it and exits."""
    global _report_fd
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        _die_with(parent)
        _report_fd = write_fd
        return
    os.close(write_fd)
    sys.exit(_wait(pid, read_fd))


def report(code: int | str | None) -> None:
    """The child's last word: the command finished, with this exit code (a no-op unsupervised)."""
    global _report_fd
    if _report_fd is None:
        return
    number = code if isinstance(code, int) else (0 if code is None else 1)  # sys.exit("text") exits 1
    with contextlib.suppress(OSError):  # a parent gone already: nobody to tell
        os.write(_report_fd, f"{number}\n".encode())
    os.close(_report_fd)
    _report_fd = None


def _die_with(parent: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above: nobody would watch this process
        os._exit(1)


def _wait(pid: int, read_fd: int) -> int:
    for sig in _FORWARDED:
        signal.signal(sig, lambda signum, frame: _forward(pid, signum))

    def stop(signum: int, frame: object) -> None:  # Ctrl-Z: the child first, then this process
        _forward(pid, signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until a SIGCONT, which is passed on
        signal.signal(signal.SIGTSTP, stop)

    signal.signal(signal.SIGTSTP, stop)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:  # pragma: no cover (reaped elsewhere: nothing left to learn)
            return 1
        except InterruptedError:  # pragma: no cover (PEP 475 retries; kept for clarity)
            continue
    with contextlib.suppress(OSError):
        os.set_blocking(read_fd, False)
    said = b""
    with contextlib.suppress(OSError):
        said = os.read(read_fd, 64)
    os.close(read_fd)
    if said.strip().lstrip(b"-").isdigit():
        return int(said)
    command = " ".join(sys.argv[1:2]) or "(no command)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        why = " (what the kernel's out-of-memory killer sends: `dmesg` tells)" if sig == signal.SIGKILL else ""
        _say(f"modpo-pipe {command} did not finish: it was killed by {name}{why}")
        return 128 + sig
    code = os.waitstatus_to_exitcode(status)
    _say(f"modpo-pipe {command} did not finish: its process exited with status {code} from inside, before the "
         "command ended (something it ran, such as a py: reward, called os._exit or exit); what it was writing "
         "was not kept as finished")
    return code or 1


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _say(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
