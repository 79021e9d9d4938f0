"""transformers sampling backend: batched, left-padded, length-sorted, with a decode loop of our own.

Why not `model.generate`: it keeps every row of a batch computing until the batch's longest reply ends, so
with long-tailed reply lengths most of the work is padding (23% real tokens in the benchmark's default
workload, where batching ran at 0.56x a one-prompt loop). Here a row leaves the batch, and its KV cache, the
step it emits a stop token. The loop also records the *raw* log-prob of every sampled token (the quantity
the reference model scores) before temperature and top-p are applied.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from modpo_pipe.generate.sampling import Sample, batch_seed, split_response
from modpo_pipe.logprobs import build_batch, length_batches


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return {i for i in ids if i is not None}


@torch.inference_mode()
def sample_transformers(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    n: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> list[list[Sample]]:
    """n samples per prompt, in prompt order."""
    stop_ids = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    device = next(model.parameters()).device
    results: list[list[Sample]] = [[] for _ in prompt_ids]
    batches = length_batches([len(p) for p in prompt_ids], token_budget=10**12, max_rows=batch_size)
    for batch_index, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
        # left padding: every prompt ends where generation starts
        prompts = build_batch([prompt_ids[i] for i in batch], [[] for _ in batch], pad_id, padding_side="left")
        torch.manual_seed(batch_seed(seed, batch_index))
        tokens, token_logps = sample_rows(
            model, prompts.input_ids.to(device), prompts.attention_mask.to(device), n=n,
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
        )
        for row, i in enumerate(batch):
            for k in range(n):
                flat = row * n + k
                ids, finish_reason = split_response(tokens[flat], stop_ids)
                results[i].append(Sample(ids=ids, finish_reason=finish_reason, logp=sum(token_logps[flat])))
    return results


# Temperatures below this sample greedily, as vLLM does (its _SAMPLING_EPS), so both backends agree.
GREEDY_BELOW = 1e-5


def sample_rows(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float,
                top_p: float, max_new_tokens: int, stop_ids: set[int],
                n: int = 1) -> tuple[list[list[int]], list[list[float]]]:
    """n replies per left-padded row, row by row (row 0's n replies first): each reply's token ids (ending with
    a stop id, or max_new_tokens long) and each token's raw log-prob. A reply that has stopped leaves the
    batch and the KV cache. The prompt is run once per row and its cache copied n times: with a 40-token
    prompt and a 40-token reply limit, prefill is about half of all the work."""
    from transformers import DynamicCache, TopPLogitsWarper

    top_p_warper = TopPLogitsWarper(top_p) if top_p < 1.0 else None
    stop = torch.tensor(sorted(stop_ids), device=input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(len(input_ids) * n)]
    token_logps: list[list[float]] = [[] for _ in range(len(input_ids) * n)]
    active = list(range(len(input_ids) * n))  # original reply index of each row still in the batch
    cache = DynamicCache()
    step_ids = input_ids
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    for step in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True).logits[:, -1].float()
        if step == 0 and n > 1:
            logits = logits.repeat_interleave(n, 0)
            cache.batch_repeat_interleave(n)
            attention_mask, step_ids = attention_mask.repeat_interleave(n, 0), step_ids.repeat_interleave(n, 0)
        if temperature < GREEDY_BELOW:  # logits / 1e-40 overflow to inf and the softmax to NaN: vLLM's greedy
            next_ids = logits.argmax(-1)
        else:
            scores = logits / temperature
            if top_p_warper is not None:
                scores = top_p_warper(step_ids, scores)
            next_ids = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
        next_logps = torch.log_softmax(logits, dim=-1).gather(1, next_ids.unsqueeze(1)).squeeze(1)
        for row, token, logp in zip(active, next_ids.tolist(), next_logps.tolist()):
            tokens[row].append(token)
            token_logps[row].append(logp)
        running = ~torch.isin(next_ids, stop)
        if not bool(running.any()):
            break
        if not bool(running.all()):
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active = [active[i] for i in keep.tolist()]
            next_ids, attention_mask = next_ids[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
        position_ids = attention_mask.sum(-1, keepdim=True) - 1
        step_ids = next_ids.unsqueeze(1)
    return tokens, token_logps
