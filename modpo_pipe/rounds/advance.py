"""The entry points of a run directory: `advance` (the plain `run`, from cron), `work_shard` (`run --shard I/N`)
and `share_stages` (another run's finished round 0), and what they share: the lock, the exit codes, the messages
of a refused settings change or of a stage given up on."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modpo_pipe import runstate, storage
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError
from modpo_pipe.rounds.run import Run, error_text
from modpo_pipe.runstate import Manifest, StageState, json_normal, now, round_name, run_lock, settings_diff
from modpo_pipe.tracking import RunTracker

# Exit codes of `modpo-pipe run` (sysexits.h names where one fits).
EXIT_OK = 0  # advanced, or nothing was due
EXIT_FAILURE = 1  # a stage failed, or the settings/inputs are wrong; the message says which
EXIT_LOCKED = 75  # EX_TEMPFAIL: another invocation holds the run's lock; nothing was touched
EXIT_CONFIG_CHANGED = 78  # EX_CONFIG: the settings changed in a way that would redo finished stages


class ConfigChanged(ModpoError):
    """The settings differ from those finished stages ran with."""


class GaveUp(ModpoError):
    """The due stage failed or died [run].max_failures times in a row: not tried again until `run --retry`."""


# ------------------------------------------------------------------------------------------- entry points


def _log_stderr(message: str) -> None:
    print(f"{now()} {message}", file=sys.stderr, flush=True)


def advance(run_dir: Path, settings: Settings, *, max_stages: int | None = None, until: str | None = None,
            allow_config_change: bool = False, log: Callable[[str], None] = _log_stderr,
            progress: bool | None = None, retry: bool = False) -> AdvanceReport:
    """Run what is due in `run_dir`, stage by stage, holding its lock throughout.

    max_stages: run at most this many stages; until="round": stop once the round of the first due stage is
    trained; retry: run a stage that failed [run].max_failures times in a row once more. Raises LockHeld,
    ConfigChanged, GaveUp, or whatever a failing stage raised (after recording it); an OSError as a
    ModpoError."""
    with filesystem_errors(Path(run_dir)):
        return _advance(run_dir, settings, max_stages=max_stages, until=until,
                        allow_config_change=allow_config_change, log=log, progress=progress, retry=retry)


def _advance(run_dir: Path, settings: Settings, *, max_stages: int | None, until: str | None,
             allow_config_change: bool, log: Callable[[str], None], progress: bool | None,
             retry: bool = False) -> AdvanceReport:
    if max_stages is not None and max_stages < 1:
        raise ModpoError(f"--max-stages must be >= 1; got {max_stages}")
    if until not in (None, "round", "end"):
        raise ModpoError(f"--until must be 'round' or 'end'; got {until!r}")
    run_dir = Path(run_dir)
    with run_lock(run_dir), contextlib.closing(RunTracker(run_dir.resolve(), settings.train.report_to, {
            "run": settings.run, "generate": settings.generate, "score": settings.score, "train": settings.train,
            "model": settings.model}, settings.model.device)) as tracker:
        run = Run(run_dir, settings, progress)
        if not run.progress:  # cron logs: no progress bars from model loading either (read at import)
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        manifest = Manifest.load(run.dir)
        manifest.data["initial_policy"] = settings.generate.policy  # saved with the next stage transition
        states = run.survey(manifest)
        if any(s.change_refused for s in states):
            message = config_change_message(states)
            if not allow_config_change:
                raise ConfigChanged(message)
            log("--allow-config-change: " + message.splitlines()[0].replace("running now would redo", "redoing"))
            # Remembered: cron's next invocations, without the flag, redo the rest rather than refuse.
            for s in states:
                if s.changed:
                    manifest.accept_settings(s.name, s.settings)
            manifest.save()
        ran: list[str] = []
        target_round: int | None = None
        while True:
            due = next((s for s in states if not s.valid), None)
            if due is None:
                log(f"{run.dir}: all {settings.run.rounds} rounds done; nothing to do")
                return AdvanceReport(ran, None, settings.run.rounds)
            if 0 < settings.run.max_failures <= due.failures and not retry:
                raise GaveUp(gave_up_message(run, due))
            if due.status == "redo":
                log(f"{due.name}: redoing: {due.reason}")
            elif due.status == "failed" and due.reason:
                log(f"{due.name}: the last attempt failed: {due.reason}")
            stop = (max_stages is not None and len(ran) >= max_stages) or (
                until == "round" and target_round is not None and due.round != target_round)
            if stop:
                log(f"stopping as asked; next due: {due.name}")
                return AdvanceReport(ran, due.name, settings.run.rounds)
            target_round = due.round if target_round is None else target_round
            if run.execute(due, manifest, log)["status"] == "waiting":  # its shard workers have work to do
                return AdvanceReport(ran, due.name, settings.run.rounds)
            ran.append(due.name)
            track_stage(tracker, manifest, due.round, due.stage, run.round_dir(due.round))
            states = run.survey(manifest)


def work_shard(run_dir: Path, settings: Settings, shard: tuple[int, int], *,
               log: Callable[[str], None] = _log_stderr, progress: bool | None = None,
               own_settings: bool = False) -> str | None:
    """`run --shard I/N`: compute shard I of the generate or score stage the coordinating `run` opened (status
    `waiting`). Holds the run's lock only to read the manifest, then RUN/.lock-shard-I-of-N while it works.
    Returns the stage's name, or None when no stage waits for shards (nothing is touched then).
    `own_settings`: the worker reads the run's modpo.toml alone (no --config, no flags)."""
    with filesystem_errors(Path(run_dir)):
        return _work_shard(run_dir, settings, shard, log=log, progress=progress, own_settings=own_settings)


