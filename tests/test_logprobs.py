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


# --- packed batches: a shared prompt computed once, short sequences sharing rows ---

SHARED_PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [10, 11], [10, 11], [12, 13, 14], [30]]
SHARED_RESPONSES = [[20, 21], [22, 23, 24, 25], [26, 27, 28, 29, 30, 31], [3], [40, 41, 42], [43, 44]]


def _padded_then_packed(policy, fn):
    import modpo_pipe.logprobs as logprobs

    try:
        logprobs.PACK_SHARED_PROMPTS = False
        padded = fn()
    finally:
        logprobs.PACK_SHARED_PROMPTS = True
    return padded, fn()


def test_packed_path_equals_padded_path_values_and_gradients(policy):
    from modpo_pipe.logprobs import can_pack

    assert can_pack(policy)
    batch = build_batch(SHARED_PROMPTS, SHARED_RESPONSES, pad_id=1)

    def run():
        policy.zero_grad()
        out = sequence_logps(policy, batch)
        (out * torch.arange(1.0, len(out) + 1)).sum().backward()
        grads = [p.grad.clone() for p in policy.parameters()]
        policy.zero_grad()
        return out.detach(), grads

    (padded, g_padded), (packed, g_packed) = _padded_then_packed(policy, run)
    assert torch.allclose(padded, packed, atol=1e-5)
    for a, b in zip(g_padded, g_packed):  # same sums in another order: equal up to float32 rounding
        assert torch.linalg.norm(a - b) <= 1e-5 * torch.linalg.norm(a) + 1e-7


def test_packed_batches_share_prompts_and_match_any_budget(policy):
    stats = {}
    packed = batched_sequence_logps(policy, SHARED_PROMPTS, SHARED_RESPONSES, pad_id=1, token_budget=10_000,
                                    stats=stats)
    tight = batched_sequence_logps(policy, SHARED_PROMPTS, SHARED_RESPONSES, pad_id=1, token_budget=1)
    padded, _ = _padded_then_packed(policy, lambda: batched_sequence_logps(
        policy, SHARED_PROMPTS, SHARED_RESPONSES, pad_id=1, token_budget=10_000))
    assert packed == pytest.approx(padded, abs=1e-5)
    assert tight == pytest.approx(padded, abs=1e-5)
    shared = 5 + 2  # the first two prompts appear twice each
    assert stats["tokens"] == stats["sequence_tokens"] - shared
    assert stats["tokens"] <= stats["slots"]


def test_packed_path_handles_empty_prompt_and_empty_response(policy):
    prompts, responses = [[], [5, 6], [5, 6]], [[7, 8, 9], [], [10]]
    padded, packed = _padded_then_packed(policy, lambda: sequence_logps(policy, build_batch(prompts, responses, 1)))
    assert torch.allclose(padded, packed, atol=1e-5)
    assert packed[1].item() == 0.0


def test_pack_batches_cover_every_item_once_within_budget():
    from modpo_pipe.logprobs import pack_batches

    lengths = [5, 100, 7, 30, 30, 2, 64, 8, 9, 120, 61, 33]
    batches = pack_batches(lengths, token_budget=256)
    assert sorted(i for rows in batches for row in rows for i in row) == list(range(len(lengths)))
    for rows in batches:
        width = max(sum(lengths[i] for i in row) for row in rows)
        assert width == max(lengths[i] for row in rows for i in row)  # never wider than its longest item
        assert len(rows) == 1 or width * len(rows) <= 256


def test_group_by_prompt_keeps_pairs_together_and_caps_groups():
    from modpo_pipe.logprobs import group_by_prompt

    prompts = [[1, 2]] * 5 + [[3]]
    responses = [[4] * 10] * 5 + [[5]]
    # a group takes two responses even past the cap (a pair always shares its prompt), a third only within it
    assert group_by_prompt(prompts, responses, max_group_tokens=25) == [[0, 1], [2, 3], [4], [5]]
    assert group_by_prompt(prompts, responses, max_group_tokens=10) == [[0, 1], [2, 3], [4], [5]]
    assert group_by_prompt(prompts, responses, max_group_tokens=32) == [[0, 1, 2], [3, 4], [5]]


def test_can_pack_only_where_a_4d_mask_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    from modpo_pipe.logprobs import can_pack

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    assert not can_pack(gpt2)  # absolute positions: takes the padded path
    windowed = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=16, sliding_window=16))
    assert can_pack(windowed, longest_sequence=16)
    assert not can_pack(windowed, longest_sequence=17)
