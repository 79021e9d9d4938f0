"""Reward statistics: what score measures over a scored file's rewards, and what train z-scores them with.

score and a merge of shards write each reward's mean and std (over every response of every group) into the
scored file's metadata (`measure`); train reads one file's statistics back (`from_metadata`) and standardises
every input file's rewards with them, so that every pair's teacher margin is on one scale.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from modpo_pipe import schema
from modpo_pipe.errors import ModpoError


def measure(scored: pa.Table, names: list[str]) -> dict[str, dict[str, float | None]]:
    """Mean and standard deviation of each reward over every response of every group (train's z-score);
    None for a table with no rows (an empty shard)."""
    stats: dict[str, dict[str, float | None]] = {}
    for name in names:
        values = pc.list_flatten(scored.column(schema.reward_column(name))).to_pylist()
        stats[name] = ({"mean": statistics.fmean(values), "std": statistics.pstdev(values)} if values
                       else {"mean": None, "std": None})
    return stats


@dataclass
class RewardStats:
    """The z-score statistics one training target is built from: one mean and std per reward, read from one
    scored file's metadata and applied to every input file, so that every pair's teacher margin is on the same
    scale. A reward whose std is 0, NaN or tiny is treated as constant: it contributes nothing."""

    source: str  # the scored file they were read from
    mean: dict[str, float]
    std: dict[str, float]  # as stored
    constant: dict[str, str]  # reward -> why it contributes nothing

    def as_record(self) -> dict[str, Any]:
        return {"from": self.source, "rewards": {n: {"mean": self.mean[n], "std": self.std[n]} for n in self.mean},
                **({"constant": self.constant} if self.constant else {})}


# A std below this fraction of the reward's mean magnitude is float rounding noise (float32 keeps ~7 digits),
# and one below the floor too small to divide by: z-scoring would blow every margin up by 1/std.
TINY_STD_RELATIVE = 1e-6
TINY_STD_FLOOR = 1e-12


def unusable_std(mean: float, std: float) -> str | None:
    """Why a stored std cannot scale its reward (None: it can). Pure: the caller decides what to say."""
    if not math.isfinite(std) or not math.isfinite(mean):
        return f"its stored mean/std is {mean}/{std}"
    if std == 0:
        return "its stored std is 0 (the reward is constant)"
    if std < max(TINY_STD_RELATIVE * abs(mean), TINY_STD_FLOOR):
        return (f"its stored std {std:.3g} is below {TINY_STD_RELATIVE:g} of its mean {mean:.6g} (or below "
                f"{TINY_STD_FLOOR:g}): rounding noise, which z-scoring would blow up by 1/std")
    return None


def from_metadata(meta: dict[str, Any], names: list[str], source: Path) -> RewardStats:
    """The statistics of `names` stored in a scored file's metadata (`measure` wrote them)."""
    rewards = schema.metadata_key(meta, "rewards", source)
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for name in names:
        entry = rewards.get(name) if isinstance(rewards, dict) else None
        if isinstance(rewards, dict) and name not in rewards:  # a good file, of other rewards
            raise ModpoError(f"{source}: holds no statistics of reward {name!r}; it was scored with the rewards "
                             f"{sorted(rewards)}")
        if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
            raise ModpoError(f"{source}: metadata has no 'rewards.{name}' mean and std: corrupt or not written by "
                             "modpo-pipe")
        m, sd = entry["mean"], entry["std"]
        mean[name] = float("nan") if m is None else float(m)
        std[name] = float("nan") if sd is None else float(sd)
    constant = {n: why for n in names if (why := unusable_std(mean[n], std[n]))}
    return RewardStats(str(source), mean, std, constant)
