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

This module imports no torch at import time: a second invocation that finds the lock held exits in well
under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modpo_pipe import storage
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError
from modpo_pipe.storage import file_info, file_problem, tree_fingerprint, tree_info, tree_problem
from modpo_pipe.tracking import RunTracker

# Exit codes of `modpo-pipe run` (sysexits.h names where one fits).
EXIT_OK = 0  # advanced, or nothing was due
EXIT_FAILURE = 1  # a stage failed, or the settings/inputs are wrong; the message says which
EXIT_LOCKED = 75  # EX_TEMPFAIL: another invocation holds the run's lock; nothing was touched
EXIT_CONFIG_CHANGED = 78  # EX_CONFIG: the settings changed in a way that would redo finished stages

STAGES = ("generate", "score", "train")
MANIFEST_NAME = "state.json"
LOCK_NAME = ".lock"
MANIFEST_VERSION = 1
REFERENCES = ("fixed", "previous")

# Settings that cannot change a stage's result, so changing them never invalidates a finished stage.
_GENERATE_IGNORED = {"out", "policy", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
                     "vllm_enforce_eager", "vllm_max_model_len",
                     "split", "prompt_field", "messages_field", "id_field"}  # these act through the prompts' hash
_SCORE_IGNORED = {"out", "ref", "rewards", "batch_tokens", "reward_batch_size", "shard_size"}
# As train.run_fingerprint; reward_stats is set by the run itself (Run.stats_file).
_TRAIN_IGNORED = {"out", "policy", "merge", "log_every", "save_every", "reward_stats", "report_to"}
# The stages shard workers compute ([run].shards > 1), and the stem of their shard directories.
SHARDED_OUTPUTS = {"generate": "pairs", "score": "scored"}
# What each stage writes in its round directory; a work directory NAME.parts/ (resumable generate and score)
# and train/ are kept when a killed attempt is resumed, removed when the stage starts afresh.
_STAGE_FILES = {"generate": ["prompts.jsonl", "pairs.parquet"], "score": ["scored.parquet"],
                "train": ["policy", "metrics.jsonl"]}


class LockHeld(ModpoError):
    """Another invocation holds the run directory's lock."""


class ConfigChanged(ModpoError):
    """The settings differ from those finished stages ran with."""


class ShardsPending(ModpoError):
    """A sharded stage is open and not every shard is written yet: the stage waits for its workers."""


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


# ------------------------------------------------------------------------------------------ identities


def model_identity(path_or_id: str) -> str:
    """Content fingerprint of an external model (initial policy, fixed reference, reward model)."""
    from modpo_pipe import models

    return models.fingerprint(path_or_id)


def reward_identity(spec: str) -> str:
    """Fingerprint of a reward spec without loading it: the model's files, or the callable's source file."""
    if not spec.startswith("py:"):
        return model_identity(spec)
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


