"""Reading scored files into TrainingGroups: the checks that make several files one training set (same rewards,
reference and tokenizer), each response's weighted reward, and the pairs of every group. Only the columns
training needs are read (no text), and token ids stay in Arrow."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from modpo_pipe import reward_stats, schema
from modpo_pipe.config import TrainSettings
from modpo_pipe.errors import ModpoError
from modpo_pipe.losses import normalise_weights, zscore
from modpo_pipe.train.data import TOKEN_COLUMNS, TokenLists, TrainingGroups, group_pairs


@dataclass
class Target:
    """What the first file fixes for every file: reward names, normalised weights, z-score statistics."""

    names: list[str]
    meta: dict[str, Any]  # the first file's metadata
    weights: torch.Tensor  # (K,) in the order of names
    stats: reward_stats.RewardStats | None


@dataclass
class FileGroups:
    """One scored file's groups that keep a pair, and what was dropped from it."""

    group_ids: list[str]
    prompts: pa.ChunkedArray  # per group
    responses: pa.ChunkedArray  # per response
    sizes: torch.Tensor  # responses per group
    ref_logps: torch.Tensor  # per response
    scores: torch.Tensor  # per response
    first: list[torch.Tensor]  # per group, response indices counted over every file
    second: list[torch.Tensor]
    pair_counts: list[int]  # per group
    responses_kept: int
    dropped_identical: int
    tied: int  # max-min groups whose responses all have the same weighted reward
    fingerprint: str
    max_token_id: int
    longest: int


def load_training_groups(paths: list[Path], weights: dict[str, float], normalize: str,
                         stats_path: Path | None = None, pairing: str = "all") -> TrainingGroups:
    """Read scored files, compute each response's weighted reward, pair the responses of every group
    (`pairing`), drop pairs of identical responses and groups left without a pair.

    With normalize = "zscore", every file's rewards are standardised with ONE set of statistics: those stored
    in `stats_path` when given, else the first file's. Per-file statistics would put pairs of different files
    (rounds, replay) on different scales in one loss, and move the optimum with every file."""
    import pyarrow.parquet as pq

    if not paths:
        raise ModpoError("train needs at least one scored file")
    group_file: dict[str, Path] = {}  # each group kept, in order, and the file it came from
    files: list[FileGroups] = []
    target: Target | None = None
    for path in paths:
        meta = read_scored_meta(path)
        file_names = schema.reward_names_of(pq.read_schema(path))
        for key in ("rewards", "tokenizer_fingerprint"):
            schema.metadata_key(meta, key, path)
        if target is None:
            target = first_file_target(path, meta, file_names, weights, normalize, stats_path)
        elif sorted(file_names) != sorted(target.names):
            raise ModpoError(f"{path}: rewards {file_names} differ from {paths[0]}'s {target.names}")
        else:
            same_scorers(meta, target.meta, target.names, path, paths[0])
        if meta["tokenizer_fingerprint"] != target.meta["tokenizer_fingerprint"]:
            raise ModpoError(f"{path}: tokenised with another tokenizer than {paths[0]}")
        kept = read_file_groups(path, target, pairing, offset=sum(f.responses_kept for f in files))
        for group_id in kept.group_ids:
            if group_id in group_file:
                raise ModpoError(
                    f"{path}: group {group_id!r} is in {group_file[group_id]} too: the same groups given twice"
                    + (" (or prompts without ids in both, numbered row-NNNNNN in each: give them ids)"
                       if "/row-" in group_id or group_id.startswith("row-") else ""))
            group_file[group_id] = path
        files.append(kept)
    assert target is not None
    check_some_pairs(files)
    pa.default_memory_pool().release_unused()  # what reading needed beyond the columns kept
    return concatenate(files, target, pairing)


def first_file_target(path: Path, meta: dict[str, Any], names: list[str], weights: dict[str, float],
                      normalize: str, stats_path: Path | None) -> Target:
    try:
        w = normalise_weights(weights or dict.fromkeys(names, 1.0), names)
    except ValueError as e:
        raise ModpoError(f"--weights / [train].weights: {e} (file {path})") from None
    stats = None
    if normalize == "zscore":
        source = stats_path or path
        stats_meta = read_scored_meta(source) if stats_path else meta
        if stats_path:
            same_scorers(stats_meta, meta, names, source, path, reference=False)
        stats = reward_stats.from_metadata(stats_meta, names, source)
    return Target(names=names, meta=meta, weights=w, stats=stats)


