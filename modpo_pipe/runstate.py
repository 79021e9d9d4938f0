"""The state of a run directory: its lock, its manifest (state.json) and the records in it, and the identities of
what its stages read from outside it.

    RUN/.lock          flock'ed by the invocation that advances the run (never deleted); the kernel drops the lock
                       when its holder dies, so a killed invocation never blocks the next one
    RUN/state.json     the manifest: per round and stage, a record of status, inputs, outputs (content
                       fingerprints, storage.py), settings and timestamps; replaced atomically at every transition

rounds/ decides from these records what is due; status.py shows them. No torch at import time: an invocation
that finds the lock held exits in well under a second.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modpo_pipe import storage
from modpo_pipe.errors import ModpoError

MANIFEST_NAME = "state.json"
LOCK_NAME = ".lock"
MANIFEST_VERSION = 1


class LockHeld(ModpoError):
    """Another invocation holds the run directory's lock."""



def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())



# ----------------------------------------------------------------------------------------------------- lock


@contextlib.contextmanager
def run_lock(run_dir: Path, name: str = LOCK_NAME) -> Iterator[None]:
    """Hold an exclusive flock on RUN/.lock (or RUN/`name`) for the block. The kernel drops it when the holder
    dies, so a lock left by a killed process never blocks. A second holder gets LockHeld without writing
    anything."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise LockHeld(f"{run_dir / name}: another invocation holds the lock ({holder or 'holder unknown'}); "
                           "nothing done") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_is_held(run_dir: Path) -> bool:
    """Whether an invocation holds the lock now (a momentary shared-lock probe; never blocks)."""
    path = run_dir / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the probe's lock
    return False


# ------------------------------------------------------------------------------------------ stage logs


def stage_log_path(round_dir: Path, stage: str) -> Path:
    return round_dir / f"{stage}.log"


@contextlib.contextmanager
def stage_log(path: Path, header: str) -> Iterator[None]:
    """While the block runs, what this process (and any process it starts) writes to its stdout and stderr goes
    to them as before and is also appended to `path`, after `header`: a stage's own words up to the moment it
    died, for the line that reports its failures to point at. `tee` processes do the copying: one that dies
    mid-stage (os._exit, SIGKILL) leaves them reading to the end of what it wrote. Without `tee`, or with a
    standard stream closed, only the header is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(f"{header}\n")
    tee = shutil.which("tee")
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # a closed stdout or stderr: nothing to copy
        saved = []
    if tee is None or not saved:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    copiers = []
    try:
        for fd, original in zip((1, 2), saved):
            # -i: a Ctrl-C ends the stage, which still has its last words to write, not the copier
            copier = subprocess.Popen([tee, "-a", "-i", str(path)], stdin=subprocess.PIPE, stdout=original)
            assert copier.stdin is not None
            os.dup2(copier.stdin.fileno(), fd)
            copier.stdin.close()
            copiers.append(copier)
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):  # a stream the stage closed
            sys.stdout.flush()
            sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)
        for copier in copiers:
            # The copier ends once every writer is gone; a process the stage left running (a compile worker)
            # may hold the pipe a while longer, and its output still reaches the log, later.
            with contextlib.suppress(subprocess.TimeoutExpired):
                copier.wait(timeout=10)


# ------------------------------------------------------------------------------------------ identities


def model_identity(path_or_id: str, fetch: bool = True) -> str:
    """Content fingerprint of an external model (initial policy, fixed reference, reward model). A Hub model not
    yet cached is downloaded first (the stage would download it moments later): fingerprinted by its id before
    and by its content after, the same model looked changed to the next `run` (exit 78), and a shard worker on
    a host without it idled. `fetch` False (status, which writes nothing): as found."""
    from modpo_pipe import models

    if fetch:
        models.fetch(path_or_id)
    return models.fingerprint(path_or_id)


def reward_identity(spec: str, fetch: bool = True) -> str:
    """Fingerprint of a reward spec without loading it: the model's files, the callable's source file, or a served
    model's endpoint and revision."""
    from modpo_pipe import reward_http

    if reward_http.is_served(spec):
        return reward_http.parse_spec(spec, "reward").fingerprint()
    if not spec.startswith("py:"):
        return model_identity(spec, fetch)
    module, _, _ = spec[len("py:"):].rpartition(":")
    source: str | None = module if module.endswith(".py") else None
    if source is None:
        import importlib.util

        try:
            found = importlib.util.find_spec(module)
            source = found.origin if found else None
        except (ImportError, ValueError):
            source = None
    if source and Path(source).is_file():
        return storage.sha256_file(Path(source))[:32]
    return "unresolved:" + spec


