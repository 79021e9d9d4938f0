"""A training step cut into micro-batches by a token budget: whole groups, in order, each micro-batch within the
budget unless one group alone exceeds it; and the budget sized from free device memory when asked to."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from modpo_pipe.logprobs import MIN_AUTO_TOKENS, auto_micro_batch_tokens, token_budget_micro_batches


def test_whole_groups_in_order_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.randint(1, 120) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, 400)
        batches = token_budget_micro_batches(tokens, budget)
        assert [i for b in batches for i in b] == list(range(len(tokens)))  # every group once, in order
        for b, following in zip(batches, batches[1:] + [None]):
            total = sum(tokens[i] for i in b)
            assert total <= budget or len(b) == 1  # a group above the budget goes alone
            if following is not None:  # greedy: the next group did not fit
                assert total + tokens[following[0]] > budget


def test_by_hand():
    assert token_budget_micro_batches([30, 30, 50, 200, 10, 10], 100) == [[0, 1], [2], [3], [4, 5]]
    assert token_budget_micro_batches([30, 30, 50], 10**6) == [[0, 1, 2]]
    assert token_budget_micro_batches([], 100) == []
    with pytest.raises(ValueError, match="token_budget"):
        token_budget_micro_batches([1], 0)


LLAMA_1B = SimpleNamespace(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22)


def test_auto_budget_grows_with_free_memory_and_shrinks_with_what_training_will_allocate():
    gib = 2**30
    full = auto_micro_batch_tokens(60 * gib, LLAMA_1B, trainable_params=1_100_000_000,
                                   frozen_copies_bytes=2_200_000_000)
    assert auto_micro_batch_tokens(30 * gib, LLAMA_1B, 1_100_000_000, 2_200_000_000) < full
    lora = auto_micro_batch_tokens(60 * gib, LLAMA_1B, trainable_params=6_000_000)
    assert lora > full  # no float32 gradients and moments of the whole model to make room for
    assert auto_micro_batch_tokens(60 * gib, LLAMA_1B, 6_000_000, trainable_layers=4) > lora
    assert auto_micro_batch_tokens(60 * gib, LLAMA_1B, 6_000_000, checkpointing=True) > 5 * lora
    # 1.1B full fine-tuning with ~60 GiB free (an 80 GiB GPU after weights): thousands of tokens, not millions
    assert 4_000 < full < 100_000
    assert auto_micro_batch_tokens(gib, LLAMA_1B, 1_100_000_000) == MIN_AUTO_TOKENS  # never below the floor


def test_every_process_runs_as_many_micro_batches_and_the_shares_cover_the_step():
    from modpo_pipe.logprobs import rank_micro_batches

    step = [7, 3, 9, 1, 4, 8, 2]
    tokens = [50, 50, 10, 10, 10, 10, 90]  # aligned with step
    plans = [rank_micro_batches(step, tokens, 60, rank, 2) for rank in range(2)]
    assert plans[0] == [[7, 9], [4], [2]]  # groups 7, 9, 4, 2 of 50, 10, 10, 90 tokens: 60 | 10 (+90 > 60) | 90
    assert plans[1] == [[3, 1], [8], []]  # groups 3, 1, 8 of 50, 10, 10: 60 | 10, then an empty pass
    assert all(len(p) == 3 for p in plans)
    assert sorted(g for p in plans for b in p for g in b) == sorted(step)
    assert rank_micro_batches(step, tokens, 60) == [[7], [3, 9], [1, 4, 8], [2]]
