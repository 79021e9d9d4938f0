"""The transformers backend's decode loop: left padding, position ids, the KV cache and rows leaving the batch
when they stop must give every row exactly what it would get alone."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS


@pytest.fixture(scope="module")
def policy(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32).eval()


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    from modpo_pipe.logprobs import build_batch

    batch = build_batch(rows, [[] for _ in rows], pad_id, padding_side="left")
    return batch.input_ids, batch.attention_mask


@torch.inference_mode()
def test_batched_rows_with_eviction_match_each_row_alone(policy, tiny_tokenizer):
    """Near-greedy sampling (temperature 1e-4) makes the reply a function of the prompt, so the batch's replies
    must equal `generate`'s greedy reply for each prompt run alone, stops included."""
    from modpo_pipe.generate.hf import eos_ids, sample_rows

    stop_ids = eos_ids(policy, tiny_tokenizer)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS] + [tiny_tokenizer.encode("a b c d e f g h i j k l")]
    ids, mask = left_pad(prompts, tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    tokens, logps = sample_rows(policy, ids, mask, temperature=1e-4, top_p=1.0, max_new_tokens=24,
                                stop_ids=stop_ids)
    for prompt, reply, reply_logps in zip(prompts, tokens, logps):
        alone = policy.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                dtype=torch.long), do_sample=False, max_new_tokens=24, top_k=None, top_p=None,
                                temperature=None, eos_token_id=sorted(stop_ids),
                                pad_token_id=tiny_tokenizer.pad_token_id)[0, len(prompt):].tolist()
        cut = next((k + 1 for k, t in enumerate(alone) if t in stop_ids), len(alone))
        assert reply == alone[:cut]
        # the recorded log-probs are the untempered model's
        full = torch.log_softmax(policy(input_ids=torch.tensor([prompt + reply])).logits[0].double(), -1)
        expected = [full[len(prompt) + k - 1, t].item() for k, t in enumerate(reply)]
        assert reply_logps == pytest.approx(expected, abs=1e-4)
    lengths = [len(t) for t in tokens]
    assert min(lengths) < max(lengths)  # rows left the batch at different steps
    torch.manual_seed(0)
    capped, _ = sample_rows(policy, ids, mask, temperature=1e-4, top_p=1.0, max_new_tokens=3, stop_ids=stop_ids)
    assert capped == [t[:3] for t in tokens]  # the cap cuts replies, stopped or not


@torch.inference_mode()
def test_same_seed_same_samples_and_tiny_top_p_is_greedy(policy, tiny_tokenizer):
    from modpo_pipe.generate.hf import eos_ids, sample_rows

    stop_ids = eos_ids(policy, tiny_tokenizer)
    ids, mask = left_pad([tiny_tokenizer.encode(p) for p in PROMPTS], tiny_tokenizer.pad_token_id)

    def run(seed: int, **kwargs):
        torch.manual_seed(seed)
        return sample_rows(policy, ids, mask, max_new_tokens=12, stop_ids=stop_ids, **kwargs)

    assert run(7, temperature=1.0, top_p=1.0) == run(7, temperature=1.0, top_p=1.0)
    assert run(7, temperature=1.0, top_p=1.0)[0] != run(8, temperature=1.0, top_p=1.0)[0]
    # a nucleus of 1e-6 keeps only the most likely token: sampling at temperature 1 becomes greedy
    assert run(7, temperature=1.0, top_p=1e-6)[0] == run(8, temperature=1e-4, top_p=1.0)[0]


@torch.inference_mode()
def test_n_replies_per_row_share_one_prefill_and_match_repeated_rows(policy, tiny_tokenizer):
    """Running each prompt once and copying its KV cache n times must sample exactly what n copies of the
    prompt would: same seed, same replies, same log-probs."""
    from modpo_pipe.generate.hf import eos_ids, sample_rows

    stop_ids = eos_ids(policy, tiny_tokenizer)
    ids, mask = left_pad([tiny_tokenizer.encode(p) for p in PROMPTS], tiny_tokenizer.pad_token_id)
    torch.manual_seed(3)
    shared, shared_logps = sample_rows(policy, ids, mask, n=3, temperature=1.0, top_p=1.0, max_new_tokens=16,
                                       stop_ids=stop_ids)
    torch.manual_seed(3)
    repeated, repeated_logps = sample_rows(policy, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0),
                                           temperature=1.0, top_p=1.0, max_new_tokens=16, stop_ids=stop_ids)
    assert len(shared) == 3 * len(PROMPTS)
    assert shared == repeated
    for got, expected in zip(shared_logps, repeated_logps):
        assert got == pytest.approx(expected, abs=1e-5)
    assert len({tuple(t) for t in shared[:3]}) > 1  # the copies of one prompt still draw different replies