def _json_normal(value: Any) -> Any:
    """The value as it reads back from the manifest (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


# ---------------------------------------------------------------------------------------------- manifest


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
            raise ModpoError(f"{path}: unreadable manifest ({e}); it is only ever replaced atomically, so "
                             "something else wrote it. Restore it, or move it aside to redo every round") from None
        if data.get("version") != MANIFEST_VERSION:
            raise ModpoError(f"{path}: manifest version {data.get('version')} is not supported "
                             f"(this modpo-pipe writes {MANIFEST_VERSION})")
        return cls(path, data)

    def get(self, k: int, stage: str) -> dict[str, Any] | None:
        return self.data["rounds"].get(str(k), {}).get(stage)

    def put(self, k: int, stage: str, record: dict[str, Any]) -> None:
        self.data["rounds"].setdefault(str(k), {})[stage] = record

    def recorded_rounds(self) -> list[int]:
        return sorted(int(k) for k in self.data["rounds"])

    def save(self) -> None:
        self.data["updated"] = now()
        storage.write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------- plan


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

    @property
    def name(self) -> str:
        return f"{round_name(self.round)} {self.stage}"

    @property
    def valid(self) -> bool:
        return self.status == "done"


def round_name(k: int) -> str:
    return f"round-{k:03d}"


def check_run_settings(settings: Settings) -> None:
    r = settings.run
    if r.rounds < 1:
        raise ModpoError(f"[run].rounds must be >= 1; got {r.rounds}")
    if r.prompts_per_round < 0:
        raise ModpoError(f"[run].prompts_per_round must be >= 0; got {r.prompts_per_round}")
    if r.reference not in REFERENCES:
        raise ModpoError(f"[run].reference must be one of {', '.join(REFERENCES)}; got {r.reference!r}")
    if r.shards < 1:
        raise ModpoError(f"[run].shards must be >= 1; got {r.shards}")
    if r.replay < -1:
        raise ModpoError(f"[run].replay must be -1 (all), 0 (none) or N > 0; got {r.replay}")
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

    def __init__(self, run_dir: Path, settings: Settings, progress: bool | None = None):
        check_run_settings(settings)
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
            self._identities[key] = reward_identity(spec) if kind == "reward" else model_identity(spec)
        return self._identities[key]

    # --- what a finished stage is compared against ---

    def stage_settings(self, k: int, stage: str) -> dict[str, Any]:
        """Everything outside the run directory that a stage's result depends on, keyed for messages."""
        s = self.settings
        out: dict[str, Any] = {"model.dtype": s.model.dtype}
        if stage == "generate":
            for f in dataclasses.fields(s.generate):
                if f.name not in _GENERATE_IGNORED:
                    out[f"generate.{f.name}"] = getattr(s.generate, f.name)
            prompts = [{"id": r.id, "prompt": r.prompt, "messages": r.messages} for r in self.prompt_slice(k)]
            out["run.prompts (this round's prompts)"] = storage.json_fingerprint(prompts)
            if k == 0:
                out["generate.policy (initial policy)"] = self._identity("model", s.generate.policy)
        elif stage == "score":
            for f in dataclasses.fields(s.score):
                if f.name not in _SCORE_IGNORED:
                    out[f"score.{f.name}"] = getattr(s.score, f.name)
            out["score.rewards"] = {name: {"spec": spec, "fingerprint": self._identity("reward", spec)}
                                    for name, spec in s.score.rewards.items()}
            if s.run.reference == "fixed" or k == 0:
                ref = self.reference(k)
                out["run.reference"] = f"model {ref} ({self._identity('model', ref)})"
            else:
                out["run.reference"] = f"previous ({round_name(k - 1)} policy)"
        else:
            for f in dataclasses.fields(s.train):
                if f.name not in _TRAIN_IGNORED:
                    out[f"train.{f.name}"] = getattr(s.train, f.name)
            out["run.replay (rounds replayed)"] = self.replay_rounds(k)
            if s.train.normalize == "zscore":
                out["run.reward_stats (z-score statistics)"] = f"{round_name(0)} samples, fixed for the run"
        return _json_normal(out)

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
                problem = tree_problem(path, info["files"])
            else:
                problem = file_problem(path, info)
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
                    st.changed = _diff(record["settings"], st.settings)
                if chain_ok:
                    st.inputs = _json_normal(self.stage_inputs(k, stage, manifest))
                if record is None:
                    st.status = "pending"
                elif record["status"] == "running":
                    st.status = "running" if lock_held_elsewhere else "failed"
                    st.reason = "" if lock_held_elsewhere else "interrupted (the process died)"
                elif record["status"] == "failed":
                    st.status, st.reason = "failed", record.get("error", "")
                elif record["status"] == "waiting":
                    st.status, st.reason = "waiting", record.get("waiting", "")
                elif st.changed:
                    st.status, st.reason = "redo", "settings changed: " + "; ".join(st.changed)
                elif not chain_ok:
                    st.status, st.reason = "redo", "an earlier stage is redone"
                elif record["inputs"] != st.inputs:
                    st.status, st.reason = "redo", "its inputs changed (an earlier stage was redone)"
                else:
                    problem = self.output_problem(k, record)
                    st.status, st.reason = ("redo", problem) if problem else ("done", "")
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
        key = self.resume_key(k, stage, st.inputs)
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
        earlier_seconds = float(previous.get("seconds", 0.0)) if resume and previous else 0.0
        manifest.put(k, stage, record)
        manifest.save()
        log(f"{st.name}: {'resuming' if resume else 'starting'}" + (f" (attempt {attempt})" if attempt > 1 else ""))
        started = time.time()
        try:
            outputs, summary = getattr(self, f"_run_{stage}")(k, resume, key)
        except ShardsPending as e:
            record.update(status="waiting", waiting=str(e), seconds=earlier_seconds + time.time() - started)
            manifest.save()
            log(f"{st.name}: {e}")
            return record
        except BaseException as e:
            text = str(e).strip().splitlines()
            record.update(status="failed", error=f"{type(e).__name__}: {text[0] if text else ''}"[:500],
                          finished=now(), seconds=earlier_seconds + time.time() - started)
            manifest.save()
            if isinstance(e, SystemExit):  # sys.exit(0) somewhere in a stage must not make `run` exit 0
                raise ModpoError(f"{st.name} failed: {record['error']}") from e
            raise
        record.update(status="done", outputs=outputs, summary=summary, finished=now(),
                      seconds=earlier_seconds + time.time() - started)
        manifest.save()
        if stage == "train" and not self.settings.run.keep_train_state:
            shutil.rmtree(round_dir / "train" / "state", ignore_errors=True)
        self._remove_shards(k, stage)
        log(f"{st.name}: done in {record['seconds']:.1f}s ({_headline(stage, summary)})")
        return record

    def resume_key(self, k: int, stage: str, inputs: dict[str, Any] | None) -> str:
        """Every setting the stage sees (not only those that change its result: a work directory records
        e.g. its chunk size too) and its inputs. A killed attempt is continued only under the same key."""
        section = {"generate": self.settings.generate, "score": self.settings.score,
                   "train": self.settings.train}[stage]
        blob = {"stage": stage, "round": k, "section": dataclasses.asdict(section),
                "model": dataclasses.asdict(self.settings.model), "inputs": inputs,
                "settings": self.stage_settings(k, stage)}
        return storage.json_fingerprint(blob)

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

    def merge_shards(self, k: int, stage: str, key: str, out: Path) -> None:
        """Merge the N shards of this opening into `out`, or raise ShardsPending while some are missing."""
        from modpo_pipe import shards

        count = self.settings.run.shards
        directory = shards.shard_dir(self.shard_output(k, stage, key))
        done = sorted(directory.glob(f"*-of-{count:05d}.parquet")) if directory.is_dir() else []
        if len(done) < count:
            have = {p.name for p in done}
            missing = [f"{i}/{count}" for i in range(count) if shards.shard_name((i, count)) not in have]
            raise ShardsPending(f"waiting for shard workers: {len(done)} of {count} shards written (missing "
                                f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}); they run as "
                                f"`modpo-pipe run --workdir {self.dir} --shard I/{count}`")
        shards.merge(done, out)

    def stage_job(self, k: int, stage: str, key: str | None = None) -> tuple[Settings, Path, Path]:
        """The settings, input and output of round k's generate or score; with `key`, the output a shard
        worker of that opening is given."""
        round_dir = self.round_dir(k)
        if stage == "generate":
            g, source, out = self.settings.generate, round_dir / "prompts.jsonl", round_dir / "pairs.parquet"
            out = self.shard_output(k, stage, key) if key else out
            # Each round draws other samples: the seed is offset by the round. The round's prompts.jsonl holds
            # modpo-pipe's own fields, whatever columns [run].prompts had.
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
            row: dict[str, Any] = {"id": r.id}
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
        outputs = {"prompts.jsonl": file_info(prompts_path),
                   "pairs.parquet": {**file_info(out), "rows": summary["rows"]}}
        return outputs, summary

    def _run_score(self, k: int, resume: bool, key: str) -> tuple[dict, dict]:
        from modpo_pipe.score import run_score

        settings, pairs, out = self.stage_job(k, "score")
        if self.settings.run.shards > 1:
            self.merge_shards(k, "score", key, out)
            summary = merged_summary(out)
        else:
            report = run_score(settings, pairs, out, progress=self.progress)
            summary = {"rows": report.pairs, "dropped_invalid_reward": getattr(report, "dropped_invalid_reward", 0),
                       "reward_mean": {n: s["mean"] for n, s in report.rewards.items()},
                       "reward_std": {n: s["std"] for n, s in report.rewards.items()}}
        outputs = {"scored.parquet": {**file_info(out), "rows": summary["rows"]}}
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
        files = tree_info(round_dir / "policy")
        outputs = {"policy": {"target": target, "fingerprint": tree_fingerprint(files), "files": files},
                   "metrics.jsonl": file_info(round_dir / "metrics.jsonl")}
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
                "long_prompts_dropped": counts.get("long_prompts_dropped"), "shards": meta.get("merged_shards")}
    return {"rows": rows, "dropped_invalid_reward": meta["score_counts"]["dropped_invalid_reward"],
            "reward_mean": {n: r["mean"] for n, r in meta["rewards"].items()},
            "reward_std": {n: r["std"] for n, r in meta["rewards"].items()}, "shards": meta.get("merged_shards")}


