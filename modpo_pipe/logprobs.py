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
from typing import Any

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

    def split(self) -> tuple[list[list[int]], list[list[int]]]:
        """The (prompt ids, response ids) of every row, padding dropped."""
        ids = self.input_ids.cpu()
        real = self.attention_mask.cpu().bool()
        response = self.response_mask.cpu()
        prompts = [ids[i][real[i] & ~response[i]].tolist() for i in range(len(ids))]
        responses = [ids[i][response[i]].tolist() for i in range(len(ids))]
        return prompts, responses


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


def sequence_logps(model: torch.nn.Module, batch: SequenceBatch, chunk_rows: int = 2048,
                   wrapped: bool = False) -> torch.Tensor:
    """Summed response log-probs per sequence, (B,) float32. Differentiable when grad is enabled.

    For packable models (see `can_pack`) the rows are repacked first: rows with the same prompt share
    one copy of it, and short sequences share rows, so prompt tokens and padding are not computed twice.

    `wrapped`: the model is distributed (DDP, FSDP, DeepSpeed). Its own forward must run: that is where FSDP
    gathers the sharded weights and DeepSpeed and DDP do their bookkeeping, so neither packing nor a direct
    call of the inner decoder and lm_head is allowed. Logits are kept from the first column that predicts a
    response token on.
    """
    inner = _unwrap(model)
    if wrapped:
        return _wrapped_sequence_logps(model, batch)
    if PACK_SHARED_PROMPTS and can_pack(model, int(batch.attention_mask.sum(-1).max()) if len(batch.input_ids) else 0):
        prompts, responses = batch.split()
        packed = pack_sequences(prompts, responses, pad_id=0).to(batch.input_ids.device)
        return packed_sequence_logps(model, packed, chunk_rows)
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
    return _sum_per_row(_head_logps(head, states, targets, chunk_rows), pred_mask)


def _wrapped_sequence_logps(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    width = batch.input_ids.shape[1]
    columns = batch.response_mask[:, 1:].any(0).nonzero()
    first = int(columns[0]) if len(columns) else width - 1  # the first column whose logits predict a response token
    config = getattr(_unwrap(getattr(model, "module", model)), "config", None)  # DDP and DeepSpeed: .module
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_FAMILIES:
        first = 0  # families not known to take logits_to_keep: all logits
    keep = {"logits_to_keep": width - first} if first else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False, **keep).logits  # columns first .. width - 1
    pred_mask = batch.response_mask[:, 1:][:, first:]
    per_token = token_logps(logits[:, :-1][pred_mask], batch.input_ids[:, first + 1:][pred_mask])
    return _sum_per_row(per_token, pred_mask)


# Logits (tokens x vocabulary) above which training recomputes the head rather than keep them for the backward
# pass: 2^27 float32 logits are 512 MiB (4,096 response tokens at a 32k vocabulary, 1,024 at 128k). Below it the
# extra head forward would cost time for little memory; above it the kept logits are the largest activation.
RECOMPUTE_HEAD_ELEMENTS = 2**27
# Logits one chunk of `chunked_head_logps` holds at a time: 2^25 float32 logits, 128 MiB (256 rows at 128k).
HEAD_CHUNK_ELEMENTS = 2**25


