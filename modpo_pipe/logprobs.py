"""Summed log-probs of responses on exactly the stored token ids. Score and train share this code path,
so the reference log-probs cached by `score` and the policy log-probs computed by `train` agree bit for
bit when the policy is the reference.

A sequence is prompt ids followed by response ids. Only response tokens count (the EOS the model
emitted included); prompt and padding are masked. Position ids come from the attention mask, so left
and right padding give the same sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, T) long, right-padded
    attention_mask: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long
    response_mask: torch.Tensor  # (B, T) bool: True where input_ids[t] is a response token

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                       self.position_ids, self.response_mask)))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def build_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
) -> SequenceBatch:
    """Concatenate each prompt with its response and pad to the longest sequence."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(lengths)
    batch = len(lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        start = width - lengths[i] if padding_side == "left" else 0
        input_ids[i, start : start + lengths[i]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, start : start + lengths[i]] = 1
        response_mask[i, start + len(p) : start + lengths[i]] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return SequenceBatch(input_ids, attention_mask, position_ids, response_mask)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, in float32 whatever the logits' dtype. logits (N, V), targets (N,)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps_from_logits(logits: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """Reference implementation over full (B, T, V) logits: sum of response-token log-probs per sequence."""
    pred_mask = batch.response_mask[:, 1:]  # logits at t predict token t + 1
    per_token = token_logps(logits[:, :-1][pred_mask], batch.input_ids[:, 1:][pred_mask])
    return _sum_per_row(per_token, pred_mask)


def _sum_per_row(per_token: torch.Tensor, pred_mask: torch.Tensor) -> torch.Tensor:
    """Scatter-add the flat per-token values (in `pred_mask` order) back into one sum per sequence."""
    rows = torch.arange(pred_mask.shape[0], device=per_token.device).unsqueeze(1).expand_as(pred_mask)[pred_mask]
    return torch.zeros(pred_mask.shape[0], device=per_token.device).index_add(0, rows, per_token)


# Model families whose logits are exactly lm_head(last hidden state): for them we apply lm_head only at
# response positions, which skips the (large) vocabulary projection for prompt and padding tokens.
# Others (logit soft-capping, logit scaling) take the plain full forward.
_PLAIN_HEAD_FAMILIES = {
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gpt2", "gpt_neox",
    "olmo", "olmo2", "smollm3", "starcoder2", "stablelm",
}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft: LoRA layers live inside, so calls still use them
    return get_base() if callable(get_base) else model


def sequence_logps(model: torch.nn.Module, batch: SequenceBatch, chunk_rows: int = 2048) -> torch.Tensor:
    """Summed response log-probs per sequence, (B,) float32. Differentiable when grad is enabled."""
    inner = _unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in _PLAIN_HEAD_FAMILIES:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        return sequence_logps_from_logits(logits, batch)
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state
    pred_mask = batch.response_mask[:, 1:]
    states = hidden[:, :-1][pred_mask]
    targets = batch.input_ids[:, 1:][pred_mask]
    per_token = torch.cat([
        token_logps(head(states[i : i + chunk_rows]), targets[i : i + chunk_rows])
        for i in range(0, states.shape[0], chunk_rows)
    ])
    return _sum_per_row(per_token, pred_mask)


def length_batches(lengths: Sequence[int], token_budget: int, max_rows: int | None = None) -> list[list[int]]:
    """Group indices by length (longest first) so each padded batch holds at most `token_budget` tokens.

    Sorting keeps padding small; longest-first means an out-of-memory error shows up in the first batch.
    A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # longest in the batch sets the padded width
        if current and (width * (len(current) + 1) > token_budget or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def batched_sequence_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    token_budget: int,
    progress: bool = False,
    desc: str = "log-probs",
) -> list[float]:
    """Summed response log-probs for many sequences, batched by length under a token budget."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = [0.0] * len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    for batch in tqdm(length_batches(lengths, token_budget), desc=desc, unit="batch", disable=not progress):
        seqs = build_batch([prompt_ids[i] for i in batch], [response_ids[i] for i in batch], pad_id).to(device)
        for i, value in zip(batch, sequence_logps(model, seqs).tolist()):
            out[i] = value
    return out
