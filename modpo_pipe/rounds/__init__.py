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
scoring, logging and saving intervals, vLLM memory knobs) are not compared: each setting's declaration in
config.py says which (roles.py).

Shards ([run].shards = N > 1): the plain `run` (the coordinator) opens a round's generate or score stage and
leaves it `waiting`; `run --shard I/N` workers (cron on several hosts sharing the run directory, a Slurm
array, Kubernetes jobs) each compute shard I of the opened stage into round-k/pairs-KEY.shards/ (KEY: the
stage's resume key, so shards made with other settings never mix in), holding only their own
.lock-shard-I-of-N while they work. The coordinator's next invocation merges the N shards (shards.py) and
marks the stage done; training stays with the coordinator. The rows do not depend on N.

The package, from the top: advance.py (the entry points `advance`, `work_shard`, `share_stages`, and what they
share), run.py (`Run`: what a finished stage is compared against, the survey of what is due, the running of
one stage), stages.py (the table of stages: what each reads, writes and runs), layout.py (what each round
reads and writes, where shard workers write). The lock, the manifest and its records live in runstate.py,
durable files and fingerprints in storage.py, the status view in status.py.

No torch at import time: a second invocation that finds the lock held exits in well under a second.
"""

from modpo_pipe.rounds.advance import (
    EXIT_CONFIG_CHANGED,
    EXIT_FAILURE,
    EXIT_LOCKED,
    EXIT_OK,
    AdvanceReport,
    ConfigChanged,
    GaveUp,
    advance,
    config_change_message,
    share_stages,
    work_shard,
)
from modpo_pipe.rounds.layout import SHARDED_OUTPUTS, RoundLayout, ShardsPending, check_run_settings
from modpo_pipe.rounds.run import Run
from modpo_pipe.rounds.stages import STAGE_TABLE, STAGES, Stage, headline, merged_summary, metrics_summary, shards_note
from modpo_pipe.runstate import round_name

__all__ = [
    "EXIT_CONFIG_CHANGED", "EXIT_FAILURE", "EXIT_LOCKED", "EXIT_OK", "SHARDED_OUTPUTS", "STAGES", "STAGE_TABLE",
    "AdvanceReport", "ConfigChanged", "GaveUp", "RoundLayout", "Run", "ShardsPending", "Stage", "advance",
    "check_run_settings", "config_change_message", "headline", "merged_summary", "metrics_summary", "round_name",
    "share_stages", "shards_note", "work_shard",
]