def metrics_summary(path: Path) -> dict[str, Any]:
    """Mean loss of the first and last epoch, and the last epoch's mean KL(pi_ref || pi) estimate."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        return {}
    first, last = records[0]["epoch"], records[-1]["epoch"]

    def in_epoch(epoch: int, key: str) -> list[float]:
        return [r[key] for r in records if r["epoch"] == epoch and key in r]

    return {"loss_first_epoch": statistics.fmean(in_epoch(first, "loss")),
            "loss": statistics.fmean(in_epoch(last, "loss")),
            "kl_k2": statistics.fmean(in_epoch(last, "kl_k2") or [float("nan")])}


def _diff(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(current))
    return [f"{key}: {_short(recorded.get(key))} -> {_short(current.get(key))}" for key in keys
            if recorded.get(key) != current.get(key)]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _headline(stage: str, summary: dict[str, Any]) -> str:
    if not summary:
        return ""
    if stage == "generate":
        return f"{summary['rows']} groups from {summary['prompts']} prompts"
    if stage == "score":
        return ", ".join(f"{n} mean {v:.4g}" for n, v in summary["reward_mean"].items())
    text = f"{summary['rows']} pairs, {summary['steps']} steps"
    if "loss" in summary:
        text += f", loss {summary['loss_first_epoch']:.4g} -> {summary['loss']:.4g}"
    if "kl_k2" in summary:  # (runs recorded before it replaced kl_proxy lack it)
        text += f", kl_k2 {summary['kl_k2']:.4g}"
    return text


# ------------------------------------------------------------------------------------------- invocation


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


@dataclass
class AdvanceReport:
    ran: list[str]  # stage names run by this invocation, in order
    due: str | None  # what the next invocation would run; None: every round is done
    rounds: int


def _log_stderr(message: str) -> None:
    print(f"{now()} {message}", file=sys.stderr, flush=True)


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


def advance(run_dir: Path, settings: Settings, *, max_stages: int | None = None, until: str | None = None,
            allow_config_change: bool = False, log: Callable[[str], None] = _log_stderr,
            progress: bool | None = None) -> AdvanceReport:
    """Run what is due in `run_dir`, stage by stage, holding its lock throughout.

    max_stages: run at most this many stages; until="round": stop once the round of the first due stage is
    trained. Raises LockHeld, ConfigChanged, or whatever a failing stage raised (after recording it);
    an OSError as a ModpoError."""
    with filesystem_errors(Path(run_dir)):
        return _advance(run_dir, settings, max_stages=max_stages, until=until,
                        allow_config_change=allow_config_change, log=log, progress=progress)


def _advance(run_dir: Path, settings: Settings, *, max_stages: int | None, until: str | None,
             allow_config_change: bool, log: Callable[[str], None], progress: bool | None) -> AdvanceReport:
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
        if any(s.changed for s in states):
            message = config_change_message(states)
            if not allow_config_change:
                raise ConfigChanged(message)
            log("--allow-config-change: " + message.splitlines()[0].replace("running now would redo", "redoing"))
        ran: list[str] = []
        target_round: int | None = None
        while True:
            due = next((s for s in states if not s.valid), None)
            if due is None:
                log(f"{run.dir}: all {settings.run.rounds} rounds done; nothing to do")
                return AdvanceReport(ran, None, settings.run.rounds)
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
               log: Callable[[str], None] = _log_stderr, progress: bool | None = None) -> str | None:
    """`run --shard I/N`: compute shard I of the generate or score stage the coordinating `run` opened (status
    `waiting`). Holds the run's lock only to read the manifest, then RUN/.lock-shard-I-of-N while it works.
    Returns the stage's name, or None when no stage waits for shards (nothing is touched then)."""
    with filesystem_errors(Path(run_dir)):
        return _work_shard(run_dir, settings, shard, log=log, progress=progress)