def _work_shard(run_dir: Path, settings: Settings, shard: tuple[int, int], *,
                log: Callable[[str], None], progress: bool | None, own_settings: bool = False) -> str | None:
    from modpo_pipe import shards

    index, count = shard
    if settings.run.shards != count:
        raise ModpoError(f"--shard {index}/{count}: the run is split into [run].shards = {settings.run.shards}")
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        run = Run(run_dir, settings, progress)
        if not run.progress:
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        manifest = Manifest.load(run.dir)
        states = run.survey(manifest)
        # Changed settings of a stage up to the due one are the worker's business (its settings differ from the
        # run's); of stages after it, not: those are redone anyway once it is (an accepted change, for one).
        upto = next((i for i, s in enumerate(states) if not s.valid), len(states) - 1) + 1
        if any(s.change_refused for s in states[:upto]):
            raise ConfigChanged(config_change_message(states[:upto]))
        due = next((s for s in states if not s.valid), None)
        if due is None or due.status != "waiting" or due.record is None or due.inputs is None:
            log(f"shard {index}/{count}: nothing to do now; "
                + (f"next due: {due.name} ({due.status})" if due else "every round is done"))
            return None
        key = run.attempt_key(due.round, due.stage, due.inputs, due.record.get("resume_key"))
        if due.record.get("resume_key") != key:
            if own_settings:  # the run's modpo.toml changed after the opening: the coordinator reopens the stage
                log(f"shard {index}/{count}: {due.name} was opened with other settings than the run's modpo.toml "
                    "now holds; nothing to do until the coordinating `run` opens it again")
                return None
            # A worker given other settings than the run's: idling with exit 0 would wait forever, unseen by cron.
            diff = settings_diff(due.record.get("settings", {}), due.settings)
            raise ConfigChanged(
                f"shard {index}/{count}: {due.name} was opened with other settings than this worker's ("
                + ("; ".join(diff) if diff else "chunk size, dtype or prompt limit")
                + "): give the worker the settings of the coordinating `run`, or run it with these to reopen it")
        stage_settings, source, out = run.stage_job(due.round, due.stage, key)
    with run_lock(run.dir, f".lock-shard-{shards.shard_name(shard).removesuffix('.parquet')}"):
        log(f"{due.name}: shard {index}/{count}: starting")
        started = time.time()
        try:
            if due.stage == "generate":
                from modpo_pipe.generate import run_generate

                report = run_generate(stage_settings, source, out, round_index=due.round, progress=run.progress,
                                      shard=shard)
            else:
                from modpo_pipe.score import run_score

                report = run_score(stage_settings, source, out, progress=run.progress, shard=shard)
        except BaseException as e:
            # The coordinator only sees a shard missing; this note lets `status` and its waiting line say why.
            with contextlib.suppress(OSError):  # a note that cannot be written must not hide the error itself
                shards.record_failure(out, shard, {"error": error_text(e), "host": socket.gethostname(),
                                                   "finished": now()})
            raise
        shards.clear_failure(out, shard)
        log(f"{due.name}: shard {index}/{count}: done in {time.time() - started:.1f}s ({report.groups} groups in "
            f"{report.out})")
    return due.name


# --------------------------------------------------------------------------- what the entry points share


def track_stage(tracker: RunTracker, manifest: Manifest, k: int, stage: str, round_dir: Path) -> None:
    """All rounds on one tracker run, one step axis (optimizer steps summed over rounds): round k's reward means
    once it is scored, at the step its training starts from; its training metrics once it is trained."""
    trained = [manifest.get(j, "train") or {} for j in range(k)]
    offset = sum(int(r.get("summary", {}).get("steps", 0)) for r in trained if r.get("status") == "done")
    record = manifest.get(k, stage) or {}
    if stage == "score":
        tracker.round_rewards(k, record.get("summary", {}).get("reward_mean", {}), offset)
    elif stage == "train":
        tracker.round_training(round_dir / "metrics.jsonl", offset)


