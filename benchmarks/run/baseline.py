"""The plain forward the baselines share: right-padded batches and log-probs from the full (B, T, V) logits.
Ours is modpo_pipe.logprobs (packed, chunked); this is the textbook way it is measured against."""

from __future__ import annotations

from typing import Any

from benchmarks.synthetic import PAD_ID


def plain_logps(model: Any, input_ids: Any, attention_mask: Any, response_mask: Any) -> Any:
    """The textbook way: full (B, T, V) logits, log-softmax, gather, mask, sum."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logps * response_mask[:, 1:]).sum(-1)


def pad_right(prompts: list[list[int]], responses: list[list[int]]) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
        resp[i, len(p) : len(p) + len(r)] = 1.0
    return ids, attn, resp