def json_normal(value: Any) -> Any:
    """The value as it reads back from the manifest (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


# ---------------------------------------------------------------------------------------------- manifest


def manifest_problem(data: Any) -> str | None:
    """What keeps `data` from being a manifest the survey can read (its shape, not its meaning); None if fine."""
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), dict):
        return "no 'rounds' object"
    for k, stages in data["rounds"].items():
        if not k.isdigit() or not isinstance(stages, dict):
            return f"round {k!r} is not a round number with an object of stages"
        for stage, record in stages.items():
            if not isinstance(record, dict) or record.get("status") not in ("done", "running", "failed", "waiting"):
                return f"round {k} {stage}: no status done, running, failed or waiting"
            if record["status"] == "done":
                missing = [key for key in ("settings", "inputs", "outputs") if not isinstance(record.get(key), dict)]
                if missing:
                    return f"round {k} {stage}: done, without {', '.join(missing)}"
    return None


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        path = run_dir / MANIFEST_NAME
        if not path.exists():
            return cls(path, {"version": MANIFEST_VERSION, "created": now(), "rounds": {}})
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problem: str | None = str(e)
        else:
            if isinstance(data, dict) and data.get("version") != MANIFEST_VERSION:
                raise ModpoError(f"{path}: manifest version {data.get('version')} is not supported "
                                 f"(this modpo-pipe writes {MANIFEST_VERSION})")
            problem = manifest_problem(data)
        if problem:
            raise ModpoError(f"{path}: unreadable manifest ({problem}); it is only ever replaced atomically, so "
                             "something else wrote it. Restore it, or move it aside to redo every round")
        return cls(path, data)

    def get(self, k: int, stage: str) -> dict[str, Any] | None:
        return self.data["rounds"].get(str(k), {}).get(stage)

    def put(self, k: int, stage: str, record: dict[str, Any]) -> None:
        self.data["rounds"].setdefault(str(k), {})[stage] = record

    def accept_settings(self, name: str, settings: dict[str, Any]) -> None:
        """Remember that `run --allow-config-change` accepted these settings for stage `name` (e.g. "round-001
        train"), so that later invocations without the flag (cron's) redo it instead of refusing."""
        self.data.setdefault("accepted_settings", {})[name] = storage.json_fingerprint(settings)

    def accepts_settings(self, name: str, settings: dict[str, Any]) -> bool:
        return self.data.get("accepted_settings", {}).get(name) == storage.json_fingerprint(settings)

    def save(self) -> None:
        self.data["updated"] = now()
        storage.write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------- stage states


@dataclass
class StageState:
    """One stage of one round as the current settings and files see it."""

    round: int
    stage: str
    status: str  # done | pending | running | failed | redo
    reason: str = ""  # why it is due again (redo), or the last error (failed)
    record: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] | None = None  # None: an earlier stage is not done yet
    changed: list[str] = field(default_factory=list)  # settings that differ from a finished record
    change_accepted: bool = False  # `changed`, and an earlier `run --allow-config-change` accepted these settings
    failures: int = 0  # its attempts that failed or died, in a row, up to the last one

    @property
    def change_refused(self) -> bool:
        """Its settings changed since it finished, and no `run --allow-config-change` accepted the new ones."""
        return bool(self.changed) and not self.change_accepted

    @property
    def name(self) -> str:
        return f"{round_name(self.round)} {self.stage}"

    @property
    def valid(self) -> bool:
        return self.status == "done"


def recorded_seconds(value: Any) -> float | None:
    """A record's `seconds` as a number: the manifest is JSON a person may have edited, so a number written as a
    string counts and anything else is None."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) else None


def round_name(k: int) -> str:
    return f"round-{k:03d}"


def settings_diff(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """A finished stage's recorded settings against the current ones: one "key: old -> new" per difference."""
    keys = sorted(set(recorded) | set(current))
    return [f"{key}: {_short(recorded, key)} -> {_short(current, key)}" for key in keys
            if recorded.get(key) != current.get(key)]


def _short(settings: dict[str, Any], key: str) -> str:
    if key not in settings:
        return "(not recorded)"
    value = settings[key]
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
