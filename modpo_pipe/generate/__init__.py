"""Stage 1, prompts -> pairs.parquet: sample 2P responses per prompt and store them as P disjoint pairs.

Token ids are stored as sampled; every later stage scores exactly those ids, never a re-tokenisation.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from modpo_pipe import schema
from modpo_pipe.config import Settings
from modpo_pipe.errors import ModpoError


@dataclass
class Sample:
    ids: list[int]  # response token ids, the EOS included when the model emitted it; nothing after it
    finish_reason: str  # "stop" | "length"
    logp: float | None  # the sampler's summed raw log-prob of ids (None when it cannot tell)


@dataclass
class GenerateReport:
    out: str
    prompts: int
    pairs: int
    skipped_invalid: int
    long_prompts_dropped: int
    long_prompts_truncated: int
    backend: str
    seconds: float
    response_tokens: int


def batch_seed(seed: int, batch_index: int) -> int:
    """A per-batch seed: reruns over the same prompts and batch size draw the same samples."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{batch_index}".encode()).digest()[:4], "little")


def split_response(generated: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Cut a generated row after its first stop token (kept); what follows is padding."""
    for pos, token in enumerate(generated):
        if token in stop_ids:
            return generated[: pos + 1], "stop"
    return generated, "length"


def choose_backend(name: str) -> str:
    if name != "auto":
        return name
    import torch

    from modpo_pipe.generate.vllm import vllm_available

    return "vllm" if torch.cuda.is_available() and vllm_available() else "transformers"


def render_prompts(records, tokenizer, settings: Settings) -> tuple[list, list[str], list[list[int]], int, int]:
    """Render and tokenise prompts, applying the long-prompt policy; returns the kept records too."""
    g = settings.generate
    kept, texts, ids_list = [], [], []
    dropped = truncated = 0
    from modpo_pipe.prompts import render

    for record in records:
        text, ids = render(record, tokenizer, g.chat_template)
        if len(ids) > g.max_prompt_tokens:
            if g.long_prompts == "drop":
                dropped += 1
                continue
            ids = ids[-g.max_prompt_tokens:]  # keep the end: it holds the question and the generation prompt
            text = tokenizer.decode(ids)
            truncated += 1
        kept.append(record)
        texts.append(text)
        ids_list.append(ids)
    return kept, texts, ids_list, dropped, truncated


def raw_messages(record) -> list[dict[str, str]]:
    """The un-rendered conversation, for reward models that apply their own chat template."""
    return record.messages if record.messages is not None else [{"role": "user", "content": record.prompt}]


def run_generate(settings: Settings, prompts_path: Path, out: Path, round_index: int = 0,
                 progress: bool = True) -> GenerateReport:
    from modpo_pipe import models
    from modpo_pipe.prompts import read_prompts

    g, m = settings.generate, settings.model
    if not g.policy:
        raise ModpoError("no policy: set [generate].policy in modpo.toml or pass --policy")
    started = time.time()
    records, prompt_stats = read_prompts(prompts_path, skip_invalid=g.skip_invalid)
    tokenizer = models.load_tokenizer(g.policy, m.trust_remote_code, what="[generate].policy")
    records, prompt_texts, prompt_ids, dropped, truncated = render_prompts(records, tokenizer, settings)
    if not records:
        raise ModpoError(f"{prompts_path}: every prompt is longer than max_prompt_tokens={g.max_prompt_tokens}")
    n = 2 * g.pairs_per_prompt
    backend = choose_backend(g.backend)
    if backend == "vllm":
        from modpo_pipe.generate.vllm import sample_vllm

        samples = sample_vllm(
            g.policy, prompt_ids, n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
            seed=g.seed, dtype=m.dtype, max_model_len=g.vllm_max_model_len,
            gpu_memory_utilization=g.vllm_gpu_memory_utilization,
            tensor_parallel_size=g.vllm_tensor_parallel_size, enforce_eager=g.vllm_enforce_eager,
            trust_remote_code=m.trust_remote_code,
        )
    else:
        from modpo_pipe.generate.hf import sample_transformers

        device = models.resolve_device(m.device)
        model = models.load_causal_lm(g.policy, dtype=models.resolve_dtype(m.dtype, device), device=device,
                                      trust_remote_code=m.trust_remote_code, what="[generate].policy")
        samples = sample_transformers(
            model, tokenizer, prompt_ids, n, temperature=g.temperature, top_p=g.top_p,
            max_new_tokens=g.max_new_tokens, seed=g.seed, batch_size=g.batch_size, progress=progress,
        )
    table = pairs_table(records, prompt_texts, prompt_ids, samples, tokenizer, round_index)
    metadata = schema.make_metadata(
        "pairs",
        policy=models.identity(g.policy),
        tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
        sampling={"backend": backend, "temperature": g.temperature, "top_p": g.top_p,
                  "max_new_tokens": g.max_new_tokens, "pairs_per_prompt": g.pairs_per_prompt,
                  "chat_template": g.chat_template, "max_prompt_tokens": g.max_prompt_tokens,
                  "dtype": m.dtype},
        seed=g.seed,
        round=round_index,
        prompts_file=str(prompts_path),
        counts={"prompts": len(records), "skipped_invalid": prompt_stats.skipped_invalid,
                "long_prompts_dropped": dropped, "long_prompts_truncated": truncated},
    )
    schema.write_table(table, out, metadata)
    response_tokens = sum(len(s.ids) for per_prompt in samples for s in per_prompt)
    return GenerateReport(str(out), len(records), table.num_rows, prompt_stats.skipped_invalid, dropped,
                          truncated, backend, time.time() - started, response_tokens)


def pairs_table(records, prompt_texts, prompt_ids, samples, tokenizer, round_index: int) -> pa.Table:
    """Rows of the pairs contract: samples 2k and 2k+1 of each prompt form pair k."""
    rows: dict[str, list] = {name: [] for name, _ in schema.PAIR_COLUMNS}
    for record, text, ids, per_prompt in zip(records, prompt_texts, prompt_ids, samples):
        for k in range(len(per_prompt) // 2):
            first, second = per_prompt[2 * k], per_prompt[2 * k + 1]
            rows["pair_id"].append(f"r{round_index}/{record.id}/{k}")
            rows["prompt_id"].append(record.id)
            rows["prompt"].append(text)
            rows["prompt_messages"].append(json.dumps(raw_messages(record), ensure_ascii=False))
            rows["prompt_ids"].append(ids)
            for j, sample in ((1, first), (2, second)):
                rows[f"response_{j}"].append(tokenizer.decode(sample.ids, skip_special_tokens=True))
                rows[f"response_ids_{j}"].append(sample.ids)
                rows[f"finish_reason_{j}"].append(sample.finish_reason)
                rows[f"gen_logp_{j}"].append(sample.logp)
            rows["round"].append(round_index)
    return pa.Table.from_pydict(rows, schema=schema.pairs_schema())
