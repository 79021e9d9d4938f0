"""A run directory advanced stage by stage: what each finished stage is compared against (its recorded settings,
inputs and outputs), the survey of what is due, and the running of one stage (stages.STAGE_TABLE)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from modpo_pipe import runstate, storage
from modpo_pipe.errors import ModpoError
from modpo_pipe.roles import legacy_key_settings, recorded_settings, resume_free_names, work_settings
from modpo_pipe.rounds.layout import RoundLayout, ShardsPending
from modpo_pipe.rounds.stages import STAGE_TABLE, STAGES, clear_stage, headline
from modpo_pipe.runstate import Manifest, StageState, json_normal, now, round_name, settings_diff


def error_text(e: BaseException) -> str:
    """How a manifest records a failure: the exception's type and first line, capped."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _count(value: Any) -> int:
    """A count from the manifest, which a person may have edited: what does not read as one counts as 1."""
    try:
        return max(1, int(value))
    except (TypeError, ValueError, OverflowError):
        return 1


class Run(RoundLayout):
    """A run directory and the settings it is advanced with: its rounds' layout (RoundLayout), what a finished
    stage is compared against, the survey of every stage, and the running of the one due."""

    def stage_settings(self, k: int, stage: str) -> dict[str, Any]:
        """Everything outside the run directory that a stage's result depends on, keyed for messages."""
        s, section = self.settings, STAGE_TABLE[stage].section
        out = {f"model.{key}": value for key, value in recorded_settings(s.model, by_run=True).items()}
        out.update({f"{section}.{key}": value
                    for key, value in recorded_settings(getattr(s, section), by_run=True).items()})
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
        reads = STAGE_TABLE[stage].reads
        if reads is None:
            return policy_input
        upstream = STAGES[STAGES.index(stage) - 1]
        if stage == "score":
            inputs = {f"{round_name(k)}/{reads}": output(k, upstream, reads)}
            return {**inputs, **(policy_input if self.settings.run.reference == "previous" else {})}
        statistics = [0] if self.settings.train.normalize == "zscore" else []  # Run.stats_file
        scored = {f"{round_name(j)}/{reads}": output(j, upstream, reads)
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
        clear_stage(self, k, stage, fresh=not resume)
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
                outputs, summary = STAGE_TABLE[stage].run(self, k, resume, key)
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
        self.remove_shards(k, stage)
        log(f"{st.name}: done in {record['seconds']:.1f}s ({headline(stage, summary)})")
        return record

    def resume_key(self, k: int, stage: str, inputs: dict[str, Any] | None) -> str:
        """What a killed attempt's work was made with: the settings its result depends on, its inputs, and what
        the stage's own work directory records besides (generate's and score's chunk size, generate's prompt
        limit, the dtype [model].dtype resolves to on this host's device; train's global batch). A killed
        attempt is continued only under the same key. Batch sizes, save and log intervals are left out: lowering
        a batch size after an out-of-memory kill, or saving more often, must not throw finished work away."""
        from modpo_pipe import models  # here: this module stays light (no torch) for run's lock and --help

        s, section = self.settings, getattr(self.settings, STAGE_TABLE[stage].section)
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
        fields = legacy_key_settings(getattr(self.settings, STAGE_TABLE[stage].section))
        return storage.json_fingerprint({"stage": stage, "round": k, "section": fields,
                                         "model": legacy_key_settings(self.settings.model), "inputs": inputs,
                                         "settings": self.stage_settings(k, stage)})

    def attempt_key(self, k: int, stage: str, inputs: dict[str, Any] | None, recorded: str | None) -> str:
        """The key an attempt runs under: resume_key, or the `recorded` one when it is the legacy key of the
        same settings, so that a stage killed or waiting for shards across an upgrade keeps its work (its shard
        directory is named by its key)."""
        key = self.resume_key(k, stage, inputs)
        if recorded not in (None, key) and recorded == self.legacy_resume_key(k, stage, inputs):
            return recorded
        return key