def _work_shard(run_dir: Path, settings: Settings, shard: tuple[int, int], *,
                log: Callable[[str], None], progress: bool | None) -> str | None:
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
        if any(s.changed for s in states):
            raise ConfigChanged(config_change_message(states))
        due = next((s for s in states if not s.valid), None)
        if due is None or due.status != "waiting" or due.record is None or due.inputs is None:
            log(f"shard {index}/{count}: nothing to do now; "
                + (f"next due: {due.name} ({due.status})" if due else "every round is done"))
            return None
        key = run.resume_key(due.round, due.stage, due.inputs)
        if due.record.get("resume_key") != key:  # opened with other settings: the coordinator reopens it
            log(f"shard {index}/{count}: {due.name} was opened with other settings; nothing to do until the "
                "coordinating `run` opens it again")
            return None
        stage_settings, source, out = run.stage_job(due.round, due.stage, key)
    with run_lock(run.dir, f".lock-shard-{shards.shard_name(shard).removesuffix('.parquet')}"):
        log(f"{due.name}: shard {index}/{count}: starting")
        started = time.time()
        if due.stage == "generate":
            from modpo_pipe.generate import run_generate

            report = run_generate(stage_settings, source, out, round_index=due.round, progress=run.progress,
                                  shard=shard)
        else:
            from modpo_pipe.score import run_score

            report = run_score(stage_settings, source, out, progress=run.progress, shard=shard)
        log(f"{due.name}: shard {index}/{count}: done in {time.time() - started:.1f}s ({report.pairs} groups in "
            f"{report.out})")
    return due.name


