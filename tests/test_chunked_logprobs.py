"""Response log-probs through the LM head a chunk at a time, recomputed in the backward pass: the same values and
gradients as the plain head, and nothing vocabulary-sized kept for the backward pass."""

from __future__ import annotations

import pytest
import torch

from modpo_pipe import logprobs
from modpo_pipe.logprobs import build_batch, chunked_head_logps, sequence_logps, token_logps

PROMPTS = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
RESPONSES = [[20, 21], [22, 23, 24, 25, 26, 27], [3], [30, 31, 32]]


def plain_and_chunked(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_elements: int):
    """(values, gradient of states, gradients of head's trainable weights) of both paths, for the same
    non-uniform weighting of the tokens (a loss that is not a plain sum)."""
    weight = torch.linspace(-1.0, 2.0, len(targets))
    results = []
    for fn in (lambda s: token_logps(head(s), targets), lambda s: chunked_head_logps(head, s, targets, chunk_elements)):
        head.zero_grad()
        leaf = states.detach().clone().requires_grad_(True)
        values = fn(leaf)
        (values * weight).sum().backward()
        results.append((values.detach(), leaf.grad, [p.grad.clone() for p in head.parameters() if p.requires_grad]))
    return results


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 10**9])  # one row per chunk, uneven chunks, one chunk
def test_values_and_gradients_equal_the_plain_head(chunk_elements):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    states, targets = torch.randn(23, 16), torch.randint(0, 50, (23,))
    (plain, plain_states, plain_weights), (chunked, chunked_states, chunked_weights) = plain_and_chunked(
        head, states, targets, chunk_elements)
    assert torch.allclose(chunked, plain, atol=1e-6)
    assert torch.allclose(chunked_states, plain_states, atol=1e-6)
    for ours, theirs in zip(chunked_weights, plain_weights):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert plain_weights[0].abs().sum() > 0


def test_a_lora_head_gets_the_same_adapter_gradients():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = torch.nn.Sequential()
    model.add_module("lm_head", torch.nn.Linear(16, 40, bias=False))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False))
    head = model.base_model.model.lm_head
    states, targets = torch.randn(11, 16), torch.randint(0, 40, (11,))
    (plain, _, plain_weights), (chunked, _, chunked_weights) = plain_and_chunked(head, states, targets, 3 * 40)
    assert len(plain_weights) == 2  # lora_A and lora_B; the base weight is frozen
    assert torch.allclose(chunked, plain, atol=1e-6)
    for ours, theirs in zip(chunked_weights, plain_weights):
        assert torch.allclose(ours, theirs, atol=1e-6) and theirs.abs().sum() > 0


def test_nothing_vocabulary_sized_is_kept_for_the_backward_pass():
    torch.manual_seed(2)
    vocab, hidden, tokens = 1000, 8, 64
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))

    def largest_saved(fn) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: token_logps(head(states), targets)) >= tokens * vocab  # the logits
    assert largest_saved(lambda: chunked_head_logps(head, states, targets, 8 * vocab)) < tokens * vocab / 4


@pytest.fixture(scope="module")
def policy(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32).eval()


def grads_of_sequence_logps(policy) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    batch = build_batch(PROMPTS, RESPONSES, pad_id=1)
    policy.zero_grad()
    values = sequence_logps(policy, batch)
    (values * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    return values.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [True, False])
def test_training_forward_recomputes_the_head_above_the_threshold_with_equal_results(policy, monkeypatch, packed):
    """sequence_logps (train's forward, packed and padded) switches to the chunked head when the logits would be
    large; here the threshold is lowered to 0 so the tiny model takes it: log-probs and every weight's gradient
    match the plain head's in float32."""
    monkeypatch.setattr(logprobs, "PACK_SHARED_PROMPTS", packed)
    plain_values, plain_grads = grads_of_sequence_logps(policy)
    calls = []
    real = logprobs.chunked_head_logps
    monkeypatch.setattr(logprobs, "RECOMPUTE_HEAD_ELEMENTS", 0)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 3 * policy.config.vocab_size)
    monkeypatch.setattr(logprobs, "chunked_head_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    values, grads = grads_of_sequence_logps(policy)
    assert calls
    assert torch.allclose(values, plain_values, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-5), name


def test_inference_keeps_the_plain_head(policy, monkeypatch):
    monkeypatch.setattr(logprobs, "RECOMPUTE_HEAD_ELEMENTS", 0)
    monkeypatch.setattr(logprobs, "chunked_head_logps", lambda *a, **k: pytest.fail("recomputed without grad"))
    with torch.inference_mode():
        sequence_logps(policy, build_batch(PROMPTS, RESPONSES, pad_id=1))