def _head_logps(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """token_logps of lm_head(states), a chunk of rows at a time so the (rows, vocab) logits stay small. With
    gradients on and more than RECOMPUTE_HEAD_ELEMENTS logits, `chunked_head_logps` (nothing vocabulary-sized kept
    for the backward pass); below that, keeping the logits is cheaper than computing them twice."""
    if states.shape[0] == 0:
        return torch.zeros(0, device=states.device)
    if torch.is_grad_enabled() and states.shape[0] * _vocab_size(head) > RECOMPUTE_HEAD_ELEMENTS:
        return chunked_head_logps(head, states, targets)
    return torch.cat([
        token_logps(head(states[i : i + chunk_rows]), targets[i : i + chunk_rows])
        for i in range(0, states.shape[0], chunk_rows)
    ])


def _vocab_size(head: torch.nn.Module) -> int:
    out_features = getattr(head, "out_features", None)  # nn.Linear and peft's LoRA layers
    return int(out_features) if out_features else int(head.weight.shape[0])


def chunked_head_logps(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor,
                       chunk_elements: int = HEAD_CHUNK_ELEMENTS) -> torch.Tensor:
    """token_logps of head(states) that never holds the (tokens, vocab) logits: each chunk of rows is
    checkpointed, so its logits are freed after the forward and recomputed in the backward pass. What the
    backward keeps is the states (which the decoder's graph holds anyway); the peak is a few chunks' logits,
    whatever the vocabulary and token count, for one extra head forward. Values and gradients (to the states and
    to the head's weights, LoRA ones included) are those of the plain head."""
    from torch.utils.checkpoint import checkpoint

    if states.shape[0] == 0:
        return torch.zeros(0, device=states.device)
    rows = max(1, chunk_elements // _vocab_size(head))

    def chunk(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        return token_logps(head(part), part_targets)

    return torch.cat([
        checkpoint(chunk, states[i : i + rows], targets[i : i + rows], use_reentrant=False,
                   preserve_rng_state=False)  # the head draws no random numbers
        for i in range(0, states.shape[0], rows)
    ])


# --- Packed batches: a prompt computed once for all its responses, several sequences per row ---
#
# A row holds one or more groups laid out as [prompt | response a | response b | ...] then padding. Each
# response's position ids restart where its prompt ends, and a 4D attention mask lets a token see its own
# group's prompt and the earlier tokens of its own response only. Every response therefore gets exactly the
# attention context (and positions) it has alone, so the sums equal the padded path's up to float rounding,
# while the shared prompt's tokens are computed once and rows carry little padding.

PACK_SHARED_PROMPTS = True  # False: always the padded path (benchmarks flip it to measure the difference)

# Decoder-only families whose attention takes a custom 4D mask and whose positions come from position_ids
# alone (rotary), so a packed row computes what separate rows would. Others take the padded path.
_PACKABLE_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"}

# Most tokens one group (a prompt and the responses sharing it) may hold; only prompts with more than two
# responses are split. Rows are never made wider than their longest group: attention over a row costs
# width^2 whether or not the mask hides most of it (the CPU and GPU SDPA kernels compute masked blocks),
# so packing fills a row's leftover space with short groups but never widens it.
MAX_GROUP_TOKENS = 1024


def can_pack(model: torch.nn.Module, longest_sequence: int = 0) -> bool:
    """Whether `model` runs packed rows exactly: a packable family, SDPA, eager or flex attention, and no sliding
    window shorter than the longest sequence (a 4D mask replaces the sliding-window mask)."""
    config = getattr(_unwrap(model), "config", None)
    if getattr(config, "model_type", None) not in _PACKABLE_FAMILIES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", "flex_attention"):
        return False
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (
        getattr(config, "use_sliding_window", True)
        and any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ["sliding_attention"]))
    )
    return not (uses_window and longest_sequence > window)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (R, W) long
    position_ids: torch.Tensor  # (R, W) long: each response restarts after its prompt
    group: torch.Tensor  # (R, W) long: group of each slot; padding slots get their own negative ids
    segment: torch.Tensor  # (R, W) long: 0 prompt or padding, k >= 1 the k-th response of the group
    pred_index: torch.Tensor  # (N,) long: flat (R * W) index of the state that predicts each response token
    targets: torch.Tensor  # (N,) long: the response tokens
    seq_index: torch.Tensor  # (N,) long: the sequence each response token belongs to
    num_sequences: int
    num_tokens: int  # real (non-padding) slots

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {f: getattr(self, f).to(device) for f in ("input_ids", "position_ids", "group", "segment",
                                                          "pred_index", "targets", "seq_index")}
        return PackedBatch(**moved, num_sequences=self.num_sequences, num_tokens=self.num_tokens)

    @property
    def num_slots(self) -> int:
        return self.input_ids.numel()

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(R, 1, W, W): True (or 0.0 for a float `dtype`) where query slot q may attend key slot k."""
        width = self.input_ids.shape[1]
        q_group, k_group = self.group.unsqueeze(2), self.group.unsqueeze(1)
        q_seg, k_seg = self.segment.unsqueeze(2), self.segment.unsqueeze(1)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.group.device).tril()
        allowed = (q_group == k_group) & causal & ((k_seg == 0) | (k_seg == q_seg))
        allowed = allowed.unsqueeze(1)
        if dtype is None or dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def block_mask(self) -> Any:
        """`attention_mask` as a FlexAttention BlockMask, for models loaded with attn_implementation =
        "flex_attention": the same rule given as a function, evaluated per 128 x 128 block, so no (R, W, W) mask
        is held and the kernel skips the blocks nothing may attend (other groups, padding)."""
        from torch.nn.attention.flex_attention import create_block_mask

        group, segment = self.group, self.segment

        def allowed(row: torch.Tensor, head: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            same_group = group[row, q] == group[row, k]
            return same_group & (k <= q) & ((segment[row, k] == 0) | (segment[row, k] == segment[row, q]))

        rows, width = self.input_ids.shape
        return create_block_mask(allowed, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=self.group.device)


def group_by_prompt(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    max_group_tokens: int = MAX_GROUP_TOKENS,
) -> list[list[int]]:
    """Sequence indices grouped by identical prompt, each group's prompt + responses at most
    `max_group_tokens` long, except that a group always takes two responses when it can (a pair always
    shares its prompt)."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompt_ids):
        by_prompt.setdefault(tuple(p), []).append(i)
    groups: list[list[int]] = []
    for members in by_prompt.values():
        current: list[int] = []
        used = len(prompt_ids[members[0]])
        for i in members:
            if len(current) >= 2 and used + len(response_ids[i]) > max_group_tokens:
                groups.append(current)
                current, used = [], len(prompt_ids[i])
            current.append(i)
            used += len(response_ids[i])
        groups.append(current)
    return groups


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, each row's lengths summing to at most `width` (an
    item longer than `width` gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def pack_batches(lengths: Sequence[int], token_budget: int) -> list[list[list[int]]]:
    """Batches of rows of item indices. Each batch is as wide as its longest item and holds at most
    `token_budget` slots (at least one row); each row starts with the longest item left and is topped up with
    the longest items that still fit, so short items fill the space padding would take."""
    import bisect

    pool = sorted(range(len(lengths)), key=lambda i: lengths[i])  # ascending
    keys = [lengths[i] for i in pool]
    batches: list[list[list[int]]] = []
    while pool:
        width = keys[-1]
        rows: list[list[int]] = []
        while pool and (not rows or (len(rows) + 1) * width <= token_budget):
            row, space = [pool.pop()], width - keys.pop()
            while pool and space > 0:
                at = bisect.bisect_right(keys, space) - 1  # the longest item that fits
                if at < 0:
                    break
                space -= keys.pop(at)
                row.append(pool.pop(at))
            rows.append(row)
        batches.append(rows)
    return batches


def pack_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    width: int | None = None,
    groups: list[list[int]] | None = None,
    rows: list[list[int]] | None = None,
) -> PackedBatch:
    """Lay the sequences out as packed rows: one prompt per group of responses sharing it (`groups`, default
    `group_by_prompt`), groups packed first-fit into rows `width` wide (default: the longest group, so no row
    is wider than needed), or as given by `rows` (lists of group indices)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    if groups is None:
        groups = group_by_prompt(prompt_ids, response_ids)
    group_lengths = [len(prompt_ids[g[0]]) + sum(len(response_ids[i]) for i in g) for g in groups]
    if rows is None:
        rows = pack_rows(group_lengths, max(width or 0, max(group_lengths, default=1)))
    width = max(sum(group_lengths[g] for g in row) for row in rows) if rows else 1
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    # padding slots: a group of their own each (they attend only to themselves, so no row is all masked)
    group = -1 - torch.arange(n_rows * width, dtype=torch.long).view(n_rows, width)
    segment = torch.zeros((n_rows, width), dtype=torch.long)
    pred_index: list[torch.Tensor] = []
    seq_index: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for r, row in enumerate(rows):
        start = 0
        for g in row:
            members = groups[g]
            prompt = list(prompt_ids[members[0]])
            p_len = len(prompt)
            input_ids[r, start : start + p_len] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, start : start + p_len] = torch.arange(p_len)
            group[r, start : start + group_lengths[g]] = g
            at = start + p_len
            for k, i in enumerate(members, start=1):
                resp = torch.tensor(list(response_ids[i]), dtype=torch.long)
                n = len(resp)
                if n:
                    input_ids[r, at : at + n] = resp
                    position_ids[r, at : at + n] = torch.arange(p_len, p_len + n)
                    segment[r, at : at + n] = k
                    # token j of the response is predicted by the state before it: the prompt's last slot
                    # for j = 0 (none when the prompt is empty, as in the padded path), else slot at + j - 1
                    flat = r * width + torch.arange(at - 1, at + n - 1)
                    first = 0 if p_len else 1
                    flat[0] = r * width + start + p_len - 1
                    pred_index.append(flat[first:])
                    targets.append(resp[first:])
                    seq_index.append(torch.full((n - first,), i, dtype=torch.long))
                at += n
            start += group_lengths[g]
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return PackedBatch(input_ids, position_ids, group, segment, cat(pred_index), cat(targets), cat(seq_index),
                       num_sequences=len(prompt_ids), num_tokens=sum(group_lengths))


def packed_sequence_logps(model: torch.nn.Module, packed: PackedBatch, chunk_rows: int = 2048) -> torch.Tensor:
    """Summed response log-probs per sequence of a packed batch, (num_sequences,) float32; differentiable."""
    inner = _unwrap(model)
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    implementation = getattr(inner.config, "_attn_implementation", None)
    if implementation == "flex_attention":
        mask = packed.block_mask()
    else:  # eager adds the mask to the scores: a float one; SDPA takes booleans
        mask = packed.attention_mask(next(decoder.parameters()).dtype if implementation == "eager" else torch.bool)
    hidden = decoder(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                     use_cache=False).last_hidden_state
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed.pred_index)
    per_token = _head_logps(head, states, packed.targets, chunk_rows)
    out = torch.zeros(packed.num_sequences, device=per_token.device)
    return out.index_add(0, packed.seq_index, per_token)


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
    stats: dict[str, int] | None = None,
) -> list[float]:
    """Summed response log-probs for many sequences, batched under a token budget.

    Packable models (see `can_pack`): sequences sharing a prompt (both responses of a pair, all 2P of a
    prompt) are grouped so the prompt is computed once, and each batch's rows are topped up with short
    groups (`pack_batches`). Others: padded batches of similar lengths. `stats`, when given, receives the
    work done: `slots` (batch positions computed), `tokens` (real ones among them), `sequence_tokens`
    (prompt + response summed over the sequences) and `batches`.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = [0.0] * len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    counts = {"slots": 0, "tokens": 0, "sequence_tokens": sum(lengths), "batches": 0}
    if PACK_SHARED_PROMPTS and can_pack(model, max(lengths, default=0)):
        groups = group_by_prompt(prompt_ids, response_ids)
        group_lengths = [len(prompt_ids[g[0]]) + sum(len(response_ids[i]) for i in g) for g in groups]
        for rows in tqdm(pack_batches(group_lengths, token_budget), desc=desc, unit="batch", disable=not progress):
            members = [groups[g] for row in rows for g in row]
            index = [i for g in members for i in g]
            local = {i: k for k, i in enumerate(index)}
            numbering = iter(range(len(members)))
            packed = pack_sequences([prompt_ids[i] for i in index], [response_ids[i] for i in index], pad_id,
                                    groups=[[local[i] for i in g] for g in members],
                                    rows=[[next(numbering) for _ in row] for row in rows])
            values = packed_sequence_logps(model, packed.to(device)).tolist()
            for i, value in zip(index, values):
                out[i] = value
            counts["slots"] += packed.num_slots
            counts["tokens"] += packed.num_tokens
            counts["batches"] += 1
    else:
        for batch in tqdm(length_batches(lengths, token_budget), desc=desc, unit="batch", disable=not progress):
            seqs = build_batch([prompt_ids[i] for i in batch], [response_ids[i] for i in batch], pad_id).to(device)
            for i, value in zip(batch, sequence_logps(model, seqs).tolist()):
                out[i] = value
            counts["slots"] += seqs.input_ids.numel()
            counts["tokens"] += seqs.num_tokens
            counts["batches"] += 1
    if stats is not None:
        stats.update(counts)
    return out


