"""Iterative rounds in one run directory, advanced safely by repeated (cron) invocations.

    RUN/
      modpo.toml              settings (or --config elsewhere)
      state.json              the manifest: per round and stage, status, inputs, outputs (content
                              fingerprints), settings, timestamps; replaced atomically at every transition
      .lock                   flock'ed for the whole of an invocation (never deleted)
      round-000/
        prompts.jsonl         the prompts this round samples (its slice of [run].prompts)
        pairs.parquet         generate
        scored.parquet        score
        train/                train's output dir (final/, merged/ with LoRA, state/, metrics.jsonl)
        policy -> train/final the round's trained policy (train/merged with LoRA); samples round 1
        metrics.jsonl         a copy of train/metrics.jsonl
      round-001/ ...

One invocation (`advance`) takes the lock or exits at once (`LockHeld`), checks every finished stage against
the manifest, and runs what is due: the first stage, in round order, that is not done, or whose inputs,
settings or outputs no longer match what the manifest recorded. Stages form one chain (generate k -> score
k -> train k -> generate k+1), so everything after a redone stage is redone too: its inputs changed.

Crash safety: a stage is marked `running` before it starts and `done` only after its outputs were written
(atomically: temp + fsync + rename) and fingerprinted. A stage killed half way is redone from its start;
train resumes from its last saved state when its inputs and settings are those of the killed attempt.

One target per run: with [train].normalize = "zscore" every round (and every replayed pair) is z-scored with
round 0's reward statistics (Run.stats_file says why), which round 0's score record keeps in the manifest;
each train record's summary names the statistics it used.

A change of settings that would redo finished stages (other reward models, weights, prompts ...) is refused
with `ConfigChanged` unless the caller allows it. Settings that cannot change a result (device, batch sizes of
scoring, logging and saving intervals, vLLM memory knobs) are not compared.

Shards ([run].shards = N > 1): the plain `run` (the coordinator) opens a round's generate or score stage and
leaves it `waiting`; `run --shard I/N` workers (cron on several hosts sharing the run directory, a Slurm
array, Kubernetes jobs) each compute shard I of the opened stage into round-k/pairs-KEY.shards/ (KEY: the
stage's resume key, so shards made with other settings never mix in), holding only their own
.lock-shard-I-of-N while they work. The coordinator's next invocation merges the N shards (shards.py) and
marks the stage done; training stays with the coordinator. The rows do not depend on N.

The lock, the manifest and its records live in runstate.py, durable files and fingerprints in storage.py, the
status view in status.py. This module reads top to bottom: the two entry points (`advance`, `work_shard`), what
they share, then `Run`: what each round's stages read and write, the survey of what is due, and the running of
one stage.

This module imports no torch at import time: a second invocation that finds the lock held exits in well
under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modpo_pipe import runstate, storage
from modpo_pipe.config import Settings, validate_section
from modpo_pipe.errors import ModpoError
from modpo_pipe.roles import legacy_key_settings, recorded_settings, resume_free_names, work_settings
from modpo_pipe.runstate import (
    STAGES,
    Manifest,
    StageState,
    json_normal,
    model_identity,
    now,
    reward_identity,
    round_name,
    run_lock,
    settings_diff,
)
from modpo_pipe.tracking import RunTracker

# Exit codes of `modpo-pipe run` (sysexits.h names where one fits).
EXIT_OK = 0  # advanced, or nothing was due
EXIT_FAILURE = 1  # a stage failed, or the settings/inputs are wrong; the message says which
EXIT_LOCKED = 75  # EX_TEMPFAIL: another invocation holds the run's lock; nothing was touched
EXIT_CONFIG_CHANGED = 78  # EX_CONFIG: the settings changed in a way that would redo finished stages

# The stages shard workers compute ([run].shards > 1), and the stem of their shard directories.
SHARDED_OUTPUTS = {"generate": "pairs", "score": "scored"}
# What each stage writes in its round directory; a work directory NAME.parts/ (resumable generate and score)
# and train/ are kept when a killed attempt is resumed, removed when the stage starts afresh.
_STAGE_FILES = {"generate": ["prompts.jsonl", "pairs.parquet"], "score": ["scored.parquet"],
                "train": ["policy", "metrics.jsonl"]}


class ConfigChanged(ModpoError):
    """The settings differ from those finished stages ran with."""


class ShardsPending(ModpoError):
    """A sharded stage is open and not every shard is written yet: the stage waits for its workers."""


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
        log(f"{due.name}: shard {index}/{count}: done in {time.time() - started:.1f}s ({report.pairs} groups in "
            f"{report.out})")
    return due.name


# --------------------------------------------------------------------------- what the entry points share


def error_text(e: BaseException) -> str:
    """How a manifest records a failure: the exception's type and first line, capped."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


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