def read_file_groups(path: Path, target: Target, pairing: str, offset: int) -> FileGroups:
    """The groups of one file that keep a pair; `offset`: the responses kept from the files before it."""
    import pyarrow.compute as pc

    numbers = [schema.reward_column(n) for n in target.names] + [schema.REF_COLUMN[0]]
    table, meta = schema.read_columns(path, "scored", ["group_id", *TOKEN_COLUMNS, *numbers])
    check_finite(table, numbers, path)
    max_token_id = max(pc.max(pc.list_flatten(table.column("prompt_ids"))).as_py() or 0,
                       pc.max(pc.list_flatten(flat(table.column("response_ids")))).as_py() or 0)
    longest = pc.max(schema.sequence_lengths(table)[0]).as_py() or 0
    score = weighted_scores(table, target)  # (responses,): a pair's teacher margin is a difference of two
    ref = torch.tensor(flat(table.column(schema.REF_COLUMN[0])).to_numpy())
    size = torch.tensor(pc.list_value_length(table.column("response_ids")).to_numpy(), dtype=torch.int64)
    start = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), size]), 0)
    first: list[torch.Tensor] = []
    second: list[torch.Tensor] = []
    pair_counts: list[int] = []
    keep_group: list[bool] = []
    dropped = tied = 0
    row = 0
    for batch in table.select(["response_ids"]).to_batches(max_chunksize=8192):
        for ids in batch.column(0).to_pylist():
            a = int(start[row])
            pairs, same = group_pairs(ids, score[a: a + len(ids)].tolist(), pairing)
            dropped += same
            tied += pairing == "max-min" and not pairs and not same
            keep_group.append(bool(pairs))
            if pairs:
                first.append(torch.tensor([i for i, _ in pairs]) + offset)
                second.append(torch.tensor([j for _, j in pairs]) + offset)
                pair_counts.append(len(pairs))
                offset += len(ids)
            row += 1
    keep = torch.tensor(keep_group, dtype=torch.bool)
    keep_response = torch.repeat_interleave(keep, size)
    rows = table.filter(pa.array(keep_group)) if not all(keep_group) else table
    return FileGroups(
        group_ids=rows.column("group_id").to_pylist(), prompts=rows.column("prompt_ids"),
        responses=flat(rows.column("response_ids")), sizes=size[keep], ref_logps=ref[keep_response],
        scores=score[keep_response], first=first, second=second, pair_counts=pair_counts,
        responses_kept=int(size[keep].sum()), dropped_identical=dropped, tied=tied,
        fingerprint=f"{meta['created']}:{table.num_rows}:{meta.get('ref', {}).get('fingerprint')}",
        max_token_id=max_token_id, longest=longest)


def weighted_scores(table: pa.Table, target: Target) -> torch.Tensor:
    """(responses,) each response's weighted (and, with statistics, z-scored) reward."""
    names, stats = target.names, target.stats
    rewards = torch.tensor(np.stack([flat(table.column(schema.reward_column(n))).to_numpy() for n in names])).T
    if stats is not None:
        mean = torch.tensor([stats.mean[n] for n in names])
        # A reward that cannot be scaled (std 0, NaN or tiny) gets std 0: zscore makes it constant.
        std = torch.tensor([0.0 if n in stats.constant else stats.std[n] for n in names])
        rewards = zscore(rewards, mean, std)
    return rewards @ target.weights


def check_some_pairs(files: list[FileGroups]) -> None:
    if any(f.group_ids for f in files):
        return
    tied = sum(f.tied for f in files)
    if tied:
        raise ModpoError(f"no pairs left to train on: in {tied} groups every response has the same weighted reward, "
                         "and max-min pairs a highest with a lower one (a constant reward, or all weight on one): "
                         "check [train].weights, or pair them all ([train].pairs = all)")
    dropped = sum(f.dropped_identical for f in files)
    raise ModpoError(f"no pairs left to train on ({dropped} had identical responses): a policy that samples "
                     "one reply per prompt has collapsed; a lower [train].lr or a higher [train].beta avoids it")


def concatenate(files: list[FileGroups], target: Target, pairing: str) -> TrainingGroups:
    zero = torch.zeros(1, dtype=torch.int64)
    pair_counts = [count for f in files for count in f.pair_counts]
    return TrainingGroups(
        group_ids=[group_id for f in files for group_id in f.group_ids],
        prompt_ids=TokenLists([f.prompts for f in files]),
        response_ids=TokenLists([f.responses for f in files]),
        response_start=torch.cumsum(torch.cat([zero, *(f.sizes for f in files)]), 0),
        ref_logps=torch.cat([f.ref_logps for f in files]).float(),
        scores=torch.cat([f.scores for f in files]).float(),
        first=torch.cat([x for f in files for x in f.first]).long(),
        second=torch.cat([x for f in files for x in f.second]).long(),
        pair_start=torch.cumsum(torch.cat([zero, torch.tensor(pair_counts, dtype=torch.int64)]), 0),
        reward_names=target.names,
        weights={n: float(x) for n, x in zip(target.names, target.weights)},
        dropped_identical=sum(f.dropped_identical for f in files),
        meta=target.meta,
        fingerprints=[f.fingerprint for f in files],
        stats=target.stats,
        max_token_ids=[f.max_token_id for f in files],
        pairing=pairing,
        longest=[f.longest for f in files],
    )


