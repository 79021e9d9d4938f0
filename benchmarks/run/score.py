"""The score variants: ours (modpo_pipe.score.run_score, its reference-log-prob and reward calls timed) and
the same work in dataset order with pad-to-longest batches; and the real-token share of ours' batch plan."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.run.baseline import pad_right, plain_logps
from benchmarks.run.measure import clock, process_peak_rss_bytes, since
from benchmarks.run.workload import REWARD_NAMES, Size, load_pairs, make_pairs, workload_settings


class _TokenCounter:
    """A forward pre-hook counting the slots and real tokens of every batch a model sees."""

    def __init__(self) -> None:
        self.slots = self.tokens = 0

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            self.slots += mask.numel()
            self.tokens += int(mask.sum())


def child_score_ours(spec: dict[str, Any], size: Size, pack: bool = True) -> dict[str, Any]:
    """modpo_pipe.score.run_score itself; the reference-log-prob and reward calls it makes are timed."""
    import modpo_pipe.logprobs as logprobs
    import modpo_pipe.rewards as rewards_mod
    import modpo_pipe.score as score_mod

    logprobs.PACK_SHARED_PROMPTS = pack
    parts: dict[str, float] = {}
    cpu_parts: dict[str, float] = {}
    ref_stats: dict[str, int] = {}
    counter = _TokenCounter()

    def add(key: str, start: tuple[float, float]) -> None:
        wall, cpu = since(start)
        parts[key], cpu_parts[key] = parts.get(key, 0.0) + wall, cpu_parts.get(key, 0.0) + cpu

    real_logps, real_score, real_batch = (score_mod.batched_sequence_logps, rewards_mod.Reward.score,
                                          rewards_mod.ModelReward._score_batch)

    def batched_sequence_logps(*args: Any, **kwargs: Any) -> list[float]:  # once per chunk of pairs
        t, stats = clock(), {}
        out = real_logps(*args, **kwargs, stats=stats)
        add("ref", t)
        for key, value in stats.items():
            ref_stats[key] = ref_stats.get(key, 0) + value
        return out

    def score(self: Any, *args: Any, **kwargs: Any) -> list[float]:
        t = clock()
        out = real_score(self, *args, **kwargs)
        add(f"reward_{self.name}", t)
        return out

    def score_batch(self: Any, inputs: Any) -> list[float]:
        handle = self.model.register_forward_pre_hook(counter, with_kwargs=True)
        try:
            return real_batch(self, inputs)
        finally:
            handle.remove()

    score_mod.batched_sequence_logps = batched_sequence_logps
    rewards_mod.Reward.score, rewards_mod.ModelReward._score_batch = score, score_batch
    out = Path(spec["root"]) / f"scored-bench-{os.getpid()}.parquet"
    started = time.perf_counter()
    try:
        score_mod.run_score(workload_settings(spec), Path(spec["pairs"]), out, progress=False)
    finally:
        score_mod.batched_sequence_logps = real_logps
        rewards_mod.Reward.score, rewards_mod.ModelReward._score_batch = real_score, real_batch
        out.unlink(missing_ok=True)
    total = time.perf_counter() - started
    return {"pairs": size.score_pairs, **_score_result(size.score_pairs, parts, cpu_parts), "end_to_end_s": total,
            "ref_slots": ref_stats.get("slots", 0), "ref_tokens": ref_stats.get("tokens", 0),
            "reward_slots": counter.slots, "reward_tokens": counter.tokens,
            "peak_rss": process_peak_rss_bytes()}


def _score_result(pairs: int, parts: dict[str, float], cpu_parts: dict[str, float]) -> dict[str, Any]:
    wall, cpu = sum(parts.values()), sum(cpu_parts.values())
    return {"compute_s": wall, "compute_cpu_s": cpu, "pairs_per_s": pairs / wall, "cpu_pairs_per_s": pairs / cpu,
            "parts_s": parts, "cpu_parts_s": cpu_parts}


def child_score_baseline(spec: dict[str, Any], size: Size) -> dict[str, Any]:
    """The same work in dataset order: reference log-probs in fixed-size pad-to-longest batches with full
    logits, each reward model in batches of [score].reward_batch_size texts, pad-to-longest."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from modpo_pipe.config import ScoreSettings

    table = pq.read_table(spec["pairs"])
    pairs = load_pairs(spec["pairs"], size.score_pairs)
    messages = [json.loads(m) for m in table.column("prompt_messages").to_pylist()]
    texts_1, texts_2 = zip(*table.column("responses").to_pylist())
    parts: dict[str, float] = {}
    cpu_parts: dict[str, float] = {}
    counts = {"ref_slots": 0, "ref_tokens": 0, "reward_slots": 0, "reward_tokens": 0}
    started = time.perf_counter()

    ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32).eval()
    sequences = [(p.prompt_ids, r) for p in pairs for r in (p.ids_1, p.ids_2)]  # dataset order
    t = clock()
    with torch.no_grad():
        for i in range(0, len(sequences), size.baseline_ref_rows):
            chunk = sequences[i : i + size.baseline_ref_rows]
            ids, attn, resp = pad_right([p for p, _ in chunk], [r for _, r in chunk])
            plain_logps(ref, ids, attn, resp).tolist()
            counts["ref_slots"] += ids.numel()
            counts["ref_tokens"] += int(attn.sum())
    parts["ref"], cpu_parts["ref"] = since(t)
    del ref

    batch_size = ScoreSettings().reward_batch_size
    for name in REWARD_NAMES:
        path = spec["rewards"][name]
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model.config.pad_token_id = tokenizer.pad_token_id
        convs = [[*messages[i], {"role": "assistant", "content": text}]
                 for i in range(size.score_pairs) for text in (texts_1[i], texts_2[i])]
        t = clock()
        with torch.no_grad():
            for i in range(0, len(convs), batch_size):
                texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs[i : i + batch_size]]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                model(**enc).logits[:, 0].tolist()
                counts["reward_slots"] += enc["attention_mask"].numel()
                counts["reward_tokens"] += int(enc["attention_mask"].sum())
        parts[f"reward_{name}"], cpu_parts[f"reward_{name}"] = since(t)
        del model
    return {"pairs": size.score_pairs, **_score_result(size.score_pairs, parts, cpu_parts),
            "end_to_end_s": time.perf_counter() - started, **counts,
            "peak_rss": process_peak_rss_bytes()}


def planned_shares(size: Size, n: int = 1024) -> tuple[float, float]:
    """Real-token share of the reference-log-prob batches for n pairs, from the batch plan alone (no model):
    ours (modpo_pipe.logprobs' grouping and packing) and the baseline's dataset-order batches."""
    from modpo_pipe.config import ScoreSettings
    from modpo_pipe.logprobs import group_by_prompt, pack_batches

    pairs = make_pairs(size, n)
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.ids_1 for p in pairs] + [p.ids_2 for p in pairs]
    groups = group_by_prompt(prompts, responses)
    lengths = [len(prompts[g[0]]) + sum(len(responses[i]) for i in g) for g in groups]
    slots = sum(max(sum(lengths[g] for g in row) for row in rows) * len(rows)
                for rows in pack_batches(lengths, ScoreSettings().batch_tokens))
    ordered = [len(p.prompt_ids) + len(r) for p in pairs for r in (p.ids_1, p.ids_2)]
    chunks = [ordered[i : i + size.baseline_ref_rows] for i in range(0, len(ordered), size.baseline_ref_rows)]
    return sum(lengths) / slots, sum(ordered) / sum(max(c) * len(c) for c in chunks)
