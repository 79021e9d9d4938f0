"""Stage 3, scored.parquet -> checkpoint: regress the policy's implicit reward margin onto the weighted
reward margin. The reference model is never loaded: its log-probs come from the scored files.

Read `train()` top to bottom: data, model, optimizer, then one loop. Output directory:
    OUT/final/          the trained policy (full weights, or the LoRA adapter), safetensors only
    OUT/merged/         with LoRA and --merge: base + adapter merged into full weights
    OUT/state/          resumable state (weights, optimizer moments, step), safetensors + JSON
    OUT/metrics.jsonl   one line per logging step

Several processes (`accelerate launch -m modpo_pipe train ...`, or `--num-processes N`) train data-parallel:
an optimizer step takes batch_size * grad_accum * processes groups (prompts, each with its N responses and the
pairs formed from them), each process computes the gradient of its own share of them, the gradients are
averaged, and only the main process writes files. One process without a launcher is the same loop with nothing
distributed.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from modpo_pipe import modelcard, models, reward_stats, schema, storage, tracking
from modpo_pipe.config import Settings, TrainSettings, choices
from modpo_pipe.errors import ModpoError, out_of_memory
from modpo_pipe.logprobs import build_batch, sequence_logps
from modpo_pipe.losses import (
    kl_k2,
    margin_stats,
    normalise_weights,
    pair_loss,
    zscore,
)
from modpo_pipe.prompts import is_hub_id
from modpo_pipe.roles import recorded_settings

# Policy log-probs on the first batch must equal the cached ref_logp when the policy is the reference; a
# larger gap means tokenisation, precision or model drift between score and train. The tolerance is per compute
# dtype, on a sequence's |gap| / sqrt(its response tokens): rounding errors of independent tokens add up like a
# random walk. float32 shows batch-shape rounding only. In bfloat16, full fine-tuning runs float32 master
# weights under autocast against a reference scored with bfloat16 weights, so the residual stream is rounded
# differently: measured on CPU (tests/test_numerics.py, tiny Llama, replies of <= 16 tokens) 0.041 at most
# (a gap of 0.058 nats); LoRA (a bfloat16 base, as scored) measured 0. The bf16 tolerance is about 3x that;
# benchmarks/gpu_check.py reports the same quantity on a GPU for SmolLM2-135M's shape.
REF_GAP_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.12}  # nats / sqrt(response tokens)


class TokenLists(Sequence):
    """Token-id lists held in Arrow, 4 bytes a token (as Python ints they take about ten times that), so that
    10^6 pairs fit in memory; item i is a list of ints."""

    def __init__(self, columns: list[pa.ChunkedArray]):
        self.chunks = [chunk for column in columns for chunk in column.chunks if len(chunk)]
        self.starts = list(itertools.accumulate((len(chunk) for chunk in self.chunks), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        c = bisect.bisect_right(self.starts, i) - 1
        return self.chunks[c][i - self.starts[c]].as_py()

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.chunks:
            yield from chunk.to_pylist()

    def __add__(self, other: Sequence[list[int]]) -> list[list[int]]:
        return list(self) + list(other)

    def __mul__(self, times: int) -> list[list[int]]:
        return list(self) * times


@dataclass
class TrainingGroups:
    """The groups train learns from, flattened: response r of the file order sits at index r of the
    per-response tensors, group g's responses are response_start[g] : response_start[g + 1], and its pairs
    pair_start[g] : pair_start[g + 1] (first and second hold response indices). A pair's teacher margin is the
    difference of two per-response weighted rewards, so every response carries one number, whatever the
    number of pairs it appears in; its policy log-prob is computed once per step the same way."""

    group_ids: list[str]
    prompt_ids: TokenLists  # per group
    response_ids: TokenLists  # per response
    response_start: torch.Tensor  # (G + 1,) int64
    ref_logps: torch.Tensor  # (R,)
    scores: torch.Tensor  # (R,) weighted (normalised) reward per response
    first: torch.Tensor  # (P,) int64 response index of each pair's y1
    second: torch.Tensor  # (P,) its y2
    pair_start: torch.Tensor  # (G + 1,) int64
    reward_names: list[str]
    weights: dict[str, float]  # normalised
    dropped_identical: int  # candidate pairs of two responses with identical ids (no signal)
    meta: dict[str, Any]  # the first file's metadata
    fingerprints: list[str]  # one per input file, for the resume check
    stats: reward_stats.RewardStats | None = None  # the z-score statistics of every file (None: normalize = "none")
    max_token_ids: list[int] = dataclasses.field(default_factory=list)  # per input file
    pairing: str = "all"
    longest: list[int] = dataclasses.field(default_factory=list)  # per input file: most prompt + response tokens

    def __len__(self) -> int:
        """Groups: the unit steps and micro-batches are made of."""
        return len(self.group_ids)

    @property
    def pairs(self) -> int:
        return len(self.first)

    @property
    def teacher(self) -> torch.Tensor:
        """(P,) the weighted reward margin of every pair."""
        return self.scores[self.first] - self.scores[self.second]


TOKEN_COLUMNS = ("prompt_ids", "response_ids")
PAIRINGS = choices("train", "pairs")


def group_pairs(ids: list[list[int]], scores: list[float], pairing: str) -> tuple[list[tuple[int, int]], int]:
    """The pairs (i, j) one group of responses gives, and how many candidate pairs were dropped for identical
    response ids. all: every i < j; disjoint: (0, 1), (2, 3), ... (an odd last response is left out); max-min:
    the highest against the lowest weighted reward (first of ties), none when they are equal."""
    if pairing == "all":
        candidates = list(itertools.combinations(range(len(ids)), 2))
    elif pairing == "disjoint":
        candidates = [(2 * k, 2 * k + 1) for k in range(len(ids) // 2)]
    elif pairing == "max-min":
        high = max(range(len(scores)), key=lambda i: (scores[i], -i))
        low = min(range(len(scores)), key=lambda i: (scores[i], i))
        candidates = [(high, low)] if scores[high] > scores[low] else []
    else:
        raise ModpoError(f"[train].pairs must be one of {', '.join(PAIRINGS)}; got {pairing!r}")
    kept = [(i, j) for i, j in candidates if ids[i] != ids[j]]
    return kept, len(candidates) - len(kept)


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


def load_training_groups(paths: list[Path], weights: dict[str, float], normalize: str,
                         stats_path: Path | None = None, pairing: str = "all") -> TrainingGroups:
    """Read scored files, compute each response's weighted reward, pair the responses of every group
    (`pairing`), drop pairs of identical responses and groups left without a pair. Only the columns training
    needs are read (no text), and token ids stay in Arrow.

    With normalize = "zscore", every file's rewards are standardised with ONE set of statistics: those stored
    in `stats_path` when given, else the first file's. Per-file statistics would put pairs of different files
    (rounds, replay) on different scales in one loss, and move the optimum with every file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not paths:
        raise ModpoError("train needs at least one scored file")
    group_file: dict[str, Path] = {}  # each group kept, in order, and the file it came from
    prompts: list[pa.ChunkedArray] = []
    responses: list[pa.ChunkedArray] = []
    sizes: list[torch.Tensor] = []
    refs, scores, firsts, seconds, pair_counts, fingerprints, max_ids, longest = [], [], [], [], [], [], [], []
    names: list[str] | None = None
    first_meta: dict[str, Any] = {}
    stats: reward_stats.RewardStats | None = None
    w = None
    dropped = tied = 0
    offset = 0  # responses kept before this file
    for path in paths:
        meta = read_scored_meta(path)
        file_names = schema.reward_names_of(pq.read_schema(path))
        for key in ("rewards", "tokenizer_fingerprint"):
            schema.metadata_key(meta, key, path)
        if names is None:
            names, first_meta = file_names, meta
            try:
                w = normalise_weights(weights or dict.fromkeys(names, 1.0), names)
            except ValueError as e:
                raise ModpoError(f"--weights / [train].weights: {e} (file {path})") from None
            if normalize == "zscore":
                source = stats_path or path
                stats_meta = read_scored_meta(source) if stats_path else meta
                if stats_path:
                    same_scorers(stats_meta, meta, names, source, path, reference=False)
                stats = reward_stats.from_metadata(stats_meta, names, source)
        elif sorted(file_names) != sorted(names):
            raise ModpoError(f"{path}: rewards {file_names} differ from {paths[0]}'s {names}")
        else:
            same_scorers(meta, first_meta, names, path, paths[0])
        if meta["tokenizer_fingerprint"] != first_meta["tokenizer_fingerprint"]:
            raise ModpoError(f"{path}: tokenised with another tokenizer than {paths[0]}")
        numbers = [schema.reward_column(n) for n in names] + [schema.REF_COLUMN[0]]
        table, meta = schema.read_columns(path, "scored", ["group_id", *TOKEN_COLUMNS, *numbers])
        check_finite(table, numbers, path)
        max_ids.append(max(pc.max(pc.list_flatten(table.column("prompt_ids"))).as_py() or 0,
                           pc.max(pc.list_flatten(flat(table.column("response_ids")))).as_py() or 0))
        longest.append(pc.max(schema.sequence_lengths(table)[0]).as_py() or 0)
        rewards = torch.tensor(np.stack([flat(table.column(schema.reward_column(n))).to_numpy() for n in names])).T
        if stats is not None:
            mean = torch.tensor([stats.mean[n] for n in names])
            # A reward that cannot be scaled (std 0, NaN or tiny) gets std 0: zscore makes it constant.
            std = torch.tensor([0.0 if n in stats.constant else stats.std[n] for n in names])
            rewards = zscore(rewards, mean, std)
        score = rewards @ w  # (responses,) the weighted reward: a pair's teacher margin is a difference of two
        ref = torch.tensor(flat(table.column(schema.REF_COLUMN[0])).to_numpy())
        size = torch.tensor(pc.list_value_length(table.column("response_ids")).to_numpy(), dtype=torch.int64)
        start = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), size]), 0)
        keep_group: list[bool] = []
        row = 0
        for batch in table.select(["response_ids"]).to_batches(max_chunksize=8192):
            for ids in batch.column(0).to_pylist():
                a = int(start[row])
                pairs, same = group_pairs(ids, score[a: a + len(ids)].tolist(), pairing)
                dropped += same
                tied += pairing == "max-min" and not pairs and not same
                keep_group.append(bool(pairs))
                if pairs:
                    firsts.append(torch.tensor([i for i, _ in pairs]) + offset)
                    seconds.append(torch.tensor([j for _, j in pairs]) + offset)
                    pair_counts.append(len(pairs))
                    offset += len(ids)
                row += 1
        keep = torch.tensor(keep_group, dtype=torch.bool)
        keep_response = torch.repeat_interleave(keep, size)
        rows = table.filter(pa.array(keep_group)) if not all(keep_group) else table
        for group_id in rows.column("group_id").to_pylist():
            if group_id in group_file:
                raise ModpoError(
                    f"{path}: group {group_id!r} is in {group_file[group_id]} too: the same groups given twice"
                    + (" (or prompts without ids in both, numbered row-NNNNNN in each: give them ids)"
                       if "/row-" in group_id or group_id.startswith("row-") else ""))
            group_file[group_id] = path
        prompts.append(rows.column("prompt_ids"))
        responses.append(flat(rows.column("response_ids")))
        sizes.append(size[keep])
        refs.append(ref[keep_response])
        scores.append(score[keep_response])
        fingerprints.append(f"{meta['created']}:{table.num_rows}:{meta.get('ref', {}).get('fingerprint')}")
    group_ids = list(group_file)
    if not group_ids and tied:
        raise ModpoError(f"no pairs left to train on: in {tied} groups every response has the same weighted reward, "
                         "and max-min pairs a highest with a lower one (a constant reward, or all weight on one): "
                         "check [train].weights, or pair them all ([train].pairs = all)")
    if not group_ids:
        raise ModpoError(f"no pairs left to train on ({dropped} had identical responses): a policy that samples "
                         "one reply per prompt has collapsed; a lower [train].lr or a higher [train].beta avoids it")
    assert names is not None and w is not None
    pa.default_memory_pool().release_unused()  # what reading needed beyond the columns kept
    zero = torch.zeros(1, dtype=torch.int64)
    return TrainingGroups(
        group_ids, TokenLists(prompts), TokenLists(responses),
        torch.cumsum(torch.cat([zero, *sizes]), 0), torch.cat(refs).float(), torch.cat(scores).float(),
        torch.cat(firsts).long(), torch.cat(seconds).long(),
        torch.cumsum(torch.cat([zero, torch.tensor(pair_counts, dtype=torch.int64)]), 0), names,
        {n: float(x) for n, x in zip(names, w)}, dropped, first_meta, fingerprints, stats, max_ids, pairing,
        longest,
    )


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


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_ratio: float, schedule: str = "cosine") -> float:
    """Linear warmup to peak_lr, then cosine decay to 0 at total_steps (or constant). `step` counts from 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return peak_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def torch_seed(value: int) -> int:
    """A derived seed as torch takes it, in [-2**63, 2**64): kept when it fits (so earlier runs draw what they
    drew), else wrapped, so any [train].seed works (a large one overflowed torch after the model had loaded)."""
    return value if -(2**63) <= value < 2**64 else value % 2**64


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The pair order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(torch_seed(seed * 100_003 + epoch))).tolist()


def pair_orientation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """+1 or -1 per pair for one epoch, a function of (seed, epoch) alone (so a resumed run sees the same):
    -1 presents the pair as (y2, y1), which negates both its student and its teacher margin.

    Why: rpo's -log sigmoid(d) is not symmetric in y1 <-> y2 and its gradient sigmoid(d) - 1 is never zero, so
    on cached pairs seen for several epochs in one orientation it learns the order `generate` happened to number
    them in. Each pair gets a seeded coin in epoch 0 and the opposite orientation in every next epoch: in any
    one epoch the orientations are random, and every two epochs each pair has been seen both ways, so rpo's
    summed gradient is rpo-sym's (minimised at d = 0). A fresh coin every epoch would be unbiased too, but its
    +-1/2 per-pair gradient noise near the optimum never averages out within 20 epochs (measured on the bandit
    test: TV to pi* 0.24 against 0.04 for rpo-sym). rpo-sym and rebel are unchanged by the orientation."""
    generator = torch.Generator().manual_seed(torch_seed(seed * 100_003 + 7_919))  # not epoch_order's stream
    first = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return first if epoch % 2 == 0 else -first


class StepPlan(Sequence):
    """Every optimizer step as (epoch, its group indices), in training order, each made when asked for: an
    epoch's order is drawn when the plan reaches it, so a plan of 10^9 epochs costs what a plan of one does.
    A step takes the global batch of `per_step` groups; the remainder of an epoch is folded into its last step
    (optimizer_step_groups says why)."""

    def __init__(self, n_groups: int, per_step: int, epochs: int, seed: int):
        self.n_groups, self.per_step, self.epochs, self.seed = n_groups, per_step, epochs, seed
        self.per_epoch = max(1, n_groups // per_step)
        self._epoch, self._order = -1, []  # the last epoch's order drawn

    def __len__(self) -> int:
        return self.epochs * self.per_epoch

    def __getitem__(self, step):  # type: ignore[override]
        if isinstance(step, slice):
            return [self[i] for i in range(*step.indices(len(self)))]
        if not -len(self) <= step < len(self):
            raise IndexError(step)
        epoch, i = divmod(step % len(self), self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.n_groups, self.seed, epoch)
        end = (i + 1) * self.per_step if i < self.per_epoch - 1 else self.n_groups
        return epoch, self._order[i * self.per_step : end]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (StepPlan, list)) and len(self) == len(other) and list(self) == list(other)


def optimizer_step_groups(n_groups: int, t: TrainSettings, processes: int = 1) -> StepPlan:
    """Every optimizer step as (epoch, its group indices), in training order (`n_groups`: the number of groups;
    with N = 2 each group is one pair). A step takes the global batch, batch_size * grad_accum * processes
    groups. The remainder of an epoch is folded into its last step (which
    then holds up to twice the global batch), never a step of its own: a step of one group would move the
    weights as far as a full one, since Adam's update does not shrink with the gradient's scale (so scaling
    the loss down would not help). An epoch shorter than one global batch is one step."""
    return StepPlan(n_groups, t.batch_size * t.grad_accum * processes, t.epochs, t.seed)



@dataclass
class GroupBatch:
    """One micro-batch of groups, laid out for a single forward: row r is response response_index[r]; pair p
    (global index pair_index[p]) compares rows first[p] and second[p], weighted 1 / (its group's pairs)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    response_index: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    pair_index: torch.Tensor
    pair_weight: torch.Tensor


def group_batch(data: TrainingGroups, groups: list[int]) -> GroupBatch:
    prompts, responses, response_index, first, second, pair_index, pair_weight = [], [], [], [], [], [], []
    for g in groups:
        a, b = int(data.response_start[g]), int(data.response_start[g + 1])
        p, q = int(data.pair_start[g]), int(data.pair_start[g + 1])
        row = len(responses)  # where this group's responses start in the batch
        prompt = data.prompt_ids[g]
        prompts += [prompt] * (b - a)
        responses += data.response_ids[a:b]
        response_index += range(a, b)
        first += (data.first[p:q] - a + row).tolist()
        second += (data.second[p:q] - a + row).tolist()
        pair_index += range(p, q)
        pair_weight += [1.0 / (q - p)] * (q - p)
    return GroupBatch(prompts, responses, torch.tensor(response_index), torch.tensor(first), torch.tensor(second),
                      torch.tensor(pair_index), torch.tensor(pair_weight))


def micro_batch_groups(step_groups: list[int], batch_size: int, rank: int = 0, processes: int = 1) -> list[list[int]]:
    """Process `rank`'s share of one step (every processes-th group from the rank-th), in micro-batches. Every
    process gets as many micro-batches as the busiest one, padded with empty ones: the gradient reductions
    of DDP, FSDP and DeepSpeed need each process to run the same number of backward passes."""
    mine = step_groups[rank::processes]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    busiest = math.ceil(math.ceil(len(step_groups) / processes) / batch_size)
    return batches + [[] for _ in range(busiest - len(batches))]


def run_fingerprint(data: TrainingGroups, t: TrainSettings, policy_fingerprint: str, processes: int = 1) -> str:
    """What a resumable state must match: data, policy and every setting that changes the result. The batch
    enters as the global batch only, so a state resumes under another number of processes (or another
    micro-batch size) as long as batch_size * grad_accum * processes stays the same."""
    settings = recorded_settings(t, for_resume=True)
    settings["global_batch"] = t.batch_size * t.grad_accum * processes
    return storage.json_fingerprint({"data": data.fingerprints, "settings": settings, "policy": policy_fingerprint,
                                     "reward_stats": data.stats.as_record() if data.stats else None})


@dataclass
class TrainReport:
    out: str
    pairs: int
    dropped_identical: int
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    first_batch_ref_gap: float | None
    seconds: float
    processes: int = 1
    main_process: bool = True  # False on the other processes of a multi-process run: they print nothing
    target: dict[str, Any] | None = None  # beta, weights and reward statistics the policy was trained toward
    groups: int = 0  # the prompts the pairs come from
    up_to_date: bool = False  # OUT already held the policy trained from these files, this policy and settings


@out_of_memory("train", "[train].batch_size (groups per micro-batch; raise grad_accum to keep the global "
               "batch, and the saved state resumes) or, below one group, samples_per_prompt or max_new_tokens")
def train(settings: Settings, scored_paths: list[Path], out: Path, progress: bool = True) -> TrainReport:
    t, m = settings.train, settings.model
    started = time.time()
    trackers = tracking.parse_report_to(t.report_to)  # an uninstalled one is refused before any work
    accelerator = make_accelerator(m.device, trackers, out)
    processes, rank = accelerator.num_processes, accelerator.process_index
    sharded = is_sharded(accelerator)  # FSDP or DeepSpeed: weights and optimizer are split across processes

    # --- data: teacher margins and cached reference log-probs; no reference model anywhere ---
    if t.reward_stats and t.normalize != "zscore":
        raise ModpoError(f"[train].reward_stats ({t.reward_stats}) needs normalize = \"zscore\"")
    data = load_training_groups(scored_paths, t.weights, t.normalize,
                                Path(t.reward_stats) if t.reward_stats else None, t.pairs)
    target = target_record(data, t)
    ref_identity = data.meta.get("ref", {})
    policy_path = t.policy or ref_identity.get("path") or ""
    if not policy_path:
        raise ModpoError("no policy: pass --policy (the scored file names no reference)")
    base = models.adapter_base(policy_path)
    if base is not None and t.lora_r > 0 and not t.merge:
        # peft saves the new adapter against the bare base: final/ alone would silently drop the policy's own
        # adapter. merged/ holds both (rounds train this way), so --merge is the way to a usable policy.
        raise ModpoError(f"[train].policy {policy_path} is a LoRA adapter (on {base}): a new adapter on it is saved "
                         "against that base without the policy's own adapter; pass --merge (merged/ holds both), "
                         "train with lora_r = 0 (its merged weights, fine-tuned whole), or merge it first")
    tokenizer = models.load_tokenizer(policy_path, m.trust_remote_code, what="[train].policy")
    if models.tokenizer_fingerprint(tokenizer) != data.meta["tokenizer_fingerprint"]:
        raise ModpoError(f"{scored_paths[0]}: tokenised with another tokenizer than the policy {policy_path}'s")
    check_vocabulary(scored_paths, data, len(tokenizer))
    check_context(scored_paths, data, policy_path, models.context_length(policy_path, m.trust_remote_code))
    if accelerator.is_main_process:
        warn_unusable_stats(data.stats)
    policy_fingerprint = models.fingerprint(policy_path)
    policy_is_ref = policy_fingerprint == ref_identity.get("fingerprint")
    steps = optimizer_step_groups(len(data), t, processes)
    fingerprint = run_fingerprint(data, t, policy_fingerprint, processes)
    if trained_already(out, fingerprint, merged=t.lora_r > 0 and t.merge):  # a rerun: nothing to do
        return TrainReport(str(out), data.pairs, data.dropped_identical, len(steps), len(steps), None, None, None,
                           time.time() - started, processes, accelerator.is_main_process, target, len(data),
                           up_to_date=True)

    # --- model ---
    # Alone: [model].device. Under a launcher: the device it gave this process (FSDP and DeepSpeed place the
    # weights themselves).
    device = accelerator.device if accelerator.distributed_type != DistributedType.NO else models.resolve_device(
        m.device)
    # Mixed precision: [model].dtype is the compute dtype (and the dtype of the saved weights). Whatever it is,
    # the weights the optimizer updates and its moments are float32: a bfloat16 weight of 0.02 has a spacing of
    # 1.2e-4, so an AdamW step of 1e-5 applied to it in place rounds back to the old value. Frozen LoRA base
    # weights need no such care and stay in the compute dtype.
    dtype = models.resolve_dtype(m.dtype, device)
    if dtype == torch.float16:
        raise ModpoError("[model].dtype = float16: training in float16 needs loss scaling, which modpo-pipe does "
                         "not do; train in bfloat16 (GPUs since Ampere) or float32")
    if accelerator.is_main_process:
        check_reference_dtype(ref_identity.get("dtype"), dtype)
    torch.manual_seed(torch_seed(t.seed))
    model = models.load_causal_lm(policy_path, dtype=dtype if t.lora_r > 0 else torch.float32,
                                  device=None if sharded else device, trust_remote_code=m.trust_remote_code,
                                  what="[train].policy")
    if t.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, t.lora_targets)
        lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=t.lora_targets, task_type="CAUSAL_LM",
                          layers_to_transform=top_layers(model, t.lora_layers))
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)  # adapters in float32
    # The cached ref_logp came from a model in eval mode: with dropout on, log pi - log pi_ref would not be 0
    # at step 0 and every student margin would carry dropout noise (lora_dropout included).
    disabled_dropout = disable_dropout(model)
    if t.gradient_checkpointing:
        # Reentrant checkpointing breaks DDP's gradient hooks; one process keeps the library's default.
        model.gradient_checkpointing_enable(**({"gradient_checkpointing_kwargs": {"use_reentrant": False}}
                                               if processes > 1 else {}))
        if t.lora_r > 0:
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # float32 master weights (a no-op for what already is)
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    # --- resume: the state loads into the plain model and optimizer, before the engine wraps them ---
    out.mkdir(parents=True, exist_ok=True)
    if sharded:
        start_step = 0
        if (out / "state").exists():
            raise ModpoError(f"{out / 'state'} holds a resumable state, which FSDP and DeepSpeed runs can neither "
                             f"load nor write; resume it with one process or DDP, or use another --out")
    else:
        start_step = load_state(out / "state", model, optimizer, fingerprint)
    saved_step = start_step if start_step > 0 else None  # the step of the state on disk, if any
    merged_due = t.lora_r > 0 and t.merge and not (out / "merged" / "config.json").is_file()
    if start_step == len(steps) and (out / "final" / "modpo_pipe.json").is_file() and not merged_due:
        return TrainReport(str(out), data.pairs, data.dropped_identical, len(steps), start_step, None, None,
                           None, time.time() - started, processes, accelerator.is_main_process, target, len(data))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharded:
        params = list(model.parameters())  # the engine's own (flat or sharded) parameters
    unwrapped = accelerator.unwrap_model(model)
    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, start_step)
    # The first metrics line names the target (a resume keeps the line that already does).
    target_logged = metrics_path.is_file() and metrics_path.stat().st_size > 0
    hyperparameters = tracking.hyperparameters({"train": t, "model": m, "weights": data.weights})
    accelerator.init_trackers(tracking.PROJECT, hyperparameters,
                              tracking.tracker_kwargs(trackers, out.name, out,
                                                      tracking.resume_id(str(out.resolve()), fingerprint),
                                                      purge_step=start_step + 1 if start_step else None))

    # --- loop ---
    pad_id = tokenizer.pad_token_id
    first_loss = last_loss = ref_gap = ref_gap_scaled = None
    bar = tqdm(total=len(steps), initial=start_step, desc="train", unit="step",
               disable=not progress or not accelerator.is_main_process)
    orientation_epoch, orientation = -1, torch.empty(0)
    pair_teachers = data.teacher  # (pairs,) computed once: a property
    for step in range(start_step, len(steps)):
        epoch, step_groups = steps[step]
        if epoch != orientation_epoch:
            orientation_epoch, orientation = epoch, pair_orientation(data.pairs, t.seed, epoch)
        lr = lr_at(step, len(steps), t.lr, t.warmup_ratio, t.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout noise depends on the step (resumable) and the process (each draws its own).
        torch.manual_seed(torch_seed(t.seed * 1_000_003 + step + rank * 1_000_000_007))
        step_started = time.time()
        groups_in_step = len(step_groups)
        batches = micro_batch_groups(step_groups, t.batch_size, rank, processes)
        pairs_in_step = int(sum(data.pair_start[g + 1] - data.pair_start[g] for g in step_groups))
        loss_sum, tokens, students, teachers, log_ratios = 0.0, 0, [], [], []
        for j, idx in enumerate(batches):
            padding = not idx  # this process has no groups left in the step: a zero-weight pass over one
            idx = idx or step_groups[:1]
            with gradient_sync(accelerator, model, last=j == len(batches) - 1):
                batch_groups = group_batch(data, idx)
                # One forward over every response of every group: each response once, however many pairs.
                batch = build_batch(batch_groups.prompts, batch_groups.responses, pad_id).to(device)
                with models.autocast(device, dtype):
                    logps = sequence_logps(model, batch, wrapped=accelerator.distributed_type != DistributedType.NO)
                ref = data.ref_logps[batch_groups.response_index].to(device)
                if (step == start_step and ref_gap is None and policy_is_ref and start_step == 0 and not padding
                        and accelerator.is_main_process):
                    ref_gap, ref_gap_scaled = check_reference_gap(
                        logps.detach().cpu(), ref.cpu(), batch.response_mask.sum(1).cpu(), dtype)
                log_ratio = logps - ref
                first, second = batch_groups.first.to(device), batch_groups.second.to(device)
                student = t.beta * (log_ratio[first] - log_ratio[second])
                teacher = pair_teachers[batch_groups.pair_index].to(device)
                sign = orientation[batch_groups.pair_index].to(device)  # the pair as (y1, y2) or (y2, y1)
                # A group's loss is the mean over its pairs; the step's, the mean over its groups.
                weight = batch_groups.pair_weight.to(device) / groups_in_step
                loss = (pair_loss(sign * student, sign * teacher, t.loss) * weight).sum()
                # Averaging over processes divides the summed gradient by their number: scale it back.
                accelerator.backward(loss * (0 if padding else processes))
            if padding:
                continue
            loss_sum += loss.item()
            tokens += batch.num_tokens
            students.append(student.detach().cpu())
            teachers.append(teacher.cpu())
            log_ratios.append(log_ratio.detach().cpu())
        loss_sum, tokens = sum_over_processes(accelerator, loss_sum, tokens)
        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        bad_gradient = grad_norm is not None and not math.isfinite(float(grad_norm))  # None: DeepSpeed clips
        if not math.isfinite(loss_sum) or bad_gradient:
            # Stop before the update: no bad weights reach a state or final/, and the last good state stays.
            kept = (f"the last good state (step {saved_step}) is kept in {out / 'state'}" if saved_step
                    else f"no state was saved yet (save_every={t.save_every})")
            raise ModpoError(f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient'} at step "
                             f"{step + 1} (epoch {epoch}); the update was not applied and {kept}. Lower lr or "
                             f"check the scored data")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss_sum if first_loss is None else first_loss
        last_loss = loss_sum
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")

        # The first step always: where the loss started, and the first batch's gap to the reference (log_every
        # beyond the step count left one line, the last, which summaries then showed as first and last).
        if step == 0 or (step + 1) % t.log_every == 0 or step + 1 == len(steps):
            student_all, teacher_all, ratio_all = (gather_over_processes(accelerator, x)
                                                   for x in (students, teachers, log_ratios))
            record = {
                "step": step + 1, "epoch": epoch, "loss": loss_sum, **margin_stats(student_all, teacher_all),
                "kl_k2": kl_k2(ratio_all), "grad_norm": None if grad_norm is None else float(grad_norm),
                "lr": lr, "tokens_per_s": tokens / max(time.time() - step_started, 1e-9),
                "step_seconds": time.time() - step_started,
                "pairs": pairs_in_step, "groups": groups_in_step,
            }
            if ref_gap is not None and step == 0:
                record["first_batch_ref_gap"] = ref_gap
                record["first_batch_ref_gap_scaled"] = ref_gap_scaled
            if not target_logged:
                record["target"] = target
            if accelerator.is_main_process:
                append_jsonl(metrics_path, record)
                target_logged = True
                accelerator.log(tracking.scalars(record), step=step + 1)
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < len(steps) and not sharded:
            on_main(accelerator, save_state, out / "state", unwrapped, optimizer, step + 1, fingerprint)
            saved_step = step + 1
    bar.close()
    tracking.finish(accelerator.trackers)

    # --- outputs: written by the main process alone ---
    if not sharded:
        on_main(accelerator, save_state, out / "state", unwrapped, optimizer, len(steps), fingerprint)
    info = {
        "weights": data.weights, "beta": t.beta, "loss": t.loss, "normalize": t.normalize,
        "scored_files": [str(p) for p in scored_paths],
        "policy": {"path": policy_path, "fingerprint": policy_fingerprint},
        "run_fingerprint": fingerprint,  # what a rerun compares (trained_already)
        "ref": ref_identity, "pairs": data.pairs, "groups": len(data), "pairing": data.pairing,
        "dropped_identical": data.dropped_identical,
        "steps": len(steps), "lora_r": t.lora_r, "target": target, "dtype": str(dtype).removeprefix("torch."),
        "dropout_disabled": disabled_dropout,
        # For the model card: reward specs, fingerprints and normalisation statistics, the prompts, settings.
        "rewards": data.meta.get("rewards", {}), "prompts": data.meta.get("prompts_file"),
        "prompts_on_hub": is_hub_id(data.meta.get("prompts_file")) and not Path(data.meta["prompts_file"]).exists(),
        "settings": {"train": dataclasses.asdict(t), "model": dataclasses.asdict(m)},
    }
    full_state = accelerator.get_state_dict(model) if sharded else None  # gathered from every process
    on_main(accelerator, save_final, out / "final", unwrapped, tokenizer, info, full_state, dtype)
    if t.lora_r > 0 and t.merge:
        def merged() -> torch.nn.Module:
            if not sharded:
                return models.merge_lora(unwrapped)
            # The live adapter is split across processes: the one just written, merged on the CPU.
            return models.load_causal_lm(str(out / "final"), dtype=dtype, device=torch.device("cpu"),
                                         trust_remote_code=m.trust_remote_code, what="the trained adapter")

        on_main(accelerator, lambda: save_final(out / "merged", merged(), tokenizer, info, dtype=dtype))
    return TrainReport(str(out), data.pairs, data.dropped_identical, len(steps), start_step, first_loss,
                       last_loss, ref_gap, time.time() - started, processes, accelerator.is_main_process, target,
                       len(data))


def trained_already(out: Path, fingerprint: str, merged: bool) -> bool:
    """Whether OUT/final (and OUT/merged when asked for) hold the policy a run of this very `fingerprint` (the
    one a saved state must match: data, policy, settings) wrote. Each is renamed into place whole, its
    modpo_pipe.json in it."""
    for directory in [out / "final", *([out / "merged"] if merged else [])]:
        try:
            info = json.loads((directory / "modpo_pipe.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(info, dict) or info.get("run_fingerprint") != fingerprint:
            return False
    return True


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every [train].lora_targets entry names modules of the model (peft matches a module's name or its last
    dotted parts): peft skips a misspelt entry without a word when another one matches, and raises its own
    error, after the model has loaded, when none does."""
    if not targets:
        raise ModpoError("[train].lora_targets is empty: name the modules LoRA adapts (e.g. q_proj, v_proj), or "
                         "all-linear")
    if "all-linear" in targets:
        return
    # The layer kinds LoRA adapts (GPT-2's Conv1D is a Linear by another name); a block such as `mlp` is none.
    adaptable = [name for name, module in model.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d))
                 or type(module).__name__ == "Conv1D"]
    unknown = [t for t in targets if not t or not any(n == t or n.endswith("." + t) for n in adaptable)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ModpoError(f"[train].lora_targets {unknown} match no layer LoRA can adapt in the policy; its linear "
                         f"layers are {', '.join(linear)} (or give all-linear)")


def top_layers(model: torch.nn.Module, count: int) -> list[int] | None:
    """Indices of the last `count` transformer layers (None: all). Nothing below the lowest adapted layer
    needs a gradient, so autograd stops there: a cheaper backward pass, not just fewer trainable weights.
    Measured on the demo's 96 pairs (SmolLM2-135M, 2 CPU cores): the top 10 of 30 layers trained in 63 s
    against 96 s for all 30, and at the same learning rate moved the policy far less (KL 0.02 against 0.27)."""
    if count <= 0:
        return None
    total = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ModpoError("[train].lora_layers needs the model config's num_hidden_layers, which this model lacks")
    if count > total:
        raise ModpoError(f"[train].lora_layers = {count}, but the model has {total} layers")
    return list(range(total - count, total))


# --- several processes (accelerate): none of this does anything with one process and no launcher ---

def make_accelerator(device_setting: str, trackers: list[str] | None = None, out: Path | None = None) -> Accelerator:
    """The processes `accelerate launch` started (DDP, FSDP or DeepSpeed, from its config), or one process.
    One process needs no accelerate config; device placement stays ours ([model].device). `trackers` log to
    OUT/runs/ (those that write files locally)."""
    from accelerate.utils import ProjectConfiguration

    cpu = device_setting == "cpu" or (device_setting == "auto" and not torch.cuda.is_available())
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "runs")) if out is not None else None
    return Accelerator(cpu=cpu, device_placement=False, log_with=trackers or None, project_config=project)


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def configure_deepspeed(accelerator: Accelerator, t: TrainSettings) -> None:
    """DeepSpeed wants its micro-batch size before it starts (there is no DataLoader to read it from), and
    must not accumulate on its own: modpo-pipe marks the last micro-batch of every step itself."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", t.batch_size), ("gradient_accumulation_steps", 1),
                       ("gradient_clipping", t.max_grad_norm)):
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif key == "gradient_accumulation_steps" and config[key] != 1:
            raise ModpoError("the DeepSpeed config sets gradient_accumulation_steps; leave it at auto (or 1) and "
                             "set [train].grad_accum instead")


@contextmanager
def gradient_sync(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> Iterator[None]:
    """Gradients are reduced across processes once a step, in the backward pass of its last micro-batch."""
    accelerator.sync_gradients = last  # also DeepSpeed's accumulation boundary
    if last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def sum_over_processes(accelerator: Accelerator, loss: float, tokens: int) -> tuple[float, int]:
    if accelerator.num_processes == 1:
        return loss, tokens
    total = accelerator.reduce(torch.tensor([loss, tokens], dtype=torch.float64, device=accelerator.device), "sum")
    return total[0].item(), int(total[1].item())


def gather_over_processes(accelerator: Accelerator, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Every process's values of one step, concatenated (for the metrics line)."""
    local = torch.cat(tensors) if tensors else torch.empty(0)
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return torch.cat(gather_object([local]))


def on_main(accelerator: Accelerator, write: Callable[..., None], *args: Any) -> None:
    """Run `write(*args)` on the main process; the others wait for it, and raise the same one-line error if it
    fails (a full disk...), so no process trains on alone."""
    error = None
    if accelerator.is_main_process:
        try:
            write(*args)
        except ModpoError as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([str(error) if error else None])[0]
        if message is not None and error is None:
            raise ModpoError(message)
    if error is not None:
        raise error


def check_reference_gap(policy_logps: torch.Tensor, ref_logps: torch.Tensor, response_tokens: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(largest |gap|, largest |gap| / sqrt(response tokens)) of the first batch; warns above
    REF_GAP_TOLERANCE."""
    gaps = (policy_logps - ref_logps).abs()
    gap, per_token = gaps.max().item(), (gaps / response_tokens.clamp(min=1).sqrt()).max().item()
    tolerance = REF_GAP_TOLERANCE.get(dtype, REF_GAP_TOLERANCE[torch.bfloat16])
    if per_token > tolerance:
        print(f"WARNING: the policy is the reference, but its log-probs differ from the cached ref_logp by up "
              f"to {gap:.3g} ({per_token:.3g} per sqrt(token); tolerance {tolerance} in "
              f"{str(dtype).removeprefix('torch.')}) on the first batch. Tokenization, dtype or model drift "
              f"between score and train: the student margins are biased by this much.", file=sys.stderr)
    return gap, per_token


def check_reference_dtype(ref_dtype: str | None, dtype: torch.dtype) -> None:
    """The cached ref_logp were computed in the dtype the scored file records; training in another one puts the
    difference between the two numerics into every log-ratio. Loud, but not fatal: it may be deliberate."""
    train_dtype = str(dtype).removeprefix("torch.")
    if ref_dtype and ref_dtype != train_dtype:
        print(f"WARNING: dtype mismatch: the reference log-probs were computed in {ref_dtype} (score) but the "
              f"policy trains in {train_dtype} ([model].dtype). Their numerics differ, so log pi - log pi_ref is "
              f"not 0 at step 0; score and train with the same [model].dtype.", file=sys.stderr)


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn off every dropout of the model for good (train() would switch nn.Dropout back on): nn.Dropout
    modules (LoRA's included) get p = 0, and so does every rate a module keeps as a plain number and passes to
    a kernel or F.dropout itself (Llama's `attention_dropout`, StarCoder2's `residual_dropout` and
    `embedding_dropout`, DBRX's `resid_pdrop`): any float attribute whose name holds "dropout" or ends in
    "pdrop". Returns how many were > 0."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            count += module.p > 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                count += value > 0
                setattr(module, name, 0.0)
    return count


# --- files: state, checkpoints, metrics. Every write goes to a temporary name, then a rename. ---

@contextmanager
def _saving(tmp: Path, final: Path, what: str) -> Iterator[None]:
    """Write into `tmp`; on any failure (a full disk...) delete it and say that `final` is untouched."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure(e)
        if reason is not None:
            before = "the previous one is untouched" if final.exists() else "there was none before"
            raise ModpoError(f"cannot save {what} to {final}: {reason}; {before}. Free space and "
                             f"rerun the same command to resume") from None
        raise


def _write_failure(e: BaseException) -> str | None:
    """Why a write failed, when `e` is a failed write: an OSError, or the SafetensorError that safetensors
    raises instead ("Error while serializing: I/O error: No space left on device (os error 28)"); else None."""
    from safetensors import SafetensorError

    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, SafetensorError) and "I/O error: " in str(e):
        return str(e).split("I/O error: ", 1)[1].strip().splitlines()[0]
    return None


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               fingerprint: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _saving(tmp, path, f"the training state of step {step}"):
        _write_state(tmp, model, optimizer, step, fingerprint)
        storage.replace_dir(tmp, path)


def _write_state(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                 fingerprint: str) -> None:
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    opt = optimizer.state_dict()
    moments = {f"{idx}.{key}": value.cpu().contiguous() for idx, state in opt["state"].items()
               for key, value in state.items() if torch.is_tensor(value)}
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                "param_groups": opt["param_groups"]}))


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> int:
    """Restore weights and optimizer from a state that matches this run; returns the step to start at."""
    from safetensors.torch import load_file

    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames of storage.replace_dir
    if not (path / "state.json").is_file():
        return 0
    from safetensors import SafetensorError

    # Written atomically, so only a damaged disk or a hand edit makes it unreadable: say so, in one line.
    try:
        state = json.loads((path / "state.json").read_text())
        saved_fingerprint, param_groups, step = state["fingerprint"], state["param_groups"], int(state["step"])
        if saved_fingerprint == fingerprint:
            trainable = load_file(str(path / "trainable.safetensors"))
            moments = load_file(str(path / "optimizer.safetensors"))
    except (FileNotFoundError, ValueError, KeyError, TypeError, SafetensorError) as e:  # not a flaky disk's EIO
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise ModpoError(f"{path}: unreadable training state ({reason}); delete {path} to start this training "
                         "over") from None
    if saved_fingerprint != fingerprint:
        raise ModpoError(f"{path} holds a training state for other data or settings; use another --out or "
                         f"delete {path.parent} to start over")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            named[name].copy_(value)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    return step