def read_scored_meta(path: Path) -> dict[str, Any]:
    """A scored file's validated metadata (a whole file, not one shard of one)."""
    import pyarrow.parquet as pq

    schema.read_metadata(path)  # a readable modpo-pipe file
    meta = schema.validate_schema(pq.read_schema(path), "scored", str(path))
    if "shard" in meta:  # its reward statistics are the shard's own, not the run's
        raise ModpoError(f"{path} is one shard of a scored file: join the shards first (modpo-pipe merge "
                         f"{path.parent})")
    return meta


def flat(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A list column's items, chunk by chunk (no copy of the token ids)."""
    import pyarrow.compute as pc

    return pa.chunked_array([pc.list_flatten(chunk) for chunk in column.chunks], column.type.value_type)


def same_scorers(meta: dict[str, Any], other: dict[str, Any], names: list[str], path: Path, other_path: Path,
                 reference: bool = True) -> None:
    """Two scored files trained on together: the same reward model behind every name, and (`reference`) the same
    reference: one loss mixing two would aim at no one target. The file whose statistics z-score the rewards
    needs only the reward models."""
    for name in names:
        if name not in meta["rewards"]:
            raise ModpoError(f"{path}: holds no reward {name!r}; it was scored with the rewards "
                             f"{sorted(meta['rewards'])}")
        mine, theirs = meta["rewards"][name], other["rewards"].get(name, {})
        if mine.get("fingerprint") != theirs.get("fingerprint"):
            raise ModpoError(f"{path}: reward {name!r} was scored with {mine.get('spec')!r}, in {other_path} with "
                             f"{theirs.get('spec')!r} (other contents): one name, two reward models")
    mine, theirs = meta.get("ref", {}), other.get("ref", {})
    if reference and mine.get("fingerprint") != theirs.get("fingerprint"):
        raise ModpoError(f"{path}: scored against the reference {mine.get('path')!r}, {other_path} against "
                         f"{theirs.get('path')!r} (other contents): their log-ratios measure from two references")


def check_finite(table: Any, columns: list[str], path: Path) -> None:
    """Never train on NaN: a non-finite reward or reference log-prob names its file, row, response and
    column."""
    import pyarrow.compute as pc

    for col in columns:
        column = table.column(col).combine_chunks()
        values = pc.list_flatten(column)
        bad = pc.invert(pc.is_finite(values))
        if pc.any(bad).as_py():
            at = bad.to_pylist().index(True)
            row = pc.list_parent_indices(column)[at].as_py()
            j = at - column.offsets[row].as_py()
            raise ModpoError(f"{path}: row {row} (group {table.column('group_id')[row].as_py()!r}) response "
                             f"{j + 1}: {col} is {values[at].as_py()}; rescore the groups")


def check_vocabulary(paths: list[Path], data: TrainingGroups, vocab_size: int) -> None:
    """Refuse token ids the policy's vocabulary lacks (an IndexError deep inside the model otherwise); the
    offending file is read again only to name the row."""
    for path, top in zip(paths, data.max_token_ids):
        if top >= vocab_size:
            table, _ = schema.read_columns(path, "scored", ["group_id", *TOKEN_COLUMNS])
            schema.check_token_ids(table, vocab_size, str(path))
            raise ModpoError(f"{path}: holds token id {top} >= vocab size {vocab_size}")


def check_context(paths: list[Path], data: TrainingGroups, policy: str, context: int | None) -> None:
    """Refuse a prompt + response longer than the policy's context window (its log-probs there mean nothing, and
    the gap to the cached reference's would be trained on); the offending file is read again to name the group."""
    for path, longest in zip(paths, data.longest):
        if context is not None and longest > context:
            table, _ = schema.read_columns(path, "scored", ["group_id", *TOKEN_COLUMNS])
            schema.check_context(table, context, str(path), f"the policy {policy}")


def target_record(data: TrainingGroups, t: TrainSettings) -> dict[str, Any]:
    """What the policy is trained toward, pi_ref * exp(r_w / beta): for metrics.jsonl and modpo_pipe.json."""
    return {"beta": t.beta, "weights": data.weights, "loss": t.loss, "normalize": t.normalize,
            "reward_stats": data.stats.as_record() if data.stats else None}


def warn_unusable_stats(stats: reward_stats.RewardStats | None) -> None:
    for name, why in (stats.constant.items() if stats else ()):
        print(f"WARNING: reward {name!r}: {why} (statistics from {stats.source}); it contributes nothing to the "
              f"teacher margin", file=sys.stderr)
