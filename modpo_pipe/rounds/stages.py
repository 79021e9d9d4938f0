"""The stages of a round, in one table (`STAGE_TABLE`): what each reads and writes, how it runs, and how its
summary reads. Rounds run them in table order; `run` and `status` read their names, sections and headlines here.

No torch at import time: each stage imports its module when it runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modpo_pipe import storage
from modpo_pipe.rounds.layout import RoundLayout


def run_generate_stage(run: RoundLayout, k: int, resume: bool, key: str) -> tuple[dict, dict]:
    """Round k's prompts.jsonl (its slice of [run].prompts), then pairs.parquet: sampled, or merged from shards."""
    from modpo_pipe.generate import run_generate

    round_dir = run.round_dir(k)
    prompts_path = round_dir / "prompts.jsonl"
    lines = []
    for r in run.prompt_slice(k):
        row: dict[str, Any] = {"id": r.id, **r.columns}  # (no column is named id, prompt or messages)
        row.update({"messages": r.messages} if r.messages is not None else {"prompt": r.prompt})
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    storage.write_atomic(prompts_path, "".join(lines))
    settings, _, out = run.stage_job(k, "generate")
    if run.settings.run.shards > 1:
        run.merge_shards(k, "generate", key, out)
        summary = merged_summary(out)
    else:
        report = run_generate(settings, prompts_path, out, round_index=k, progress=run.progress)
        summary = {"rows": report.groups, "prompts": report.prompts, "backend": report.backend,
                   "long_prompts_dropped": report.long_prompts_dropped,
                   "response_tokens": report.response_tokens}
    outputs = {"prompts.jsonl": storage.file_info(prompts_path),
               "pairs.parquet": {**storage.file_info(out), "rows": summary["rows"]}}
    return outputs, summary


def run_score_stage(run: RoundLayout, k: int, resume: bool, key: str) -> tuple[dict, dict]:
    """Round k's scored.parquet: scored, or merged from shards."""
    from modpo_pipe.score import run_score

    settings, pairs, out = run.stage_job(k, "score")
    if run.settings.run.shards > 1:
        run.merge_shards(k, "score", key, out)
        summary = merged_summary(out)
    else:
        report = run_score(settings, pairs, out, progress=run.progress)
        summary = {"rows": report.groups, "dropped_invalid_reward": report.dropped_invalid_groups,
                   "dropped_invalid_responses": report.dropped_invalid_responses,
                   "reward_mean": {n: s["mean"] for n, s in report.rewards.items()},
                   "reward_std": {n: s["std"] for n, s in report.rewards.items()}}
    outputs = {"scored.parquet": {**storage.file_info(out), "rows": summary["rows"]}}
    return outputs, summary


def run_train_stage(run: RoundLayout, k: int, resume: bool, key: str) -> tuple[dict, dict]:
    """Round k's policy (train/final, or train/merged with LoRA) from its scored pairs and the replayed ones."""
    from modpo_pipe.train import train

    round_dir, t = run.round_dir(k), run.settings.train
    out = round_dir / "train"
    lora = t.lora_r > 0
    if resume and lora and (out / "final").exists() and not (out / "merged" / "config.json").is_file():
        # Killed between writing final/ and merged/: train's finished-run shortcut would skip the merge;
        # without final/ it reloads the last state and writes both.
        shutil.rmtree(out / "final")
    # The next round samples from full weights: with LoRA, always write the merged model.
    # The run's own tracker logs every round (track_stage): no tracker run per round.
    settings = dataclasses.replace(run.settings, train=dataclasses.replace(
        t, policy=run.sampling_policy(k), out=str(out), merge=lora or t.merge, report_to="none",
        reward_stats=str(run.stats_file()) if t.normalize == "zscore" else ""))
    scored = [run.round_dir(j) / "scored.parquet" for j in [k, *run.replay_rounds(k)]]
    report = train(settings, scored, out, progress=run.progress)
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


def generate_headline(summary: dict[str, Any]) -> str:
    return f"{summary['rows']} groups from {summary['prompts']} prompts" + shards_note(summary)


def generate_status(summary: dict[str, Any]) -> str:
    """As the headline, in a table whose rows column counts the groups already."""
    return f"{summary.get('prompts')} prompts" + shards_note(summary)


def score_headline(summary: dict[str, Any]) -> str:
    return ", ".join(f"{n} mean {v:.4g}" for n, v in summary["reward_mean"].items()) + shards_note(summary)


def train_headline(summary: dict[str, Any]) -> str:
    text = f"{summary['rows']} pairs, {summary['steps']} steps"
    if "loss_start" in summary:
        text += f", loss {summary['loss_start']:.4g} -> {summary['loss']:.4g} (first -> last {summary['loss_span']})"
    elif "loss_first_epoch" in summary:  # older records: epoch means, equal when there was one epoch
        text += f", loss {summary['loss_first_epoch']:.4g} -> {summary['loss']:.4g} (epoch means)"
    if "kl_k2" in summary:  # records without it hold no KL estimate that means the same
        text += f", kl_k2 {summary['kl_k2']:.4g}"
    return text


def shards_note(summary: dict[str, Any]) -> str:
    """A merged stage's workers: its own wall time is the coordinator's merge alone."""
    if not summary.get("shards"):
        return ""
    work = summary.get("shard_seconds")
    return f"; merged from {summary['shards']} shards" + (f", {work:.1f}s of work in them" if work is not None else "")


def clear_stage(run: RoundLayout, k: int, stage: str, fresh: bool) -> None:
    """Remove what a killed attempt may have left; with `fresh`, everything the stage writes. Directories
    are renamed away before they are deleted, so a kill mid-way never leaves half of one in place."""
    round_dir = run.round_dir(k)
    names = STAGE_TABLE[stage].writes
    for name in names:
        storage.remove_temps(round_dir, name)
    dirs = [f"{name}.parts" for name in names] + list(STAGE_TABLE[stage].work_dirs)
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
    run.remove_shards(k, stage)


# ------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Stage:
    """One stage of a round, as rounds, `run` and `status` know it."""

    name: str
    section: str  # the settings section it runs with (its `run` flags: --SECTION-KEY)
    reads: str | None  # the file of its own round it reads, written by the stage before it
    writes: tuple[str, ...]  # what it writes in its round directory, recorded as its outputs
    # directories a killed attempt's work is kept in (with NAME.parts/ of each written file) when it resumes
    work_dirs: tuple[str, ...]
    run: Callable[[RoundLayout, int, bool, str], tuple[dict[str, Any], dict[str, Any]]]  # -> outputs, summary
    headline: Callable[[dict[str, Any]], str]  # a done stage's summary in one line
    status_text: Callable[[dict[str, Any]], str]  # the same in `status`'s table


STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("generate", "generate", None, ("prompts.jsonl", "pairs.parquet"), (), run_generate_stage,
          generate_headline, generate_status),
    Stage("score", "score", "pairs.parquet", ("scored.parquet",), (), run_score_stage, score_headline,
          score_headline),
    Stage("train", "train", "scored.parquet", ("policy", "metrics.jsonl"), ("train",), run_train_stage,
          train_headline, train_headline),
)}
STAGES = tuple(STAGE_TABLE)


def headline(stage: str, summary: dict[str, Any]) -> str:
    return STAGE_TABLE[stage].headline(summary) if summary else ""
