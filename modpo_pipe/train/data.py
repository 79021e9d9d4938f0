"""The groups train learns from, in memory: every response once, the pairs formed from them as indices, and the
micro-batch layout of a forward pass over some groups."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from modpo_pipe import reward_stats
from modpo_pipe.errors import ModpoError

TOKEN_COLUMNS = ("prompt_ids", "response_ids")
PAIRINGS = ("all", "disjoint", "max-min")


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
    return GroupBatch(prompts=prompts, responses=responses, response_index=torch.tensor(response_index),
                      first=torch.tensor(first), second=torch.tensor(second), pair_index=torch.tensor(pair_index),
                      pair_weight=torch.tensor(pair_weight))
