"""Sharded stages: `generate` and `score` with `--shard I/N` compute a deterministic, disjoint slice of their
input's chunks and write it as one shard file; `modpo-pipe merge` joins the N shard files into the stage's
output: the rows an unsharded run writes, in the same order.

    generate prompts.jsonl --shard 1/3   ->  pairs.shards/00001-of-00003.parquet
    modpo-pipe merge pairs.shards        ->  pairs.parquet

Shard I takes chunks I, I+N, I+2N, ... of parts.chunk_ranges (the chunks of [generate|score].chunk_size that
make a run resumable), so shards need no coordination: any batch system can run them side by side, and each
is resumable on its own (its parts wait in a work directory beside its file). Chunk c's randomness depends on
c alone, so the rows do not depend on N. Indices are 0-based, like Slurm array and Kubernetes indexed-job
indices.

A shard file is an ordinary stage file whose metadata adds `shard`: its index and count, the chunks it holds
and their row counts, and `run`, the fingerprint of everything that decides the rows (the input, models,
settings and chunk size: parts.Parts' manifest, kept next to it). Shards of different runs never merge.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from modpo_pipe import reward_stats, schema, storage
from modpo_pipe.errors import ModpoError

Shard = tuple[int, int]  # (index, count)
SHARD_KEY = "shard"


def parse_shard(text: str) -> Shard:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ModpoError(f"--shard must be I/N with 0 <= I < N (0-based, e.g. $SLURM_ARRAY_TASK_ID/4); got {text!r}")
    return int(match[1]), int(match[2])


def shard_dir(out: Path) -> Path:
    """Where the shards of output `out` go: pairs.parquet -> pairs.shards/."""
    stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
    return out.with_name(stem + ".shards")


def shard_name(shard: Shard) -> str:
    return f"{shard[0]:05d}-of-{shard[1]:05d}.parquet"


def shard_path(out: Path, shard: Shard) -> Path:
    return shard_dir(out) / shard_name(shard)


def failure_path(out: Path, shard: Shard) -> Path:
    """Where a shard worker notes that its last attempt failed (hidden: merge and status read only shards)."""
    return shard_dir(out) / f".{shard_name(shard).removesuffix('.parquet')}.failed.json"


def record_failure(out: Path, shard: Shard, note: dict[str, Any]) -> None:
    path = failure_path(out, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, json.dumps(note) + "\n")


def clear_failure(out: Path, shard: Shard) -> None:
    failure_path(out, shard).unlink(missing_ok=True)


def failure(out: Path, shard: Shard) -> dict[str, Any] | None:
    """The note of the shard's last failed attempt; None if there is none (or it is unreadable: only a hint)."""
    try:
        note = json.loads(failure_path(out, shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def shard_info(shard: Shard, run: str, manifest: dict[str, Any], chunks: list[int], chunk_rows: list[int],
               n_chunks: int, seconds: float) -> dict[str, Any]:
    """The `shard` entry of a shard file's metadata; `seconds`: the worker's time for it (its last invocation),
    which the merged file sums, since the stage's own clock only saw the merge."""
    return {"index": shard[0], "count": shard[1], "run": run, "n_chunks": n_chunks, "chunks": chunks,
            "chunk_rows": chunk_rows, "manifest": manifest, "seconds": round(seconds, 3)}


def finished(path: Path, run: str) -> dict[str, Any] | None:
    """The metadata of `path` when it is a finished shard of this run (so a rerun has nothing to do)."""
    if not path.is_file():
        return None
    try:
        meta = schema.read_metadata(path)
    except ModpoError:
        return None
    return meta if meta.get(SHARD_KEY, {}).get("run") == run else None


# ------------------------------------------------------------------------------------------------- merge


@dataclass
class MergeReport:
    out: str
    stage: str
    shards: int
    rows: int


def shard_files(inputs: list[Path]) -> list[Path]:
    """The given files, and the *.parquet files in the given directories."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise ModpoError(f"{path}: no shard files (*.parquet) in it")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ModpoError(f"{path}: no such file or directory")
    return files


def default_output(inputs: list[Path]) -> Path:
    """pairs.shards/ -> pairs.parquet beside it; otherwise --out is needed."""
    if len(inputs) == 1 and inputs[0].is_dir() and inputs[0].name.endswith(".shards"):
        return inputs[0].with_name(inputs[0].name[: -len(".shards")] + ".parquet")
    raise ModpoError("give --out: the merged file's path (it is only implied for a single NAME.shards directory)")


def _check_set(files: list[Path], metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refuse anything but exactly one shard of each index of one run; return the shard entries."""
    infos = []
    for path, meta in zip(files, metas):
        info = meta.get(SHARD_KEY)
        if not isinstance(info, dict):
            raise ModpoError(f"{path}: not a shard file (written without --shard); nothing to merge")
        counts = meta.get("score_counts", {})
        if counts.get("on_invalid_reward") == "drop" and "dropped_invalid_responses" not in counts:
            raise ModpoError(f"{path}: scored by an older modpo-pipe, whose on_invalid_reward = \"drop\" dropped "
                             "whole groups where this one drops single responses; delete it and score that "
                             "shard again")
        infos.append(info)
    first, first_info = files[0], infos[0]
    for path, meta, info in zip(files[1:], metas[1:], infos[1:]):
        if meta.get("stage") != metas[0].get("stage"):
            raise ModpoError(f"{path} is a {meta.get('stage')!r} shard but {first} a {metas[0].get('stage')!r} one")
        if info["count"] != first_info["count"]:
            raise ModpoError(f"{path} is shard {info['index']}/{info['count']} but {first} is shard "
                             f"{first_info['index']}/{first_info['count']}: the shards of one run share N")
        if info["run"] != first_info["run"]:
            a, b = first_info.get("manifest", {}), info.get("manifest", {})
            differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)] or ["run"]
            raise ModpoError(f"{path} and {first} are shards of different runs (they differ in: "
                             f"{', '.join(differ)}); make every shard with the same input and settings")
    by_index: dict[int, Path] = {}
    for path, info in zip(files, infos):
        if info["index"] in by_index:
            raise ModpoError(f"shard {info['index']}/{info['count']} given twice: {by_index[info['index']]} and "
                             f"{path}")
        by_index[info["index"]] = path
    count = first_info["count"]
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        names = ", ".join(f"{i}/{count}" for i in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ModpoError(f"missing {len(missing)} of {count} shards: {names} (expected e.g. "
                         f"{files[0].parent / shard_name((missing[0], count))}); run them, then merge again")
    chunks = sorted(c for info in infos for c in info["chunks"])
    if chunks != list(range(first_info["n_chunks"])):
        raise ModpoError(f"the shards in {files[0].parent} do not hold every chunk exactly once (altered "
                         "metadata?); make them again")
    return infos


class DamagedShard(ModpoError):
    """A shard file that cannot be read whole; `path` names it (for `run` to set it aside and have its worker
    compute it again)."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = path


def _shard_metadata(path: Path) -> dict[str, Any]:
    path.open("rb").close()  # a file the machine will not let us read (EACCES...) is no damage: that error goes on
    try:
        return schema.read_metadata(path)
    except ModpoError as e:
        raise DamagedShard(path, str(e)) from None


def merge(inputs: list[Path], out: Path) -> MergeReport:
    """Join the N shards of one run into `out` (atomically), refusing missing, duplicate or mismatched ones."""
    files = shard_files(inputs)
    metas = [_shard_metadata(path) for path in files]
    infos = _check_set(files, metas)
    stage = metas[0]["stage"]
    pieces: dict[int, pa.Table] = {}  # chunk -> its rows
    origin: dict[int, Path] = {}
    for path, info in zip(files, infos):
        try:
            table = pq.read_table(path, **schema.PARQUET_READ)
        except (pa.ArrowInvalid, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:  # the machine's error, not the file's content
                raise
            raise DamagedShard(path, f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
        if table.num_rows != sum(info["chunk_rows"]):
            raise DamagedShard(path, f"{path}: holds {table.num_rows} rows, its metadata says "
                                     f"{sum(info['chunk_rows'])} (altered?); make the shard again")
        offset = 0
        for chunk, rows in zip(info["chunks"], info["chunk_rows"]):
            pieces[chunk], origin[chunk] = table.slice(offset, rows).replace_schema_metadata(None), path
            offset += rows
    ordered = [c for c in sorted(pieces) if pieces[c].num_rows]
    if not ordered:
        raise ModpoError(f"the {len(files)} shards hold no rows; nothing to merge")
    table = pa.concat_tables([pieces[c] for c in ordered])
    _refuse_duplicate_pairs(table, [(origin[c], pieces[c].num_rows) for c in ordered])
    metadata = merged_metadata(stage, metas, infos, table)
    schema.write_table(table, out, metadata)
    return MergeReport(str(out), stage, len(files), table.num_rows)


def _refuse_duplicate_pairs(table: pa.Table, spans: list[tuple[Path, int]]) -> None:
    if pc.count_distinct(table.column("group_id")).as_py() == table.num_rows:
        return
    seen: dict[str, Path] = {}
    group_ids = iter(table.column("group_id").to_pylist())
    for path, rows in spans:
        for _ in range(rows):
            pid = next(group_ids)
            if pid in seen:
                raise ModpoError(f"group_id {pid!r} is in {seen[pid]} and in {path}: the shards overlap")
            seen[pid] = path


def merged_metadata(stage: str, metas: list[dict[str, Any]], infos: list[dict[str, Any]],
                    table: pa.Table) -> dict[str, Any]:
    """Shard 0's metadata without the shard entry, with the counts summed and reward statistics recomputed
    over every row (as an unsharded run computes them)."""
    order = sorted(range(len(metas)), key=lambda k: infos[k]["index"])
    metas = [json.loads(json.dumps(metas[k])) for k in order]
    merged = {k: v for k, v in metas[0].items() if k != SHARD_KEY}
    merged["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    merged["merged_shards"] = len(metas)
    if all("seconds" in info for info in infos):  # (shards written before workers recorded it lack it)
        merged["shard_seconds"] = round(sum(info["seconds"] for info in infos), 3)
    n_chunks = infos[0]["n_chunks"]
    if stage == "pairs":
        counts = merged.setdefault("counts", {})
        counts["chunks"] = n_chunks
        counts["resumed_chunks"] = sum(m.get("counts", {}).get("resumed_chunks", 0) for m in metas)
    elif stage == "scored":
        counts = merged.setdefault("score_counts", {})
        for key in ("groups_in", "groups_out", "dropped_invalid_reward", "dropped_invalid_responses",
                    "resumed_parts"):
            counts[key] = sum(m.get("score_counts", {}).get(key, 0) for m in metas)
        counts["invalid_by_reward"] = {name: sum(m["score_counts"]["invalid_by_reward"].get(name, 0) for m in metas)
                                       for name in counts.get("invalid_by_reward", {})}
        counts["truncated_by_reward"] = {name: sum(m["score_counts"].get("truncated_by_reward", {}).get(name, 0)
                                                   for m in metas)
                                         for name in metas[0]["score_counts"].get("truncated_by_reward", {})}
        counts["chunks"] = n_chunks
        for name, stats in reward_stats.measure(table, list(merged["rewards"])).items():
            merged["rewards"][name].update(stats)
    return merged