# ----------------------------------------------------------------------------------------------- status


def status(run_dir: Path, settings: Settings) -> dict[str, Any]:
    """Per round and stage: status, rows, wall time and headline metrics; read-only, takes no lock."""
    run = Run(run_dir, settings, progress=False)
    if not (run.dir / MANIFEST_NAME).exists() and not run.dir.exists():
        raise ModpoError(f"{run.dir}: no such run directory")
    manifest = Manifest.load(run.dir)
    held = lock_is_held(run.dir)
    states = run.survey(manifest, lock_held_elsewhere=held)
    rows = []
    for s in states:
        record = s.record or {}
        summary = record.get("summary", {}) if record.get("status") == "done" else {}
        rows.append({"round": s.round, "stage": s.stage, "status": s.status, "reason": s.reason,
                     "rows": summary.get("rows"), "seconds": record.get("seconds"),
                     "started": record.get("started"), "finished": record.get("finished"),
                     "summary": summary, "settings_changed": s.changed})
    due = next((s for s in states if not s.valid), None)
    rewards = {}
    for s in states:
        if s.stage == "score" and s.record and s.record.get("status") == "done":
            rewards[s.round] = s.record["summary"]["reward_mean"]
    return {"run_dir": str(run.dir), "rounds": settings.run.rounds, "running": held,
            "done": sum(s.valid for s in states), "stages": len(states),
            "next": due.name if due else None, "config_changed": any(s.changed for s in states),
            "table": rows, "reward_mean_by_round": rewards}


def format_status(report: dict[str, Any]) -> str:
    lines = [f"{report['run_dir']}: {report['rounds']} rounds, {report['done']}/{report['stages']} stages done"
             + ("; an invocation is running now" if report["running"] else "")
             + (f"; next: {report['next']}" if report["next"] else "; finished")]
    lines.append(f"{'round':<10} {'stage':<9} {'status':<8} {'rows':>6} {'wall':>8}  headline")
    for row in report["table"]:
        wall = f"{row['seconds']:.1f}s" if row["seconds"] is not None else "-"
        rows = str(row["rows"]) if row["rows"] is not None else "-"
        text = _headline(row["stage"], row["summary"]) if row["status"] == "done" else row["reason"]
        if row["stage"] == "generate" and row["status"] == "done":
            text = f"{row['summary'].get('prompts')} prompts"
        lines.append(f"{round_name(row['round']):<10} {row['stage']:<9} {row['status']:<8} {rows:>6} {wall:>8}  "
                     f"{text}")
    if report["reward_mean_by_round"]:
        names = sorted({n for means in report["reward_mean_by_round"].values() for n in means})
        lines.append("")
        lines.append("mean reward on each round's samples:")
        lines.append(f"{'round':<10} " + " ".join(f"{n:>12}" for n in names))
        for k, means in sorted(report["reward_mean_by_round"].items()):
            lines.append(f"{round_name(k):<10} " + " ".join(
                f"{means[n]:>12.4g}" if n in means else f"{'-':>12}" for n in names))
    if report["config_changed"]:
        lines.append("")
        lines.append("the settings differ from those finished stages ran with (see 'redo' rows); "
                     "`run` refuses unless --allow-config-change")
    return "\n".join(lines)
