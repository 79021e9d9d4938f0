"""transformers sampling backend: batched, left-padded, length-sorted `generate` calls.

Temperature and top-p are applied by our own logits processor rather than generate's warpers, so the
same processor can record the *raw* log-prob of every sampled token (the quantity the reference
model scores) without keeping all step logits in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from modpo_pipe.generate import Sample, batch_seed, split_response
from modpo_pipe.logprobs import length_batches


class _SampleAndRecord:
    """A generate logits processor: record raw log-probs, then apply temperature and top-p.

    At step t it sees the token sampled at step t-1 as input_ids[:, -1] and looks up that token's
    log-prob in the distribution it stored at step t-1; `finish` handles the last step.
    """

    def __init__(self, temperature: float, top_p: float):
        from transformers import TopPLogitsWarper

        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.prev_logps: torch.Tensor | None = None
        self.token_logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev_logps is not None:
            self.token_logps.append(self.prev_logps.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev_logps = torch.log_softmax(scores.float(), dim=-1)
        scores = scores / self.temperature
        return self.top_p(input_ids, scores) if self.top_p is not None else scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(rows, steps) raw log-prob of each generated token."""
        assert self.prev_logps is not None
        self.token_logps.append(self.prev_logps.gather(1, last_tokens.unsqueeze(1)).squeeze(1))
        return torch.stack(self.token_logps, dim=1)


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
    from transformers import GenerationConfig, LogitsProcessorList

    stop_ids = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    # A fresh config: the checkpoint's own sampling defaults (top_k=50, repetition penalties...) would
    # silently change the distribution we sample from.
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
        num_return_sequences=n, pad_token_id=pad_id, eos_token_id=sorted(stop_ids),
    )
    device = next(model.parameters()).device
    results: list[list[Sample]] = [[] for _ in prompt_ids]
    batches = length_batches([len(p) for p in prompt_ids], token_budget=10**12, max_rows=batch_size)
    for batch_index, batch in enumerate(tqdm(batches, desc="generate", unit="batch", disable=not progress)):
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids = prompt_ids[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        recorder = _SampleAndRecord(temperature, top_p)
        torch.manual_seed(batch_seed(seed, batch_index))
        sequences = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            generation_config=config, logits_processor=LogitsProcessorList([recorder]),
        )
        generated = sequences[:, width:]
        step_logps = recorder.finish(generated[:, -1]).cpu()
        generated = generated.cpu().tolist()
        for row, i in enumerate(batch):
            for k in range(n):
                flat = row * n + k
                ids, finish_reason = split_response(generated[flat], stop_ids)
                logp = float(step_logps[flat, : len(ids)].sum())
                results[i].append(Sample(ids=ids, finish_reason=finish_reason, logp=logp))
    return results
