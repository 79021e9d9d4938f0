"""The step plan: which groups every optimizer step trains on, in which orientation, at which learning rate.
Every draw is a function of (seed, epoch) alone, so a resumed run makes the same plan."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from modpo_pipe.config import TrainSettings


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
    """A derived seed as torch takes it, in [-2**63, 2**64): kept when it fits (a seed draws what it always drew,
    so saved states resume the same), else wrapped, so that any [train].seed works (torch refuses a seed outside
    that range, and would do so only after the model had loaded)."""
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



def micro_batch_groups(step_groups: list[int], batch_size: int, rank: int = 0, processes: int = 1) -> list[list[int]]:
    """Process `rank`'s share of one step (every processes-th group from the rank-th), in micro-batches. Every
    process gets as many micro-batches as the busiest one, padded with empty ones: the gradient reductions
    of DDP, FSDP and DeepSpeed need each process to run the same number of backward passes."""
    mine = step_groups[rank::processes]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    busiest = math.ceil(math.ceil(len(step_groups) / processes) / batch_size)
    return batches + [[] for _ in range(busiest - len(batches))]