def _count(value: Any) -> int:
    """A count from the manifest, which a person may have edited: what does not read as one counts as 1."""
    try:
        return max(1, int(value))
    except (TypeError, ValueError, OverflowError):
        return 1


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


# ---------------------------------------------------------------------------------------------- the run


def check_run_settings(settings: Settings) -> None:
    r = settings.run
    validate_section(r, "run")
    if r.replay and r.reference == "previous":
        raise ModpoError("[run].replay needs [run].reference = \"fixed\": earlier rounds' cached reference "
                         "log-probs were computed against other references")
    if not r.prompts:
        raise ModpoError("no prompts: set [run].prompts in modpo.toml or pass --prompts")
    if not settings.generate.policy:
        raise ModpoError("no initial policy: set [generate].policy in modpo.toml or pass --generate-policy")
    if not settings.score.rewards:
        raise ModpoError("no reward models: add a [score.rewards] table to modpo.toml or pass --score-reward")


class Run:
    """A run directory and the settings it is advanced with: what each round's stages read and write."""

    def __init__(self, run_dir: Path, settings: Settings, progress: bool | None = None, fetch: bool = True):
        """`fetch` False: Hub models not in the cache are not downloaded to fingerprint them (status)."""
        check_run_settings(settings)
        self.fetch = fetch
        self.dir = Path(run_dir).resolve()
        self.settings = settings
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._prompts: list[Any] | None = None
        self._identities: dict[str, str] = {}

    # --- what each round uses ---

    def round_dir(self, k: int) -> Path:
        return self.dir / round_name(k)

    def sampling_policy(self, k: int) -> str:
        """Round k samples with round k-1's trained policy; round 0 with the initial policy."""
        return self.settings.generate.policy if k == 0 else str(self.round_dir(k - 1) / "policy")

    def reference(self, k: int) -> str:
        if self.settings.run.reference == "previous":
            return self.sampling_policy(k)
        return self.settings.score.ref or self.settings.generate.policy

    def stats_file(self) -> Path:
        """The reward statistics every round trains with: round 0's, stored in its scored file's metadata (and
        in the manifest, in round 0's score record). With reference = "fixed" they are the reference's own
        samples' (when [score].ref is the initial policy), so every round and every replayed pair is
        z-scored toward the one target pi_ref * exp(r_w / beta); per-round statistics would shrink with the
        policy's spread and push each round further along the front. With reference = "previous" they stay
        fixed too: K rounds then compose to pi_0 * exp(K r_w / beta), the same weights at a K times smaller
        beta, whereas per-round statistics would reweight each reward by 1/std as it saturates."""
        return self.round_dir(0) / "scored.parquet"

    def replay_rounds(self, k: int) -> list[int]:
        replay = self.settings.run.replay
        if replay == 0:
            return []
        first = 0 if replay < 0 else max(0, k - replay)
        return list(range(first, k))

    def all_prompts(self) -> list[Any]:
        if self._prompts is None:
            from modpo_pipe.config import prompt_fields
            from modpo_pipe.prompts import read_prompts

            self._prompts, _ = read_prompts(Path(self.settings.run.prompts),
                                            skip_invalid=self.settings.generate.skip_invalid,
                                            fields=prompt_fields(self.settings.generate))
        return self._prompts

    def prompt_slice(self, k: int) -> list[Any]:
        """All prompts, or round k's slice of prompts_per_round, rotating through the file and wrapping."""
        records, n = self.all_prompts(), self.settings.run.prompts_per_round
        if n == 0 or n >= len(records):
            return list(records)
        start = (k * n) % len(records)
        return [records[(start + i) % len(records)] for i in range(n)]

    def _identity(self, kind: str, spec: str) -> str:
        key = f"{kind}:{spec}"
        if key not in self._identities:
            self._identities[key] = (reward_identity(spec, self.fetch) if kind == "reward"
                                     else model_identity(spec, self.fetch))
        return self._identities[key]

    # --- what a finished stage is compared against ---

    def stage_settings(self, k: int, stage: str) -> dict[str, Any]:
        """Everything outside the run directory that a stage's result depends on, keyed for messages."""
        s = self.settings
        out = {f"model.{key}": value for key, value in recorded_settings(s.model, by_run=True).items()}
        out.update({f"{stage}.{key}": value
                    for key, value in recorded_settings(getattr(s, stage), by_run=True).items()})
        if stage == "generate":
            # (the other columns only where there are some: runs of prompts without them keep their fingerprints)
            prompts = [{"id": r.id, "prompt": r.prompt, "messages": r.messages,
                        **({"columns": r.columns} if r.columns else {})} for r in self.prompt_slice(k)]
            out["run.prompts (this round's prompts)"] = storage.json_fingerprint(prompts)
            if k == 0:
                out["generate.policy (initial policy)"] = self._identity("model", s.generate.policy)
        elif stage == "score":
            out["score.rewards"] = {name: {"spec": spec, "fingerprint": self._identity("reward", spec)}
                                    for name, spec in s.score.rewards.items()}
            if s.run.reference == "fixed" or k == 0:
                ref = self.reference(k)
                out["run.reference"] = f"model {ref} ({self._identity('model', ref)})"
            else:
                out["run.reference"] = f"previous ({round_name(k - 1)} policy)"
        else:
            out["run.replay (rounds replayed)"] = self.replay_rounds(k)
            if s.train.normalize == "zscore":
                out["run.reward_stats (z-score statistics)"] = f"{round_name(0)} samples, fixed for the run"
        return json_normal(out)

    def stage_inputs(self, k: int, stage: str, manifest: Manifest) -> dict[str, Any]:
        """Fingerprints of the run's own files the stage reads, from the (verified) upstream records."""

        def output(j: int, upstream: str, name: str) -> Any:
            record = manifest.get(j, upstream)
            assert record is not None and record["status"] == "done"
            info = record["outputs"][name]
            return info["sha256"] if "sha256" in info else info["fingerprint"]

        policy_input = {} if k == 0 else {f"{round_name(k - 1)}/policy": output(k - 1, "train", "policy")}
        if stage == "generate":
            return policy_input
        if stage == "score":
            inputs = {f"{round_name(k)}/pairs.parquet": output(k, "generate", "pairs.parquet")}
            return {**inputs, **(policy_input if self.settings.run.reference == "previous" else {})}
        statistics = [0] if self.settings.train.normalize == "zscore" else []  # Run.stats_file
        scored = {f"{round_name(j)}/scored.parquet": output(j, "score", "scored.parquet")
                  for j in [k, *self.replay_rounds(k), *statistics]}
        return {**scored, **policy_input}

    def output_problem(self, k: int, record: dict[str, Any]) -> str | None:
        for name, info in record.get("outputs", {}).items():
            path = self.round_dir(k) / name
            if name == "policy":
                if not path.is_symlink() or os.readlink(path) != info["target"]:
                    return f"{round_name(k)}/policy is missing or points elsewhere"
                problem = storage.tree_problem(path, info["files"])
            else:
                problem = storage.file_problem(path, info)
            if problem:
                return f"{round_name(k)}/{name} {problem}"
        return None

    # --- the survey: every stage of every round, in order ---

    def survey(self, manifest: Manifest, lock_held_elsewhere: bool = False) -> list[StageState]:
        states: list[StageState] = []
        chain_ok = True  # every earlier stage is done and valid
        for k in range(self.settings.run.rounds):  # rounds recorded beyond [run].rounds are left alone
            for stage in STAGES:
                record = manifest.get(k, stage)
                st = StageState(k, stage, "pending", record=record, settings=self.stage_settings(k, stage))
                if record is not None and record["status"] == "done":
                    st.changed = settings_diff(record["settings"], st.settings)
                    st.change_accepted = bool(st.changed) and manifest.accepts_settings(st.name, st.settings)
                if chain_ok:
                    st.inputs = json_normal(self.stage_inputs(k, stage, manifest))
                if record is None:
                    st.status = "pending"
                elif record["status"] == "running":
                    st.status = "running" if lock_held_elsewhere else "failed"
                    st.reason = "" if lock_held_elsewhere else "interrupted (the process died)"
                elif record["status"] == "failed":
                    st.status, st.reason = "failed", record.get("error", "")
                elif record["status"] == "waiting":  # the shards as they are now, not when it was opened
                    key = record.get("resume_key")
                    waiting = self.written_shards(k, stage, key)[1] if key else record.get("waiting", "")
                    st.status, st.reason = "waiting", waiting or "every shard is written: the next `run` merges them"
                elif st.changed:
                    st.status, st.reason = "redo", "settings changed: " + "; ".join(st.changed)
                elif not chain_ok:
                    st.status, st.reason = "redo", "an earlier stage is redone"
                elif record["inputs"] != st.inputs:
                    st.status, st.reason = "redo", "its inputs changed (an earlier stage was redone)"
                else:
                    problem = self.output_problem(k, record)
                    st.status, st.reason = ("redo", problem) if problem else ("done", "")
                if st.status == "failed":  # each attempt of a stage not done counts on from the last (execute)
                    st.failures = _count(record.get("attempt", 1))
                chain_ok = chain_ok and st.valid
                states.append(st)
        return states

    # --- running one stage ---

    def execute(self, st: StageState, manifest: Manifest, log: Callable[[str], None]) -> dict[str, Any]:
        k, stage = st.round, st.stage
        assert st.inputs is not None, "an earlier stage is not done"
        previous = manifest.get(k, stage)
        # A killed or failed attempt with these very inputs and settings left work to continue from (train's
        # state/, generate's and score's finished chunks); anything else starts afresh.
        key = self.attempt_key(k, stage, st.inputs, previous.get("resume_key") if previous else None)
        resume = (previous is not None and previous["status"] in ("running", "failed", "waiting")
                  and previous.get("resume_key") == key)
        round_dir = self.round_dir(k)
        round_dir.mkdir(parents=True, exist_ok=True)
        self._clear(k, stage, fresh=not resume)
        attempt = previous.get("attempt", 0) + 1 if previous and previous["status"] != "done" else 1
        if resume and previous and previous["status"] == "waiting":  # checking on the shards is no new attempt
            attempt -= 1
        record: dict[str, Any] = {"status": "running", "settings": st.settings, "inputs": st.inputs,
                                  "resume_key": key, "started": now(), "pid": os.getpid(), "host": socket.gethostname(),
                                  "attempt": attempt}
        earlier_seconds = (runstate.recorded_seconds(previous.get("seconds")) or 0.0) if resume and previous else 0.0
        manifest.put(k, stage, record)
        manifest.save()
        started = time.time()
        log_path = runstate.stage_log_path(round_dir, stage)
        try:
            with runstate.stage_log(log_path, f"== {now()} {st.name}: attempt {attempt}, pid {os.getpid()} on "
                                              f"{socket.gethostname()}"):
                log(f"{st.name}: {'resuming' if resume else 'starting'}"
                    + (f" (attempt {attempt})" if attempt > 1 else ""))
                outputs, summary = getattr(self, f"_run_{stage}")(k, resume, key)
        except ShardsPending as e:
            record.update(status="waiting", waiting=str(e), seconds=earlier_seconds + time.time() - started)
            manifest.save()
            log(f"{st.name}: {e}")
            return record
        except BaseException as e:
            record.update(status="failed", error=error_text(e),
                          finished=now(), seconds=earlier_seconds + time.time() - started)
            manifest.save()
            # (a note in the log that cannot be written must not hide the error itself)
            with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as file:
                file.write(f"{now()} {st.name} failed: {record['error']}\n")
            if isinstance(e, SystemExit):  # sys.exit(0) somewhere in a stage must not make `run` exit 0
                raise ModpoError(f"{st.name} failed: {record['error']}") from e
            raise
        record.update(status="done", outputs=outputs, summary=summary, finished=now(),
                      seconds=earlier_seconds + time.time() - started)
        manifest.save()
        if stage == "train" and not self.settings.run.keep_train_state:
            shutil.rmtree(round_dir / "train" / "state", ignore_errors=True)
        self._remove_shards(k, stage)
        log(f"{st.name}: done in {record['seconds']:.1f}s ({headline(stage, summary)})")
        return record

    def resume_key(self, k: int, stage: str, inputs: dict[str, Any] | None) -> str:
        """What a killed attempt's work was made with: the settings its result depends on, its inputs, and what
        the stage's own work directory records besides (generate's and score's chunk size, generate's prompt
        limit, the dtype [model].dtype resolves to on this host's device; train's global batch). A killed
        attempt is continued only under the same key. Batch sizes, save and log intervals are left out: lowering
        a batch size after an out-of-memory kill, or saving more often, must not throw finished work away."""
        from modpo_pipe import models  # here: this module stays light (no torch) for run's lock and --help

        s, section = self.settings, getattr(self.settings, stage)
        free = {f"{stage}.{name}" for name in resume_free_names(section)}
        settings = {key: value for key, value in self.stage_settings(k, stage).items() if key not in free}
        if stage == "train":
            work = {"global_batch": s.train.batch_size * s.train.grad_accum}
        else:  # what the work directory records: the chunk size, and the dtype this host's device resolves to
            work = {**work_settings(section),
                    "dtype": str(models.resolve_dtype(s.model.dtype, models.resolve_device(s.model.device)))}
        return storage.json_fingerprint({"stage": stage, "round": k, "inputs": inputs, "settings": settings,
                                         "work": work})

    def legacy_resume_key(self, k: int, stage: str, inputs: dict[str, Any] | None) -> str:
        """The key runs recorded before resume keys left batch sizes out: every setting of the section and
        [model] (roles.Role.in_legacy_key), and the stage's recorded settings."""
        fields = legacy_key_settings(getattr(self.settings, stage))
        return storage.json_fingerprint({"stage": stage, "round": k, "section": fields,
                                         "model": dataclasses.asdict(self.settings.model), "inputs": inputs,
                                         "settings": self.stage_settings(k, stage)})

    def attempt_key(self, k: int, stage: str, inputs: dict[str, Any] | None, recorded: str | None) -> str:
        """The key an attempt runs under: resume_key, or the `recorded` one when it is the legacy key of the
        same settings, so that a stage killed or waiting for shards across an upgrade keeps its work (its shard
        directory is named by its key)."""
        key = self.resume_key(k, stage, inputs)
        if recorded not in (None, key) and recorded == self.legacy_resume_key(k, stage, inputs):
            return recorded
        return key

    def _clear(self, k: int, stage: str, fresh: bool) -> None:
        """Remove what a killed attempt may have left; with `fresh`, everything the stage writes. Directories
        are renamed away before they are deleted, so a kill mid-way never leaves half of one in place."""
        round_dir = self.round_dir(k)
        names = _STAGE_FILES[stage]
        for name in names:
            storage.remove_temps(round_dir, name)
        dirs = [f"{name}.parts" for name in names] + (["train"] if stage == "train" else [])
        for name in dirs:
            shutil.rmtree(round_dir / f".{name}.trash", ignore_errors=True)
        if not fresh:
            return
        for name in names:
            path = round_dir / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            shutil.rmtree(round_dir / f".{name}.parts.done", ignore_errors=True)  # parts.py's own trash
        for name in dirs:
            if (round_dir / name).exists():
                trash = round_dir / f".{name}.trash"
                (round_dir / name).rename(trash)
                shutil.rmtree(trash)
        self._remove_shards(k, stage)

    def _remove_shards(self, k: int, stage: str) -> None:
        """The shard directories of a stage (of any opening): merged, or of settings no longer current."""
        if stage not in SHARDED_OUTPUTS:
            return
        for path in self.round_dir(k).glob(f"{SHARDED_OUTPUTS[stage]}-*.shards"):
            trash = path.with_name(f".{path.name}.trash")
            shutil.rmtree(trash, ignore_errors=True)
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)

    def shard_output(self, k: int, stage: str, key: str) -> Path:
        """The output path shard workers of this opening of a stage are given: their shards go to
        round-k/NAME-KEY.shards/ (shards.shard_dir)."""
        return self.round_dir(k) / f"{SHARDED_OUTPUTS[stage]}-{key[:16]}.parquet"

    def written_shards(self, k: int, stage: str, key: str) -> tuple[list[Path], str]:
        """The shards of this opening written so far, and what is still awaited ("" when none is)."""
        from modpo_pipe import shards

        count = self.settings.run.shards
        out = self.shard_output(k, stage, key)
        directory = shards.shard_dir(out)
        done = sorted(directory.glob(f"*-of-{count:05d}.parquet")) if directory.is_dir() else []
        if len(done) == count:
            return done, ""
        have = {p.name for p in done}
        missing = [i for i in range(count) if shards.shard_name((i, count)) not in have]
        failed = [(i, note) for i in missing if (note := shards.failure(out, (i, count)))]
        failures = "".join(f"; shard {i}/{count} failed on {note.get('host', '?')} at {note.get('finished', '?')}: "
                           f"{note.get('error', '')}" for i, note in failed[:3])
        return done, (f"waiting for shard workers: {len(done)} of {count} shards written (missing "
                      f"{', '.join(f'{i}/{count}' for i in missing[:8])}{' ...' if len(missing) > 8 else ''}"
                      f"{failures}); they run as `modpo-pipe run --workdir {self.dir} --shard I/{count}`")

    def merge_shards(self, k: int, stage: str, key: str, out: Path) -> None:
        """Merge the N shards of this opening into `out`, or raise ShardsPending while some are missing."""
        from modpo_pipe import shards

        done, waiting = self.written_shards(k, stage, key)
        if waiting:
            raise ShardsPending(waiting)
        try:
            shards.merge(done, out)
        except shards.DamagedShard as e:  # set aside, not deleted; its worker's next firing computes it again
            aside = e.path.with_name(f".{e.path.name}.damaged")
            e.path.replace(aside)
            raise ShardsPending(f"{e}; set aside as {aside.name}, for its worker to compute again") from None

    def stage_job(self, k: int, stage: str, key: str | None = None) -> tuple[Settings, Path, Path]:
        """The settings, input and output of round k's generate or score; with `key`, the output a shard
        worker of that opening is given."""
        round_dir = self.round_dir(k)
        if stage == "generate":
            g, source, out = self.settings.generate, round_dir / "prompts.jsonl", round_dir / "pairs.parquet"
            out = self.shard_output(k, stage, key) if key else out
            # Each round draws other samples: the seed is offset by the round. The round's prompts.jsonl holds
            # modpo-pipe's own field names, whatever [run].prompts called them, and the other columns.
            return dataclasses.replace(self.settings, generate=dataclasses.replace(
                g, policy=self.sampling_policy(k), seed=g.seed + k, out=str(out), split="", prompt_field="prompt",
                messages_field="messages", id_field="id")), source, out
        source, out = round_dir / "pairs.parquet", round_dir / "scored.parquet"
        out = self.shard_output(k, stage, key) if key else out
        return dataclasses.replace(self.settings, score=dataclasses.replace(
            self.settings.score, ref=self.reference(k), out=str(out))), source, out

    def _run_generate(self, k: int, resume: bool, key: str) -> tuple[dict, dict]:
        from modpo_pipe.generate import run_generate

        round_dir = self.round_dir(k)
        prompts_path = round_dir / "prompts.jsonl"
        lines = []
        for r in self.prompt_slice(k):
            row: dict[str, Any] = {"id": r.id, **r.columns}  # (no column is named id, prompt or messages)
            row.update({"messages": r.messages} if r.messages is not None else {"prompt": r.prompt})
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        storage.write_atomic(prompts_path, "".join(lines))
        settings, _, out = self.stage_job(k, "generate")
        if self.settings.run.shards > 1:
            self.merge_shards(k, "generate", key, out)
            summary = merged_summary(out)
        else:
            report = run_generate(settings, prompts_path, out, round_index=k, progress=self.progress)
            summary = {"rows": report.pairs, "prompts": report.prompts, "backend": report.backend,
                       "long_prompts_dropped": report.long_prompts_dropped,
                       "response_tokens": report.response_tokens}
        outputs = {"prompts.jsonl": storage.file_info(prompts_path),
                   "pairs.parquet": {**storage.file_info(out), "rows": summary["rows"]}}
        return outputs, summary

    def _run_score(self, k: int, resume: bool, key: str) -> tuple[dict, dict]:
        from modpo_pipe.score import run_score

        settings, pairs, out = self.stage_job(k, "score")
        if self.settings.run.shards > 1:
            self.merge_shards(k, "score", key, out)
            summary = merged_summary(out)
        else:
            report = run_score(settings, pairs, out, progress=self.progress)
            summary = {"rows": report.pairs, "dropped_invalid_reward": report.dropped_invalid_reward,
                       "dropped_invalid_responses": report.dropped_invalid_responses,
                       "reward_mean": {n: s["mean"] for n, s in report.rewards.items()},
                       "reward_std": {n: s["std"] for n, s in report.rewards.items()}}
        outputs = {"scored.parquet": {**storage.file_info(out), "rows": summary["rows"]}}
        return outputs, summary

    def _run_train(self, k: int, resume: bool, key: str) -> tuple[dict, dict]:
        from modpo_pipe.train import train

        round_dir, t = self.round_dir(k), self.settings.train
        out = round_dir / "train"
        lora = t.lora_r > 0
        if resume and lora and (out / "final").exists() and not (out / "merged" / "config.json").is_file():
            # Killed between writing final/ and merged/: train's finished-run shortcut would skip the merge;
            # without final/ it reloads the last state and writes both.
            shutil.rmtree(out / "final")
        # The next round samples from full weights: with LoRA, always write the merged model.
        # The run's own tracker logs every round (track_stage): no tracker run per round.
        settings = dataclasses.replace(self.settings, train=dataclasses.replace(
            t, policy=self.sampling_policy(k), out=str(out), merge=lora or t.merge, report_to="none",
            reward_stats=str(self.stats_file()) if t.normalize == "zscore" else ""))
        scored = [self.round_dir(j) / "scored.parquet" for j in [k, *self.replay_rounds(k)]]
        report = train(settings, scored, out, progress=self.progress)
        target = "train/merged" if lora else "train/final"
        storage.symlink_atomic(target, round_dir / "policy")
        storage.copy_atomic(out / "metrics.jsonl", round_dir / "metrics.jsonl")
        files = storage.tree_info(round_dir / "policy")
        outputs = {"policy": {"target": target, "fingerprint": storage.tree_fingerprint(files), "files": files},
                   "metrics.jsonl": storage.file_info(round_dir / "metrics.jsonl")}
        summary = {"rows": report.pairs, "dropped_identical": report.dropped_identical, "steps": report.steps,
                   "resumed_from": report.resumed_from, **metrics_summary(round_dir / "metrics.jsonl"),
                   "reward_stats": (report.target or {}).get("reward_stats")}
        return outputs, summary


