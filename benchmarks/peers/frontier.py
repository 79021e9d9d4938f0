"""Issue 34's comparisons, pure: evaluated policies in, curves, numbers and markdown out.

A method's curve at one weight vector is reward against KL to the reference, one point per policy: the
pipeline's policies at each beta, GRPO's checkpoints along one run. Both curves start at the reference
(KL 0, the reference's own reward): it is where both methods begin (beta to infinity, step 0).

- Reward at matched KL: each curve is read as the piecewise-linear function through its points (sorted by
  KL) and compared on the KL range both reach, at every KL where either curve has a point (the difference of
  two piecewise-linear functions is extreme at those KLs). The s.e. of an interpolated reward comes from its
  two neighbours' s.e., the evaluations taken as independent: sqrt((1 - t)^2 s_a^2 + t^2 s_b^2). The KL
  estimates' own noise is not propagated.
- KL-budgeted hypervolume: the hypervolume (positivity, concision) above the reference's means of every
  policy of a method whose mean KL is at most K, with a bootstrap s.e. over the eval prompts (the policies
  within K held fixed).
- Cost of a whole front, wall-clock: the pipeline's is every stage's recorded seconds of every run (sampling,
  scoring and training, model loads and writes included), a stage shared between runs (round 0) once.
  GRPO's is training seconds (from the start of training, model loading and saves not counted): for each
  weight vector, its run up to the first checkpoint at or beyond the largest KL the pipeline's curve reaches
  at that weight (the matching front), or the whole run when no checkpoint gets there (then a lower bound).
  Evaluation is counted on neither side.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.peers import REWARD_NAMES, WEIGHTS
from modpo_pipe.errors import ModpoError
from modpo_pipe.evaluate import hypervolume

PIPELINE = "modpo-pipe"
OBJECTIVE = "objective"  # w * positivity + (1 - w) * concision, raw (GRPO's training reward; the picture's y)
KL_BUDGETS = (2.0, 5.0, 10.0)
HV_BUDGET = 5.0  # the outcome's K
HV_RATIO = 1.2
# The single-objective policies and the reward each optimises: the outcome's comparisons at matched KL.
ENDS = ((1.0, "positivity"), (0.0, "concision"))


def grpo_method(beta: float) -> str:
    return f"GRPO β {beta:g}"


# --- curves ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    kl: float
    kl_sem: float
    mean: float
    sem: float
    label: str


def reward_estimate(summary: dict[str, Any], name: str, w: float) -> tuple[float, float]:
    """Mean and s.e. of one reward of an eval summary, or of OBJECTIVE at weight w: at w 0 and 1 the reward's
    own estimate; in between, over the per-prompt means of the weighted sum (s.e. NaN without them)."""
    rewards = summary["rewards"]
    if name != OBJECTIVE:
        return rewards[name]["mean"], rewards[name]["sem"]
    if w in (0.0, 1.0):
        return reward_estimate(summary, "positivity" if w == 1.0 else "concision", w)
    mean = w * rewards["positivity"]["mean"] + (1 - w) * rewards["concision"]["mean"]
    per_prompt = summary.get("prompt_rewards") or {}
    pos, con = per_prompt.get("positivity"), per_prompt.get("concision")
    if not pos or not con or len(pos) != len(con) or len(pos) < 2:
        return mean, math.nan
    values = [w * p + (1 - w) * c for p, c in zip(pos, con)]
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def members(data: dict[str, Any], method: str, w: float | None = None) -> list[dict[str, Any]]:
    """The policy records of one method (and weight), in the order frontier.json lists them."""
    return [p for p in data["policies"] if p["method"] == method and (w is None or p["w"] == w)]


def curve(data: dict[str, Any], method: str, w: float, name: str) -> list[Point]:
    """One method's curve at weight w for reward `name`: the reference at KL 0, then its policies, by KL."""
    summaries = data["summaries"]
    ref = summaries[data["reference"]]
    points = [Point(0.0, 0.0, *reward_estimate(ref, name, w), data["reference"])]
    for policy in members(data, method, w):
        s = summaries[policy["label"]]
        points.append(Point(s["kl_to_ref"]["mean"], s["kl_to_ref"]["sem"], *reward_estimate(s, name, w),
                            policy["label"]))
    return sorted(points, key=lambda p: p.kl)