def save_final(path: Path, model: torch.nn.Module, tokenizer: Any, info: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> None:
    """`state_dict`: the full weights gathered from FSDP or DeepSpeed processes (None: the model's own). Full
    weights are written in `dtype` (the [model].dtype asked for; the float32 masters are cast once, and a full
    model is cast in place: saving is the last use of it); a LoRA adapter stays float32."""
    tmp = path.with_name(path.name + ".tmp")
    full_weights = not hasattr(model, "peft_config")
    if full_weights and dtype is not None:
        if state_dict is None:
            model.to(dtype)
        else:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    with _saving(tmp, path, "the trained policy"):
        model.save_pretrained(str(tmp), safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        if full_weights and dtype is not None and (tmp / "config.json").is_file():
            config = json.loads((tmp / "config.json").read_text())  # save_pretrained wrote the model's dtype
            config["dtype"] = str(dtype).removeprefix("torch.")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(tmp))
        (tmp / "modpo_pipe.json").write_text(json.dumps(info, indent=2))
        metrics = path.parent / "metrics.jsonl"
        lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        card = modelcard.model_card(info, lines, adapter=(tmp / "adapter_config.json").is_file())
        (tmp / "README.md").write_text(card, encoding="utf-8")
        storage.replace_dir(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, start_step: int) -> None:
    """Drop lines a killed run logged past its last saved state, so a resume never duplicates steps."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= start_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    storage.write_atomic(path, "".join(line + "\n" for line in keep))