def share_stages(source_dir: Path, run_dir: Path, settings: Settings, k: int,
                 stages: tuple[str, ...] = ("generate", "score"),
                 log: Callable[[str], None] = _log_stderr) -> list[str]:
    """Give `run_dir` the finished generate and score of round k from `source_dir`, when their settings and
    inputs are exactly what `run_dir`'s own survey would ask of them; returns the stages it shared.

    Runs that differ only in [train] (a weight vector each, say) sample and score round 0 identically: one
    run computes it, the others take copies instead of sampling and scoring again. The copied records keep
    their fingerprints (marked `shared_from`), so the next survey verifies the copies like any finished
    stage. Train is never shared: its policy depends on the weights."""
    if not set(stages) <= {"generate", "score"}:
        raise ModpoError(f"only generate and score can be shared between runs; got {', '.join(stages)}")
    with filesystem_errors(Path(run_dir)):
        source, run = Run(source_dir, settings, progress=False), Run(run_dir, settings, progress=False)
        with run_lock(source.dir), run_lock(run.dir):
            source_manifest, manifest = Manifest.load(source.dir), Manifest.load(run.dir)
            shared: list[str] = []
            for stage in stages:
                name = f"{round_name(k)} {stage}"
                mine = manifest.get(k, stage)
                if mine is not None and mine["status"] == "done":
                    continue  # its own (or an earlier share): the survey judges it
                record = source_manifest.get(k, stage)
                if record is None or record["status"] != "done":
                    raise ModpoError(f"{source.dir}: {name} is not done; nothing to share")
                changed = settings_diff(record["settings"], run.stage_settings(k, stage))
                if changed:
                    raise ModpoError(f"{source.dir}: {name} ran with other settings than {run.dir} asks for: "
                                     + "; ".join(changed))
                if record["inputs"] != json_normal(run.stage_inputs(k, stage, manifest)):
                    raise ModpoError(f"{source.dir}: {name} read other inputs than {run.dir} has")
                problem = source.output_problem(k, record)
                if problem:
                    raise ModpoError(f"{source.dir}: {problem}; nothing shared")
                run.round_dir(k).mkdir(parents=True, exist_ok=True)
                for output in record["outputs"]:
                    storage.copy_atomic(source.round_dir(k) / output, run.round_dir(k) / output)
                manifest.put(k, stage, {**record, "shared_from": str(source.dir)})
                manifest.save()
                shared.append(name)
                log(f"{name}: shared from {source.dir}")
            return shared


@dataclass
class AdvanceReport:
    ran: list[str]  # stage names run by this invocation, in order
    due: str | None  # what the next invocation would run; None: every round is done
    rounds: int


def gave_up_message(run: Run, st: StageState) -> str:
    """One line: the stage, how often and how it failed, its log, and what the user does next."""
    log = runstate.stage_log_path(run.round_dir(st.round), st.stage)
    return (f"{st.name} failed {st.failures} times in a row ([run].max_failures = {run.settings.run.max_failures}; "
            f"the last: {st.reason}); its log: {log}. Not tried again: fix the cause, then run it once more with "
            f"`modpo-pipe run --workdir {run.dir} --retry`")


def config_change_message(states: list[StageState]) -> str:
    changed = [s for s in states if s.changed]
    first = min(states.index(s) for s in changed)
    later = [s for s in states[first + 1:] if s.record and s.record["status"] == "done" and not s.changed]
    lines = ["the settings changed since these finished stages ran; running now would redo them:"]
    for s in changed:
        lines.append(f"  {s.name}: " + "; ".join(s.changed))
    if later:
        lines.append(f"  and, since they depend on {changed[0].name}, the finished stages after it: "
                     + ", ".join(s.name for s in later))
    lines.append("Restore the settings, or pass --allow-config-change to redo them with the new ones.")
    return "\n".join(lines)


@contextlib.contextmanager
def filesystem_errors(run_dir: Path) -> Iterator[None]:
    """An OSError that no stage turned into a message (a read-only run directory, a full disk while writing
    the manifest): one line naming the file. state.json is only ever replaced whole, so it still holds the
    last state it recorded."""
    try:
        yield
    except OSError as e:
        where = e.filename or run_dir
        hint = "; the run directory must be writable" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        raise ModpoError(f"{where}: {e.strerror or e}{hint}") from e
