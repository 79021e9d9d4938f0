"""The fixed synthetic workload every variant runs on: its sizes, its pairs, and the models and Parquet files
built from them (workload.json lists the paths); and the pieces of it a variant reads back."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.synthetic import (
    EOS_ID,
    FIRST_WORD,
    PAD_ID,
    SMOLLM2_135M,
    TINY,
    llama,
    make_tokenizer,
    words,
    write_policy,
)

REWARD_NAMES = ("a", "b")


@dataclass
class Size:
    """One workload: model shapes and how much of each stage to run."""

    name: str
    model: dict[str, Any]  # LlamaConfig keyword arguments (policy = reference)
    reward_model: dict[str, Any]  # LlamaConfig keyword arguments of both reward models
    train_pairs: int
    train_batch: int  # pairs per optimizer step (one micro-batch)
    score_pairs: int
    gen_prompts: int
    gen_n: int  # samples per prompt
    gen_max_new_tokens: int
    gen_mean_tokens: int  # mean response length the EOS bias aims at (geometric lengths)
    prompt_tokens: tuple[int, int] = (20, 400)
    response_tokens: tuple[int, int] = (10, 300)
    lora_r: int = 16
    baseline_ref_rows: int = 8  # sequences per baseline reference-log-prob batch
    matmul_seconds: float = 2.0  # how long the matmul ceiling is measured (before and after training)
    extras: bool = True  # run the ablations (ours without packing, gradient checkpointing) by default
    vllm: bool = True  # run the vLLM backend where vLLM is installed
    seed: int = 0


SIZES = {
    "default": Size("default", SMOLLM2_135M, llama(256, 768, 6, 4, 2, 49152), train_pairs=16, train_batch=4,
                    score_pairs=32, gen_prompts=8, gen_n=2, gen_max_new_tokens=300, gen_mean_tokens=100),
    "quick": Size("quick", llama(256, 768, 4, 4, 2, 8192), llama(128, 384, 2, 2, 1, 8192), train_pairs=8,
                  train_batch=4, score_pairs=16, gen_prompts=4, gen_n=2, gen_max_new_tokens=200,
                  gen_mean_tokens=70, matmul_seconds=1.0, extras=False),
    # for the CI smoke test only: the quick code path on a model small enough to run in seconds
    "tiny": Size("tiny", TINY, llama(64, 128, 1, 2, 1, 512), train_pairs=4, train_batch=2, score_pairs=4,
                 gen_prompts=2, gen_n=2, gen_max_new_tokens=8, gen_mean_tokens=4, prompt_tokens=(5, 30),
                 response_tokens=(3, 20), lora_r=4, matmul_seconds=0.1, vllm=False),
}


@dataclass
class Pair:
    prompt_ids: list[int]
    ids_1: list[int]
    ids_2: list[int]


def make_pairs(size: Size, n: int) -> list[Pair]:
    rng = random.Random(size.seed)
    vocab = size.model["vocab_size"]

    def ids(bounds: tuple[int, int]) -> list[int]:
        return [rng.randrange(FIRST_WORD, vocab) for _ in range(rng.randint(*bounds))]

    return [Pair(ids(size.prompt_tokens), ids(size.response_tokens), ids(size.response_tokens)) for _ in range(n)]


def build_workload(size: Size, root: Path) -> dict[str, Any]:
    """Models, tokenizer, pairs.parquet and scored.parquet under `root`; returns the paths (workload.json)."""
    import pyarrow as pa
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from modpo_pipe import models, schema

    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / "workload.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()).get("size") == asdict(size):
        return json.loads(spec_path.read_text())
    tokenizer = make_tokenizer(size.model["vocab_size"])
    policy_dir = write_policy(root / "policy", size.model, size.seed)
    reward_dirs = {}
    for k, name in enumerate(REWARD_NAMES):
        torch.manual_seed(size.seed + 1 + k)
        rconfig = LlamaConfig(**size.reward_model, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None,
                              num_labels=1)
        reward_dirs[name] = str(root / f"reward_{name}")
        LlamaForSequenceClassification(rconfig).save_pretrained(reward_dirs[name], safe_serialization=True)
        tokenizer.save_pretrained(reward_dirs[name])

    n = max(size.train_pairs, size.score_pairs)
    pairs = make_pairs(size, n)
    rng = random.Random(size.seed + 7)
    fingerprint = models.tokenizer_fingerprint(tokenizer)
    # One group of two responses per synthetic pair (N = 2: one pair each, as before groups).
    columns: dict[str, list[Any]] = {
        "group_id": [f"pair{i}" for i in range(n)],
        "prompt_id": [f"prompt{i}" for i in range(n)],
        "prompt": [words(p.prompt_ids) for p in pairs],
        "prompt_messages": [json.dumps([{"role": "user", "content": words(p.prompt_ids)}]) for p in pairs],
        "prompt_ids": [p.prompt_ids for p in pairs],
        "responses": [[words(p.ids_1), words(p.ids_2)] for p in pairs],
        "response_ids": [[p.ids_1, p.ids_2] for p in pairs],
        "finish_reasons": [["stop", "stop"]] * n,
        "round": [0] * n,
        "gen_logps": [[None, None]] * n,
    }
    pairs_table = pa.table(columns, schema=schema.pairs_schema())
    policy_identity = {"path": str(policy_dir), "fingerprint": models.fingerprint(str(policy_dir))}
    pairs_path = root / "pairs.parquet"
    schema.write_table(pairs_table.slice(0, size.score_pairs), pairs_path,
                       schema.make_metadata("pairs", policy=policy_identity, tokenizer_fingerprint=fingerprint))

    scored = pairs_table
    reward_meta = {}
    for name in REWARD_NAMES:
        values = [rng.gauss(0.0, 1.0) for _ in range(2 * n)]
        scored = scored.append_column(schema.reward_column(name),
                                      pa.array([[values[i], values[n + i]] for i in range(n)], pa.list_(pa.float32())))
        reward_meta[name] = {"spec": reward_dirs[name], "fingerprint": "synthetic",
                             "mean": statistics.fmean(values), "std": statistics.pstdev(values)}
    # plausible values; the policy is not marked as the reference
    scored = scored.append_column(schema.REF_COLUMN[0], pa.array([[-10.0 * rng.random() for _ in range(2)]
                                                                 for _ in range(n)], pa.list_(pa.float32())))
    scored_path = root / "scored.parquet"
    train_rows = scored.slice(0, size.train_pairs).cast(schema.scored_schema(REWARD_NAMES))
    schema.write_table(train_rows, scored_path, schema.make_metadata(
        "scored", policy=policy_identity, tokenizer_fingerprint=fingerprint,
        ref={"path": str(policy_dir), "fingerprint": "synthetic-reference"}, rewards=reward_meta))

    spec = {"size": asdict(size), "root": str(root), "policy": str(policy_dir), "rewards": reward_dirs,
            "pairs": str(pairs_path), "scored": str(scored_path)}
    spec_path.write_text(json.dumps(spec, indent=1))
    return spec


def workload_settings(spec: dict[str, Any], **train: Any):
    """modpo-pipe Settings pointing at the workload's policy (also the reference) and its two reward models."""
    from modpo_pipe.config import GenerateSettings, ModelSettings, ScoreSettings, Settings, TrainSettings

    return Settings(model=ModelSettings(), generate=GenerateSettings(),
                    score=ScoreSettings(rewards=dict(spec["rewards"]), ref=spec["policy"]),
                    train=TrainSettings(policy=spec["policy"], **train))


def load_pairs(path: str, n: int) -> list[Pair]:
    """The first n pairs of a pairs.parquet or scored.parquet the workload wrote."""
    import pyarrow.parquet as pq

    table = pq.read_table(path).slice(0, n)
    return [Pair(p, a, b) for p, (a, b) in zip(table.column("prompt_ids").to_pylist(),
                                               table.column("response_ids").to_pylist())]


def size_of(spec: dict[str, Any]) -> Size:
    """The Size a workload.json was built with (JSON turned its tuples into lists)."""
    return Size(**{**spec["size"], "prompt_tokens": tuple(spec["size"]["prompt_tokens"]),
                   "response_tokens": tuple(spec["size"]["response_tokens"])})
