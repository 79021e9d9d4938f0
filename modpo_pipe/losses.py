"""The MODPO math, reward-model-only form. Pure tensor functions: no I/O, no models, nothing of ours imported.

teacher margin  t = sum_k w_k (r_k(x, y1) - r_k(x, y2))
student margin  s = beta * ((logp(y1) - ref_logp(y1)) - (logp(y2) - ref_logp(y2)))
d = s - t;  rpo = -logsigmoid(d);  rpo-sym = -logsigmoid(d) - logsigmoid(-d);  rebel = d**2

All three are minimised at d = 0 for every pair, i.e. at pi(y|x) ∝ pi_ref(y|x) exp(r_w(x, y) / beta).
(For rpo that holds only in expectation over both orientations of each pair: its gradient sigma(d) - 1 is
never zero, so train presents every pair in a seeded random orientation in epoch 0 and flips it in every epoch
after (train.plan.pair_orientation says why not a fresh coin per epoch): every two epochs each pair has been seen
both ways. rpo-sym and rebel are symmetric in y1 <-> y2 pair by pair, which is why rpo-sym is the lower-variance
default.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("rpo-sym", "rpo", "rebel")


def teacher_margin(rewards_1: torch.Tensor, rewards_2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted reward gap per pair. rewards_*: (pairs, K); weights: (K,) summing to 1."""
    return (rewards_1 - rewards_2) @ weights


def student_margin(
    policy_logp_1: torch.Tensor,
    policy_logp_2: torch.Tensor,
    ref_logp_1: torch.Tensor,
    ref_logp_2: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The policy's implicit reward gap: beta times the difference of the two log-ratios."""
    return beta * ((policy_logp_1 - ref_logp_1) - (policy_logp_2 - ref_logp_2))


def pair_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-pair loss of the student margin against the teacher margin."""
    d = student - teacher
    if loss == "rpo":
        return -F.logsigmoid(d)
    if loss == "rpo-sym":
        return -F.logsigmoid(d) - F.logsigmoid(-d)
    if loss == "rebel":
        return d.square()
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def normalise_weights(weights: dict[str, float], names: list[str]) -> torch.Tensor:
    """Weights in `names` order, scaled to sum 1. Raises ValueError on a name mismatch or an all-zero vector."""
    if set(weights) != set(names):
        missing = sorted(set(names) - set(weights))
        unknown = sorted(set(weights) - set(names))
        raise ValueError(f"weights must name exactly the rewards {names}; missing {missing}, unknown {unknown}")
    w = torch.tensor([float(weights[n]) for n in names], dtype=torch.float64)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite and >= 0 with a positive sum; got {weights}")
    w = w / w.max()  # first: weights near the float64 limit summed to infinity, and every weight became 0
    return (w / w.sum()).to(torch.float32)


def zscore(rewards: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardise each reward column with stored statistics; a constant reward (std 0, or NaN) becomes 0."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, (rewards - mean) / safe_std, torch.zeros_like(rewards))


# Margins closer to 0 than this count as no preference in `sign_agreement`. At the first step the policy is
# the reference and every student margin is 0 up to float32 rounding of log-prob sums (~1e-6 here); the sign of
# that noise depends on the batch's layout (two processes against one gave a different sign for 1 pair of 13),
# and it is not a learned preference.
SIGN_TOLERANCE = 1e-4


def margin_stats(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Diagnostics logged every step: how well the student margin tracks the teacher margin."""
    student, teacher = student.detach().double(), teacher.detach().double()
    d = student - teacher

    def sign(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x.abs() < SIGN_TOLERANCE, torch.zeros_like(x), torch.sign(x))

    stats = {
        "mean_abs_d": d.abs().mean().item(),
        "sign_agreement": (sign(student) == sign(teacher)).double().mean().item(),
    }
    if student.numel() > 1 and student.std() > 0 and teacher.std() > 0:
        stats["margin_corr"] = torch.corrcoef(torch.stack([student, teacher]))[0, 1].item()
    return stats



def kl_k2(log_ratio: torch.Tensor) -> float:
    """A KL estimate that is never negative: half the mean squared log-ratio, r = log pi(y) - log pi_ref(y) (Schulman's
    k2). On responses from pi_ref it equals KL(pi_ref || pi) to second order in r (both directions of the KL agree
    there), and it stays bounded when later rounds sample another policy. The plain mean of r estimates
    -KL(pi_ref || pi) <= 0; the unbiased k3 = e^r - 1 - r, on summed sequence log-ratios,
    reached 10^4 on a tiny three-round run whose later rounds sample the trained policy."""
    r = log_ratio.detach().double()
    return 0.5 * (r * r).mean().item() if r.numel() else float("nan")
