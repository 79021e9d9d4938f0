"""The MODPO math against hand-computed values, autograd, and its known optimum."""

import math

import pytest
import torch

from modpo_pipe.losses import (
    margin_stats,
    normalise_weights,
    pair_loss,
    student_margin,
    teacher_margin,
    zscore,
)


def test_teacher_margin_by_hand():
    r1 = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    r2 = torch.tensor([[0.5, 3.0], [1.0, 1.0]])
    w = torch.tensor([0.7, 0.3])
    # pair 0: 0.7 * 0.5 + 0.3 * (-1) = 0.05; pair 1: 0.7 * (-1) + 0.3 * (-2) = -1.3
    assert torch.allclose(teacher_margin(r1, r2, w), torch.tensor([0.05, -1.3]))


def test_student_margin_by_hand():
    s = student_margin(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.5]),
                       beta=0.1)
    # 0.1 * ((-10 + 11) - (-12 + 11.5)) = 0.1 * (1 + 0.5) = 0.15
    assert s.item() == pytest.approx(0.15)


@pytest.mark.parametrize("d", [-3.0, -0.5, 0.0, 0.7, 4.0])
def test_loss_values_by_hand(d):
    student, teacher = torch.tensor([d + 0.25]), torch.tensor([0.25])
    sig = 1 / (1 + math.exp(-d))
    assert pair_loss(student, teacher, "rpo").item() == pytest.approx(-math.log(sig), rel=1e-5)
    assert pair_loss(student, teacher, "rpo-sym").item() == pytest.approx(-math.log(sig) - math.log(1 - sig),
                                                                            rel=1e-5)
    assert pair_loss(student, teacher, "rebel").item() == pytest.approx(d * d, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("loss,grad_of_d", [
    ("rpo", lambda d: -1 / (1 + math.exp(d))),                  # d/dd -log sigmoid(d) = -sigmoid(-d)
    ("rpo-sym", lambda d: math.tanh(d / 2)),                    # sigmoid(d) - sigmoid(-d)
    ("rebel", lambda d: 2 * d),
])
def test_gradient_wrt_policy_logps_by_hand(loss, grad_of_d):
    beta = 0.5
    logp_1 = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    logp_2 = torch.tensor([-5.0], dtype=torch.float64, requires_grad=True)
    ref_1, ref_2 = torch.tensor([-4.0], dtype=torch.float64), torch.tensor([-4.5], dtype=torch.float64)
    teacher = torch.tensor([0.2], dtype=torch.float64)
    student = student_margin(logp_1, logp_2, ref_1, ref_2, beta)
    pair_loss(student, teacher, loss).sum().backward()
    d = beta * ((-3 + 4) - (-5 + 4.5)) - 0.2  # 0.55
    assert logp_1.grad.item() == pytest.approx(beta * grad_of_d(d), rel=1e-9)
    assert logp_2.grad.item() == pytest.approx(-beta * grad_of_d(d), rel=1e-9)


def test_rpo_sym_is_symmetric_and_minimal_at_zero():
    d = torch.linspace(-5, 5, 101)
    values = pair_loss(d, torch.zeros_like(d), "rpo-sym")
    assert torch.allclose(values, values.flip(0), atol=1e-6)
    assert values.argmin().item() == 50 and values[50].item() == pytest.approx(2 * math.log(2))


def test_normalise_weights():
    w = normalise_weights({"b": 3.0, "a": 1.0}, ["a", "b"])
    assert torch.allclose(w, torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        normalise_weights({"a": 1.0}, ["a", "b"])
    with pytest.raises(ValueError, match="unknown \\['c'\\]"):
        normalise_weights({"a": 1.0, "b": 1.0, "c": 1.0}, ["a", "b"])
    with pytest.raises(ValueError, match="positive sum"):
        normalise_weights({"a": 0.0, "b": 0.0}, ["a", "b"])
    # a zero weight is fine (no division by a preference weight, unlike the reference MODPO code)
    assert torch.allclose(normalise_weights({"a": 0.0, "b": 2.0}, ["a", "b"]), torch.tensor([0.0, 1.0]))
    # weights whose sum overflows float64 came out all 0 (w / inf), and the loss trained toward nothing
    assert torch.allclose(normalise_weights({"a": 1e308, "b": 1e308}, ["a", "b"]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="finite"):
        normalise_weights({"a": float("inf"), "b": 1.0}, ["a", "b"])


def test_zscore_uses_stored_stats_and_handles_constant_reward():
    r = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    z = zscore(r, torch.tensor([2.0, 5.0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(z, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))


def test_margin_stats():
    stats = margin_stats(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0]))
    assert stats["sign_agreement"] == pytest.approx(2 / 3)
    assert stats["mean_abs_d"] == pytest.approx((0.5 + 3.0 + 1.0) / 3)
    # Pearson's r by hand: deviations s - 2/3 = (1/3, -8/3, 7/3) and t - 7/6 = (-2/3, -1/6, 5/6), so
    # sum of products 13/6, sums of squares 38/3 and 7/6.
    assert stats["margin_corr"] == pytest.approx((13 / 6) / math.sqrt(38 / 3 * 7 / 6), abs=1e-9)
    # a constant margin has no correlation: the key is left out rather than reported as NaN
    assert "margin_corr" not in margin_stats(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 2.0]))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["rpo-sym", "rpo", "rebel"])
def test_training_reaches_the_known_optimum(loss):
    """A categorical policy over 6 responses, trained on pairs sampled from itself (fresh each step, as in
    MODPO rounds), converges to pi_ref * exp(r_w / beta) normalised."""
    torch.manual_seed(0)
    beta = 0.5
    ref_logits = torch.randn(6)
    ref_logp = torch.log_softmax(ref_logits, 0)
    rewards = torch.randn(6, 2)
    w = torch.tensor([0.3, 0.7])
    r_w = rewards @ w
    optimum = torch.softmax(ref_logp + r_w / beta, 0)
    logits = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(1500):
        probs = torch.softmax(logits.detach(), 0)
        y1, y2 = torch.multinomial(probs, 256, replacement=True), torch.multinomial(probs, 256, replacement=True)
        logp = torch.log_softmax(logits, 0)
        student = student_margin(logp[y1], logp[y2], ref_logp[y1], ref_logp[y2], beta)
        teacher = teacher_margin(rewards[y1], rewards[y2], w)
        opt.zero_grad()
        pair_loss(student, teacher, loss).mean().backward()
        opt.step()
    final = torch.softmax(logits.detach(), 0)
    start_gap = (torch.softmax(ref_logits, 0) - optimum).abs().max().item()
    assert (final - optimum).abs().max().item() < 0.05 < start_gap


def test_sign_agreement_counts_rounding_noise_as_no_preference():
    # At the first step the student margins are 0 up to float32 rounding: noise of either sign is no preference,
    # so it agrees only with a teacher tie, whatever the batch layout made of its last bits.
    teacher = torch.tensor([1.0, -1.0, 0.0])
    for noise in (torch.tensor([3e-7, -2e-6, 0.0]), torch.tensor([-3e-7, 2e-6, 1e-7])):
        assert margin_stats(noise, teacher)["sign_agreement"] == pytest.approx(1 / 3)
    # A margin of a learned size keeps its sign.
    assert margin_stats(torch.tensor([2e-3, -2e-3, 0.0]), teacher)["sign_agreement"] == 1.0