# --- Micro-batches of a training step, by a token budget ---

def token_budget_micro_batches(group_tokens: Sequence[int], token_budget: int) -> list[list[int]]:
    """Cut a step's groups, in order, into micro-batches of at most `token_budget` tokens (indices into
    `group_tokens`, each group's tokens as its packed forward computes them: prompt once, every response). Whole
    groups only: a group's pairs need all its responses in one forward, so a group above the budget is a
    micro-batch of its own. Order is kept, so the step and its loss are the same however it is cut."""
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    batches: list[list[int]] = []
    used = 0
    for i, tokens in enumerate(group_tokens):
        if batches and used + tokens <= token_budget:
            batches[-1].append(i)
            used += tokens
        else:
            batches.append([i])
            used = tokens
    return batches


# Bytes of activations a token keeps for the backward pass, per transformer layer, in units of (hidden, MLP
# width): a Llama-style layer saves about 10 hidden-sized and 4 MLP-sized vectors a token (norms, q/k/v and
# rotary outputs, attention output, gate/up/product), 2 bytes each in bfloat16; doubled for the backward pass's
# temporaries and the allocator's slack. An estimate, not a bound: [train].micro_batch_tokens overrides it.
ACTIVATION_BYTES_PER_TOKEN = (40, 16)
FREE_MEMORY_SHARE = 0.8  # of the memory left after weights, gradients and optimizer moments
MIN_AUTO_TOKENS = 512