def merged_summary(path: Path) -> dict[str, Any]:
    """A merged stage file's summary, as the unsharded stage reports it, from its metadata."""
    import pyarrow.parquet as pq

    from modpo_pipe import schema

    meta, rows = schema.read_metadata(path), pq.read_metadata(path).num_rows
    if meta["stage"] == "pairs":
        counts = meta.get("counts", {})
        return {"rows": rows, "prompts": counts.get("prompts"), "backend": meta.get("sampling", {}).get("backend"),
                "long_prompts_dropped": counts.get("long_prompts_dropped"), "shards": meta.get("merged_shards"),
                "shard_seconds": meta.get("shard_seconds")}
    return {"rows": rows, "dropped_invalid_reward": meta["score_counts"]["dropped_invalid_reward"],
            "dropped_invalid_responses": meta["score_counts"].get("dropped_invalid_responses", 0),
            "reward_mean": {n: r["mean"] for n, r in meta["rewards"].items()},
            "reward_std": {n: r["std"] for n, r in meta["rewards"].items()}, "shards": meta.get("merged_shards"),
            "shard_seconds": meta.get("shard_seconds")}


def metrics_summary(path: Path) -> dict[str, Any]:
    """Where the loss started and ended, and the last epoch's mean KL(pi_ref || pi) estimate.

    Over several epochs the loss is compared as first- and last-epoch means (each epoch sees the same
    pairs); in one epoch, the epoch mean is a single number, so the first and last step are compared.
    """
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [r for r in records if "loss" in r]
    if not losses:
        return {}
    first, last = losses[0]["epoch"], losses[-1]["epoch"]

    def in_epoch(epoch: int, key: str) -> list[float]:
        return [r[key] for r in records if r["epoch"] == epoch and key in r]

    if first == last:
        start, end, span = losses[0]["loss"], losses[-1]["loss"], "step"
    else:
        start, end, span = statistics.fmean(in_epoch(first, "loss")), statistics.fmean(in_epoch(last, "loss")), "epoch"
    return {"loss_start": start, "loss": end, "loss_span": span,
            "kl_k2": statistics.fmean(in_epoch(last, "kl_k2") or [float("nan")])}


def headline(stage: str, summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    if stage == "generate":
        return f"{summary['rows']} groups from {summary['prompts']} prompts" + shards_note(summary)
    if stage == "score":
        return ", ".join(f"{n} mean {v:.4g}" for n, v in summary["reward_mean"].items()) + shards_note(summary)
    text = f"{summary['rows']} pairs, {summary['steps']} steps"
    if "loss_start" in summary:
        text += f", loss {summary['loss_start']:.4g} -> {summary['loss']:.4g} (first -> last {summary['loss_span']})"
    elif "loss_first_epoch" in summary:  # recorded before loss_start: epoch means, equal when there was one epoch
        text += f", loss {summary['loss_first_epoch']:.4g} -> {summary['loss']:.4g} (epoch means)"
    if "kl_k2" in summary:  # (runs recorded before it replaced kl_proxy lack it)
        text += f", kl_k2 {summary['kl_k2']:.4g}"
    return text


def shards_note(summary: dict[str, Any]) -> str:
    """A merged stage's workers: its own wall time is the coordinator's merge alone."""
    if not summary.get("shards"):
        return ""
    work = summary.get("shard_seconds")
    return f"; merged from {summary['shards']} shards" + (f", {work:.1f}s of work in them" if work is not None else "")