def nucleus_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """What sampling at (temperature, top_p) must draw from, computed here independently of the sampler:
    softmax(logits / T), restricted to the smallest most-likely set whose mass reaches top_p (the token that
    crosses it included), renormalised."""
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    keep = order[mass_before < top_p]
    nucleus = torch.zeros_like(probs)
    nucleus[keep] = probs[keep]
    return nucleus / nucleus.sum()


def assert_draws_follow(draws: list[int], expected: torch.Tensor) -> None:
    """Every drawn token lies in the nucleus, and each token's frequency is within 5 binomial standard errors
    (for the draw count) of its expected probability."""
    n = len(draws)
    counts = torch.bincount(torch.tensor(draws), minlength=len(expected)).double()
    outside = [t for t in counts.nonzero().squeeze(1).tolist() if expected[t] == 0]
    assert not outside, f"tokens outside the nucleus were drawn: {outside}"
    freq = counts / n
    tolerance = 5 * (expected * (1 - expected) / n).sqrt() + 1e-12
    worst = ((freq - expected).abs() / tolerance).max().item()
    assert worst <= 1.0, f"frequencies {freq[expected > 0].tolist()} vs {expected[expected > 0].tolist()}"


@pytest.fixture(scope="module")
def spread_policy(tiny, tiny_tokenizer):
    """The tiny policy with a logit scale that puts a handful of tokens in a 0.8 nucleus at T = 0.7 (random
    init alone is nearly uniform over the vocabulary, and the fixture's EOS boost would take all the mass)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight[tiny_tokenizer.eos_token_id] = model.lm_head.weight[5]
        model.lm_head.weight.mul_(40.0)
    return model


@torch.inference_mode()
def test_intermediate_temperature_and_top_p_sample_the_tempered_nucleus(spread_policy, tiny_tokenizer):
    """4000 one-token draws at T = 0.7, top-p = 0.8 follow the tempered, truncated, renormalised distribution.
    Top-p applied to the raw logits, a dropped temperature or a nucleus cut one token short would each move a
    token's frequency by many standard errors, or draw a token from outside the nucleus."""
    from modpo_pipe.generate.hf import eos_ids, sample_rows

    temperature, top_p, draws = 0.7, 0.8, 4000
    prompt = tiny_tokenizer.encode(PROMPTS[0])
    logits = spread_policy(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = nucleus_distribution(logits, temperature, top_p)
    assert 3 <= int((expected > 0).sum()) <= 8  # a real nucleus, neither greedy nor the whole vocabulary
    # the test can tell the right distribution from the two likeliest mistakes
    assert (nucleus_distribution(logits, 1.0, top_p) - expected).abs().max() > 0.03
    assert (expected > 0).sum() != (nucleus_distribution(logits, 1.0, top_p) > 0).sum()

    ids, mask = left_pad([prompt], tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    tokens, logps = sample_rows(spread_policy, ids, mask, n=draws, temperature=temperature, top_p=top_p,
                                max_new_tokens=1, stop_ids=eos_ids(spread_policy, tiny_tokenizer))
    assert_draws_follow([t[0] for t in tokens], expected)
    # the recorded log-prob stays the raw model's, whatever the temperature and nucleus
    raw = torch.log_softmax(logits.double(), -1)
    assert max(abs(lp[0] - raw[t[0]].item()) for t, lp in zip(tokens[:50], logps[:50])) < 1e-4


@torch.inference_mode()
def test_a_temperature_near_zero_samples_greedily_as_vllm_does(policy, tiny_tokenizer):
    """logits / 1e-40 overflowed to inf and torch.multinomial failed on the NaN softmax (a traceback), where vLLM
    samples greedily below 1e-5: every reply is then the greedy one."""
    from modpo_pipe.generate.hf import eos_ids, sample_rows

    stop_ids = eos_ids(policy, tiny_tokenizer)
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    ids, mask = left_pad(prompts, tiny_tokenizer.pad_token_id)
    greedy, _ = sample_rows(policy, ids, mask, temperature=1e-4, top_p=1.0, max_new_tokens=12, stop_ids=stop_ids)
    for temperature in (1e-40, 1e-6):
        tokens, logps = sample_rows(policy, ids, mask, temperature=temperature, top_p=0.5, max_new_tokens=12,
                                    stop_ids=stop_ids, n=3)
        assert tokens == [row for row in greedy for _ in range(3)]
        assert all(torch.isfinite(torch.tensor(lp)).all() for lp in logps)