def auto_micro_batch_tokens(free_bytes: int, config: Any, trainable_params: int, frozen_copies_bytes: int = 0,
                            trainable_layers: int | None = None, checkpointing: bool = False) -> int:
    """A token budget for one micro-batch from the device memory free now (`free_bytes`, before the first step).
    Set aside first: what the first optimizer step will still allocate (float32 gradients and AdamW's two moments
    of each trainable weight, 12 bytes; `frozen_copies_bytes`, e.g. autocast's bfloat16 copies of float32
    weights) and the LM head's logits and their gradient (at most RECOMPUTE_HEAD_ELEMENTS each: above that the
    head is recomputed). FREE_MEMORY_SHARE of the rest, divided by the activation bytes a token keeps in the
    layers that backpropagate (`trainable_layers`, default all; with `checkpointing`, a layer keeps its input
    only and one layer at a time holds the rest). At least MIN_AUTO_TOKENS."""
    hidden = int(config.hidden_size)
    width = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    layers = max(1, int(trainable_layers if trainable_layers is not None else config.num_hidden_layers))
    per_layer = ACTIVATION_BYTES_PER_TOKEN[0] * hidden + ACTIVATION_BYTES_PER_TOKEN[1] * width
    per_token = layers * 2 * hidden + per_layer if checkpointing else layers * per_layer
    head = 2 * 4 * RECOMPUTE_HEAD_ELEMENTS
    spare = (free_bytes - 12 * trainable_params - frozen_copies_bytes - head) * FREE_MEMORY_SHARE
    return max(MIN_AUTO_TOKENS, int(spare // per_token))


def rank_micro_batches(step_groups: Sequence[int], group_tokens: Sequence[int], token_budget: int, rank: int = 0,
                       processes: int = 1) -> list[list[int]]:
    """Process `rank`'s share of a step (every processes-th group from the rank-th; `group_tokens` aligned with
    `step_groups`) cut by `token_budget`, then padded with empty micro-batches to the busiest process's count: the
    gradient reductions of DDP, FSDP and DeepSpeed need every process to run as many backward passes. Every
    process computes every share's cut, so they agree without talking."""
    shares = [list(range(r, len(step_groups), processes)) for r in range(processes)]
    cuts = [token_budget_micro_batches([group_tokens[i] for i in share], token_budget) for share in shares]
    mine = [[step_groups[shares[rank][i]] for i in batch] for batch in cuts[rank]]
    return mine + [[] for _ in range(max(map(len, cuts)) - len(mine))]
