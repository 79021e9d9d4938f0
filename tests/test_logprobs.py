"""Summed response log-probs: masking, padding, and the fast lm_head-at-response-positions path."""

import math

import pytest
import torch

from modpo_pipe.logprobs import (
    batched_sequence_logps,
    build_batch,
    length_batches,
    sequence_logps,
    sequence_logps_from_logits,
)


def test_build_batch_masks_prompt_and_padding():
    batch = build_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    left = build_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0, padding_side="left")
    assert left.input_ids.tolist()[1] == [0, 0, 0, 3, 7]
    assert left.position_ids.tolist()[1][3:] == [0, 1]


def test_logps_from_logits_by_hand():
    # vocab 3; sequence [prompt 0 | response 1, 2]; logits at t predict token t + 1
    logits = torch.tensor([[[0.0, math.log(3), 0.0], [math.log(2), 0.0, math.log(2)], [9.0, 9.0, 9.0]]])
    batch = build_batch([[0]], [[1, 2]], pad_id=0)
    expected = math.log(3 / 5) + math.log(2 / 5)  # p(1 | 0) = 3/5, p(2 | 0 1) = 2/5; last position unused
    assert sequence_logps_from_logits(logits, batch).item() == pytest.approx(expected, rel=1e-6)


def test_padding_never_counts():
    logits = torch.randn(2, 5, 7)
    batch = build_batch([[1, 2], [3]], [[4, 5, 6], [6]], pad_id=0)
    base = sequence_logps_from_logits(logits, batch)
    poisoned = logits.clone()
    poisoned[1, 1:] = 1e4 * torch.randn(4, 7)  # row 1's response token is predicted at t=0; t>=1 is padding
    assert torch.allclose(sequence_logps_from_logits(poisoned, batch), base)


@pytest.fixture(scope="module")
def policy(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32).eval()


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 26, 27], [3]]


@torch.inference_mode()
def test_left_and_right_padding_agree(policy):
    right = sequence_logps(policy, build_batch(PROMPTS, RESPONSES, pad_id=1))
    left = sequence_logps(policy, build_batch(PROMPTS, RESPONSES, pad_id=1, padding_side="left"))
    assert torch.allclose(right, left, atol=1e-5)


@torch.inference_mode()
def test_fast_path_equals_full_logits_and_unbatched(policy):
    batch = build_batch(PROMPTS, RESPONSES, pad_id=1)
    fast = sequence_logps(policy, batch)
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids).logits
    assert torch.allclose(fast, sequence_logps_from_logits(logits, batch), atol=1e-5)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids = torch.tensor([p + r])
        single = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].float(), -1)
        expected = single[len(p) - 1 :].gather(1, ids[0, len(p):].unsqueeze(1)).sum()
        assert fast[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_fast_path_is_differentiable(policy):
    batch = build_batch(PROMPTS, RESPONSES, pad_id=1)
    policy.zero_grad()
    sequence_logps(policy, batch).sum().backward()
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().sum() > 0
    policy.zero_grad()


def test_batched_logps_match_any_batching(policy):
    one_by_one = batched_sequence_logps(policy, PROMPTS, RESPONSES, pad_id=1, token_budget=1)
    together = batched_sequence_logps(policy, PROMPTS, RESPONSES, pad_id=1, token_budget=10_000)
    assert one_by_one == pytest.approx(together, abs=1e-5)


def test_length_batches_cover_every_index_once_within_budget():
    lengths = [5, 100, 7, 30, 30, 2, 64, 8, 9, 120]
    batches = length_batches(lengths, token_budget=128)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 128
    assert all(len(b) <= 3 for b in length_batches(lengths, token_budget=10**6, max_rows=3))