def interpolate(points: Sequence[Point], kl: float) -> tuple[float, float]:
    """Mean and s.e. at `kl` on the piecewise-linear curve through `points` (sorted by KL); at a measured KL,
    that point (the first of equal KLs)."""
    for p in points:
        if p.kl == kl:
            return p.mean, p.sem
    for a, b in zip(points, points[1:]):
        if a.kl < kl < b.kl:
            t = (kl - a.kl) / (b.kl - a.kl)
            return (1 - t) * a.mean + t * b.mean, math.sqrt(((1 - t) * a.sem) ** 2 + (t * b.sem) ** 2)
    raise ModpoError(f"KL {kl:g} is outside the curve's range "
                     f"[{points[0].kl:g}, {points[-1].kl:g}]" if points else "an empty curve has no points")


@dataclass(frozen=True)
class Match:
    kl: float
    ours: float
    ours_sem: float
    theirs: float
    theirs_sem: float

    @property
    def diff(self) -> float:
        return self.ours - self.theirs

    @property
    def combined_se(self) -> float:
        return math.hypot(self.ours_sem, self.theirs_sem)

    @property
    def ok(self) -> bool:
        """At or above theirs within one combined s.e."""
        return self.ours >= self.theirs - self.combined_se


def matched(ours: Sequence[Point], theirs: Sequence[Point]) -> list[Match]:
    """Both curves at every KL > 0 where either has a point, on the KL range both reach."""
    lo, hi = max(ours[0].kl, theirs[0].kl), min(ours[-1].kl, theirs[-1].kl)
    grid = sorted({p.kl for p in (*ours, *theirs) if lo <= p.kl <= hi and p.kl > 0})
    return [Match(kl, *interpolate(ours, kl), *interpolate(theirs, kl)) for kl in grid]


# --- KL-budgeted hypervolume ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Volume:
    hypervolume: float
    sem: float
    labels: tuple[str, ...]  # the policies within the budget


def budget_hypervolume(policies: list[dict[str, Any]], ref: dict[str, Any], budget: float,
                       names: Sequence[str] = REWARD_NAMES, resamples: int = 1000, seed: int = 0) -> Volume:
    """Hypervolume over `names` above the reference's means of the policies (eval summaries) whose mean KL is at
    most `budget`; s.e. by resampling the eval prompts (the same prompts for every policy and the reference).
    No policy within the budget: 0 with s.e. 0. s.e. NaN without equal per-prompt rewards for all."""
    import numpy as np

    within = [p for p in policies if p["kl_to_ref"]["mean"] <= budget]
    labels = tuple(p["label"] for p in within)
    ref_point = [ref["rewards"][n]["mean"] for n in names]
    hv = hypervolume([[p["rewards"][n]["mean"] for n in names] for p in within], ref_point)
    if not within:
        return Volume(0.0, 0.0, labels)
    rows = [[(e.get("prompt_rewards") or {}).get(n) or [] for n in names] for e in [ref, *within]]
    lengths = {len(v) for row in rows for v in row}
    if len(lengths) != 1 or (prompts := lengths.pop()) < 2:
        return Volume(hv, math.nan, labels)
    idx = np.random.default_rng(seed).integers(0, prompts, size=(resamples, prompts))
    # per entry: (resamples, len(names)) of resampled means
    means = [np.stack([np.asarray(v)[idx].mean(axis=1) for v in row], axis=1) for row in rows]
    volumes = [hypervolume([m[b] for m in means[1:]], means[0][b]) for b in range(resamples)]
    return Volume(hv, float(np.std(volumes, ddof=1)), labels)


# --- cost of a front ---------------------------------------------------------------------------------------------

def pipeline_seconds(stages: dict[str, dict[str, dict[str, Any]]]) -> float:
    """Every run's recorded stage seconds ({run: {stage: {"seconds", "shared"}}}), a shared stage once (its
    copies are marked shared; the run that computed it counts it)."""
    return sum(r["seconds"] for run in stages.values() for r in run.values() if not r["shared"])


def _shared_names(stages: dict[str, dict[str, dict[str, Any]]]) -> set[str]:
    return {name for run in stages.values() for name, r in run.items() if r["shared"]}


def shared_seconds(stages: dict[str, dict[str, dict[str, Any]]]) -> float:
    """The stages other runs took copies of (round 0's sampling and scoring), counted once."""
    names = _shared_names(stages)
    return sum(r["seconds"] for run in stages.values() for name, r in run.items() if name in names and not r["shared"])


def own_seconds(stages: dict[str, dict[str, dict[str, Any]]], runs: Sequence[str]) -> float:
    """These runs' stages that no run shares: pipeline_seconds = shared_seconds + own_seconds of every run."""
    names = _shared_names(stages)
    return sum(r["seconds"] for run in runs for name, r in stages[run].items() if name not in names)


@dataclass(frozen=True)
class RunCost:
    seconds: float  # training seconds to the checkpoint that matches (or to the last)
    step: int
    kl: float  # that checkpoint's KL
    target_kl: float  # the largest KL of the pipeline's curve at this weight
    reached: bool


def matching_seconds(checkpoints: Sequence[tuple[int, float, float]], target_kl: float) -> RunCost:
    """One GRPO run's cost for a curve that reaches `target_kl`: checkpoints (step, seconds, KL) in step order;
    the first at or beyond the target, or the last (not reached)."""
    if not checkpoints:
        raise ModpoError("a GRPO run without checkpoints has no curve")
    for step, seconds, kl in checkpoints:
        if kl >= target_kl:
            return RunCost(seconds, step, kl, target_kl, True)
    step, seconds, kl = checkpoints[-1]
    return RunCost(seconds, step, kl, target_kl, False)


def max_kl(data: dict[str, Any], method: str, w: float) -> float:
    """The largest KL a method's curve reaches at weight w (0: the reference alone)."""
    return max([0.0] + [data["summaries"][p["label"]]["kl_to_ref"]["mean"] for p in members(data, method, w)])


def grpo_run_costs(data: dict[str, Any], method: str) -> dict[float, RunCost]:
    """Per weight: the GRPO run's matching cost against the largest KL of the pipeline's curve there."""
    out = {}
    for w in WEIGHTS:
        target = max_kl(data, PIPELINE, w)
        checkpoints = sorted((p["step"], p["seconds"], data["summaries"][p["label"]]["kl_to_ref"]["mean"])
                             for p in members(data, method, w))
        out[w] = matching_seconds(checkpoints, target)
    return out


# --- the outcome checks ------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """Issue 34's three checks on one seed, the pipeline against one GRPO variant."""

    method: str
    matches: dict[tuple[float, str], list[Match]]  # ENDS -> the comparisons at matched KL
    volumes: dict[float, tuple[Volume, Volume]]  # K -> (ours, theirs)
    pipeline_seconds: float
    grpo_costs: dict[float, RunCost] = field(default_factory=dict)

    @property
    def matched_ok(self) -> bool:
        # No common KL beyond the reference's is no evidence: a FAIL, not a vacuous pass.
        return all(self.matches[end] and all(m.ok for m in self.matches[end]) for end in ENDS)

    @property
    def hv_ratio(self) -> float:
        ours, theirs = (v.hypervolume for v in self.volumes[HV_BUDGET])
        if theirs > 0:
            return ours / theirs
        return math.inf if ours > 0 else math.nan

    @property
    def hv_ok(self) -> bool:
        ours, theirs = (v.hypervolume for v in self.volumes[HV_BUDGET])
        return ours > 0 and ours >= HV_RATIO * theirs

    @property
    def grpo_seconds(self) -> float:
        return sum(c.seconds for c in self.grpo_costs.values())

    @property
    def cost_ok(self) -> bool:
        return self.pipeline_seconds < self.grpo_seconds


def outcome(data: dict[str, Any], method: str, budgets: Sequence[float] = KL_BUDGETS) -> Outcome:
    summaries = data["summaries"]
    ref = summaries[data["reference"]]
    matches = {(w, name): matched(curve(data, PIPELINE, w, name), curve(data, method, w, name)) for w, name in ENDS}
    volumes = {}
    for k in sorted({*budgets, HV_BUDGET}):
        ours, theirs = ([summaries[p["label"]] for p in members(data, m)] for m in (PIPELINE, method))
        volumes[k] = (budget_hypervolume(ours, ref, k), budget_hypervolume(theirs, ref, k))
    return Outcome(method, matches, volumes, pipeline_seconds(data["pipeline_stages"]), grpo_run_costs(data, method))


def grpo_methods(data: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(p["method"] for p in data["policies"] if p["method"] != PIPELINE))
