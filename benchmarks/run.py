"""Every stage on one fixed synthetic workload, each against a plain baseline written here, as ratios
measured in the same run.

    python -m benchmarks.run --quick     # small model: a few minutes on 2 CPU cores
    python -m benchmarks.run             # a Llama config of SmolLM2-135M's size (about 30 min on 2 cores)

Options: --repeats N (interleave the variants N times; ratios are medians over repeats), --only
train,score,generate, --workdir DIR (keep the workload and per-variant JSON), --json FILE, --markdown.

What is compared (ours = the package's own functions; baseline = the plain loop in this file):
  train     modpo_pipe.train.train on a synthetic scored.parquet (cached reference log-probs, no reference
            model) vs a step that keeps the reference model loaded and recomputes its log-probs every step,
            with y1 and y2 as two padded forwards in dataset order; full fine-tuning and LoRA.
  score     modpo_pipe.score.run_score (reference log-probs + two reward models) vs the same work in
            dataset order with pad-to-longest batches; plus the share of real (non-pad) tokens.
  generate  modpo_pipe.generate.hf.sample_transformers vs one prompt per `generate` call; vLLM when installed.
  efficiency  ours' full fine-tuning FLOP/s (6 * params * tokens) over the measured fp32 matmul FLOP/s.

Each variant runs in a child process of its own (`--child NAME`) so peak memory is its own; "peak RSS" is
the resident-set high-water mark from the end of model set-up to the end of the last step (Linux
`clear_refs`), so it counts the models, the optimizer and the step, and not the checkpoint writing that
`train` does after the loop. The whole-process ru_maxrss is reported next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULT_MARK = "BENCHMARK_RESULT "
REWARD_NAMES = ("a", "b")


# --- workload ---------------------------------------------------------------------------------------------

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


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int) -> dict[str, Any]:
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hidden // heads,
            "vocab_size": vocab, "max_position_embeddings": 2048, "tie_word_embeddings": True,
            "rope_theta": 100000.0, "rms_norm_eps": 1e-5}


SMOLLM2_135M = _llama(576, 1536, 30, 9, 3, 49152)  # SmolLM2-135M's shape: 134.5M parameters
SIZES = {
    "default": Size("default", SMOLLM2_135M, _llama(256, 768, 6, 4, 2, 49152), train_pairs=16, train_batch=4,
                    score_pairs=32, gen_prompts=8, gen_n=2, gen_max_new_tokens=300, gen_mean_tokens=100),
    "quick": Size("quick", _llama(256, 768, 4, 4, 2, 8192), _llama(128, 384, 2, 2, 1, 8192), train_pairs=8,
                  train_batch=4, score_pairs=16, gen_prompts=4, gen_n=2, gen_max_new_tokens=200,
                  gen_mean_tokens=70, matmul_seconds=1.0, extras=False),
    # for the CI smoke test only: the quick code path on a model small enough to run in seconds
    "tiny": Size("tiny", _llama(64, 128, 2, 2, 1, 512), _llama(64, 128, 1, 2, 1, 512), train_pairs=4,
                 train_batch=2, score_pairs=4, gen_prompts=2, gen_n=2, gen_max_new_tokens=8, gen_mean_tokens=4,
                 prompt_tokens=(5, 30), response_tokens=(3, 20), lora_r=4, matmul_seconds=0.1, vllm=False),
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
        return [rng.randrange(_FIRST_WORD, vocab) for _ in range(rng.randint(*bounds))]

    return [Pair(ids(size.prompt_tokens), ids(size.response_tokens), ids(size.response_tokens)) for _ in range(n)]


# Vocabulary of the synthetic tokenizer: specials, then one word per id ("w123"), so text <-> ids is 1:1.
_SPECIALS = ["<pad>", "<eos>", "<unk>", "user:", "assistant:"]
_FIRST_WORD = len(_SPECIALS)
PAD_ID, EOS_ID = 0, 1
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    vocab.update({f"w{i}": i for i in range(_FIRST_WORD, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                      unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def build_workload(size: Size, root: Path) -> dict[str, Any]:
    """Models, tokenizer, pairs.parquet and scored.parquet under `root`; returns the paths (workload.json)."""
    import pyarrow as pa
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from modpo_pipe import models, schema

    root.mkdir(parents=True, exist_ok=True)
    spec_path = root / "workload.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()).get("size") == asdict(size):
        return json.loads(spec_path.read_text())
    torch.manual_seed(size.seed)
    vocab = size.model["vocab_size"]
    tokenizer = make_tokenizer(vocab)
    policy_dir = root / "policy"
    config = LlamaConfig(**size.model, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(policy_dir, safe_serialization=True)
    tokenizer.save_pretrained(policy_dir)
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


# --- measuring helpers --------------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the last reset (Linux), else the process's ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process_peak_rss_bytes()


def process_peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def clock() -> tuple[float, float]:
    """(wall, CPU) time now; the CPU time is this process's, all threads."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def matmul_flops(seconds: float = 2.0, n: int = 2048) -> tuple[float, float]:
    """The machine's fp32 arithmetic ceiling from n x n matmuls over about `seconds`: the best FLOP per wall
    second, and the best FLOP per CPU second (all threads; the figure a busy shared machine distorts least)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best_wall = best_cpu = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        torch.mm(a, b)
        wall, cpu = since(start)
        best_wall, best_cpu = max(best_wall, 2 * n**3 / wall), max(best_cpu, 2 * n**3 / max(cpu, 1e-9))
    return best_wall, best_cpu


def _settings(spec: dict[str, Any], **train: Any):
    from modpo_pipe.config import GenerateSettings, ModelSettings, ScoreSettings, Settings, TrainSettings

    return Settings(model=ModelSettings(), generate=GenerateSettings(),
                    score=ScoreSettings(rewards=dict(spec["rewards"]), ref=spec["policy"]),
                    train=TrainSettings(policy=spec["policy"], **train))


def _lora_config(size: Size):
    from peft import LoraConfig

    from modpo_pipe.config import TrainSettings

    t = TrainSettings()
    return LoraConfig(r=size.lora_r, lora_alpha=2 * size.lora_r, lora_dropout=0.0, target_modules=t.lora_targets,
                      task_type="CAUSAL_LM")


def _train_settings(size: Size, lora: bool, **extra: Any) -> dict[str, Any]:
    return {"batch_size": size.train_batch, "grad_accum": 1, "epochs": 1, "lr": 1e-4 if lora else 1e-5,
            "lora_r": size.lora_r if lora else 0, "lora_alpha": 2 * size.lora_r, "log_every": 1,
            "save_every": 0, **extra}


def _pair_tokens(pairs: list[Pair]) -> dict[str, int]:
    return {"unique_tokens": sum(len(p.prompt_ids) + len(p.ids_1) + len(p.ids_2) for p in pairs),
            "sequence_tokens": sum(2 * len(p.prompt_ids) + len(p.ids_1) + len(p.ids_2) for p in pairs)}


def _load_pairs(path: str, n: int) -> list[Pair]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).slice(0, n)
    return [Pair(p, a, b) for p, (a, b) in zip(table.column("prompt_ids").to_pylist(),
                                               table.column("response_ids").to_pylist())]


# --- train ----------------------------------------------------------------------------------------------------

def child_train_ours(spec: dict[str, Any], size: Size, lora: bool, pack: bool = True,
                     checkpointing: bool = False, flops: bool = False) -> dict[str, Any]:
    """modpo_pipe.train.train itself; the loop is timed from the end of set-up (its load_state call) to its
    last metrics line, and peak RSS is read at that line."""
    import torch

    import modpo_pipe.logprobs as logprobs
    import modpo_pipe.train as train_mod

    logprobs.PACK_SHARED_PROMPTS = pack
    peak_before = matmul_flops(size.matmul_seconds) if flops else None
    marks: dict[str, Any] = {"steps": []}
    real_load_state, real_append = train_mod.load_state, train_mod.append_jsonl

    def load_state(*args: Any, **kwargs: Any) -> int:
        step = real_load_state(*args, **kwargs)
        marks["reset"] = reset_peak_rss()
        marks["t0"] = clock()
        return step

    def append_jsonl(path: Path, record: dict[str, Any]) -> None:
        marks["steps"].append((clock(), record.get("pairs", 0)))
        marks["peak"] = peak_rss_bytes()
        real_append(path, record)

    train_mod.load_state, train_mod.append_jsonl = load_state, append_jsonl
    out = Path(tempfile.mkdtemp(prefix="train-", dir=spec["root"]))
    settings = _settings(spec, **_train_settings(size, lora, gradient_checkpointing=checkpointing))
    started = time.perf_counter()
    try:
        train_mod.train(settings, [Path(spec["scored"])], out, progress=False)
    finally:
        train_mod.load_state, train_mod.append_jsonl = real_load_state, real_append
        shutil.rmtree(out, ignore_errors=True)
    total = time.perf_counter() - started
    pairs = sum(n for _, n in marks["steps"])
    (end_wall, end_cpu), t0 = marks["steps"][-1][0], marks["t0"]
    result = {"pairs": pairs, "total_s": total, "threads": torch.get_num_threads(),
              **_loop_result(pairs, end_wall - t0[0], end_cpu - t0[1]),
              "peak_rss": marks["peak"], "peak_reset": marks["reset"], "process_peak_rss": process_peak_rss_bytes(),
              "step_s": [b[0][0] - a[0][0] for a, b in zip([(t0, 0)] + marks["steps"], marks["steps"])],
              **_pair_tokens(_load_pairs(spec["scored"], pairs))}
    if flops:
        result["params"] = sum(p.numel() for p in _count_model(spec).parameters())
        after = matmul_flops(size.matmul_seconds)
        result["matmul_flops"], result["matmul_flops_cpu"] = (max(x, y) for x, y in zip(peak_before, after))
    return result


def _loop_result(pairs: int, wall: float, cpu: float) -> dict[str, float]:
    return {"loop_s": wall, "loop_cpu_s": cpu, "pairs_per_s": pairs / wall, "cpu_pairs_per_s": pairs / cpu}


def _count_model(spec: dict[str, Any]):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["policy"]))


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


def child_train_baseline(spec: dict[str, Any], size: Size, lora: bool) -> dict[str, Any]:
    """A plain live-reference step: policy and reference both loaded; every step runs the reference on y1
    and on y2, then the policy on y1 and on y2 (two padded forwards each), in dataset order."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from modpo_pipe.losses import pair_loss

    torch.manual_seed(size.seed)
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32).eval().requires_grad_(False)
    if lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, _lora_config(size))
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4 if lora else 1e-5)
    table = pq.read_table(spec["scored"])
    pairs = _load_pairs(spec["scored"], size.train_pairs)
    teacher_all = torch.tensor([a - b for a, b in table.column("reward_a").to_pylist()])
    beta = 0.1
    reset = reset_peak_rss()
    t0 = clock()
    steps = []
    for start in range(0, len(pairs), size.train_batch):
        chunk = pairs[start : start + size.train_batch]
        prompts = [p.prompt_ids for p in chunk]
        b1, b2 = pad_right(prompts, [p.ids_1 for p in chunk]), pad_right(prompts, [p.ids_2 for p in chunk])
        with torch.no_grad():
            ref_1, ref_2 = plain_logps(ref, *b1), plain_logps(ref, *b2)
        logp_1, logp_2 = plain_logps(policy, *b1), plain_logps(policy, *b2)
        student = beta * ((logp_1 - ref_1) - (logp_2 - ref_2))
        loss = pair_loss(student, teacher_all[start : start + len(chunk)], "rpo-sym").mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(clock())
    wall, cpu = steps[-1][0] - t0[0], steps[-1][1] - t0[1]
    return {"pairs": len(pairs), "threads": torch.get_num_threads(), **_loop_result(len(pairs), wall, cpu),
            "peak_rss": peak_rss_bytes(), "peak_reset": reset, "process_peak_rss": process_peak_rss_bytes(),
            "step_s": [b[0] - a[0] for a, b in zip([t0] + steps, steps)], **_pair_tokens(pairs)}


# --- score ----------------------------------------------------------------------------------------------------

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
        score_mod.run_score(_settings(spec), Path(spec["pairs"]), out, progress=False)
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
    pairs = _load_pairs(spec["pairs"], size.score_pairs)
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


# --- generate -------------------------------------------------------------------------------------------------

def _generation_model(spec: dict[str, Any], size: Size):
    """The policy with a constant bias on the EOS logit, so sampled lengths spread around gen_mean_tokens
    (a random-init model would otherwise never stop) for both the baseline and ours."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32).eval()
    probe = torch.tensor([make_pairs(size, 1)[0].prompt_ids])
    with torch.inference_mode():
        lse = torch.logsumexp(model(input_ids=probe).logits[0].float(), -1).mean().item()
    bias = lse - math.log(max(size.gen_mean_tokens - 1, 1))  # p(EOS) ~ 1 / mean length

    def add_bias(module: Any, args: Any, output: Any) -> Any:
        output[..., EOS_ID] += bias
        return output

    model.get_output_embeddings().register_forward_hook(add_bias)
    return model


def _gen_prompts(size: Size) -> list[list[int]]:
    return [p.prompt_ids for p in make_pairs(size, size.gen_prompts)]


def child_generate_ours(spec: dict[str, Any], size: Size) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from modpo_pipe.config import GenerateSettings
    from modpo_pipe.generate.hf import sample_transformers

    model = _generation_model(spec, size)
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    prompts = _gen_prompts(size)
    t = clock()
    samples = sample_transformers(model, tokenizer, prompts, size.gen_n, temperature=1.0, top_p=1.0,
                                  max_new_tokens=size.gen_max_new_tokens, seed=size.seed,
                                  batch_size=GenerateSettings().batch_size, progress=False)
    return _gen_result([len(s.ids) for per_prompt in samples for s in per_prompt], *since(t))


def _gen_result(lengths: list[int], wall: float, cpu: float) -> dict[str, Any]:
    return {"tokens": sum(lengths), "seconds": wall, "cpu_seconds": cpu, "tokens_per_s": sum(lengths) / wall,
            "cpu_tokens_per_s": sum(lengths) / cpu, "mean_length": statistics.fmean(lengths),
            "max_length": max(lengths)}


def child_generate_baseline(spec: dict[str, Any], size: Size) -> dict[str, Any]:
    """One prompt per `generate` call (its n samples together), plain multinomial sampling."""
    import torch

    model = _generation_model(spec, size)
    prompts = _gen_prompts(size)
    torch.manual_seed(size.seed)
    lengths = []
    t = clock()
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                 dtype=torch.long), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=size.gen_max_new_tokens, num_return_sequences=size.gen_n,
                                 pad_token_id=PAD_ID, eos_token_id=EOS_ID)
            for row in out[:, len(prompt):].tolist():
                lengths.append(row.index(EOS_ID) + 1 if EOS_ID in row else len(row))
    return _gen_result(lengths, *since(t))


def child_generate_vllm(spec: dict[str, Any], size: Size) -> dict[str, Any]:
    """modpo_pipe.generate.sample with the vLLM backend, timed after a one-token call has started the engine
    (the start is reported apart). vLLM sees no EOS bias: its responses run to the token limit."""
    import importlib.util

    if not size.vllm:
        return {"skipped": f"vLLM is not run at size {size.name!r}"}
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed"}
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoTokenizer

    from modpo_pipe.generate import sample

    prompts = _gen_prompts(size)
    settings = _settings(spec)
    settings.generate.seed = size.seed
    settings.generate.vllm_max_model_len = max(len(p) for p in prompts) + size.gen_max_new_tokens
    settings.model.dtype = "float32"
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"])
    start = clock()
    settings.generate.max_new_tokens = 1
    sample(settings, spec["policy"], tokenizer, prompts[:1], 1, "vllm", progress=False)
    engine_start_s = since(start)[0]
    settings.generate.max_new_tokens = size.gen_max_new_tokens
    t = clock()
    samples = sample(settings, spec["policy"], tokenizer, prompts, size.gen_n, "vllm", progress=False)
    result = _gen_result([len(s.ids) for per_prompt in samples for s in per_prompt], *since(t))
    del result["cpu_tokens_per_s"]  # the engine computes in processes of its own: no CPU-time figure here
    return {**result, "engine_start_s": engine_start_s}


# --- variants and the parent ------------------------------------------------------------------------------------

VARIANTS = {
    "train-ours-full": lambda s, z: child_train_ours(s, z, lora=False, flops=True),
    "train-base-full": lambda s, z: child_train_baseline(s, z, lora=False),
    "train-ours-lora": lambda s, z: child_train_ours(s, z, lora=True),
    "train-base-lora": lambda s, z: child_train_baseline(s, z, lora=True),
    "train-ours-full-padded": lambda s, z: child_train_ours(s, z, lora=False, pack=False),
    "train-ours-lora-ckpt": lambda s, z: child_train_ours(s, z, lora=True, checkpointing=True),
    "score-ours": lambda s, z: child_score_ours(s, z),
    "score-base": lambda s, z: child_score_baseline(s, z),
    "score-ours-padded": lambda s, z: child_score_ours(s, z, pack=False),
    "gen-ours": lambda s, z: child_generate_ours(s, z),
    "gen-base": lambda s, z: child_generate_baseline(s, z),
    "gen-vllm": lambda s, z: child_generate_vllm(s, z),
}
SECTIONS = {
    "train": ["train-ours-full", "train-base-full", "train-ours-lora", "train-base-lora"],
    "score": ["score-ours", "score-base"],
    "generate": ["gen-ours", "gen-base", "gen-vllm"],
}
# What the changes measured here are worth: our code with the new packing off, and a memory option.
EXTRAS = {"train": ["train-ours-full-padded", "train-ours-lora-ckpt"], "score": ["score-ours-padded"]}


def run_child(name: str, spec_path: Path) -> dict[str, Any]:
    from transformers.utils import logging

    logging.disable_progress_bar()
    spec = json.loads(spec_path.read_text())
    size = Size(**{**spec["size"], "prompt_tokens": tuple(spec["size"]["prompt_tokens"]),
                   "response_tokens": tuple(spec["size"]["response_tokens"])})
    cpu = time.process_time()
    result = VARIANTS[name](spec, size)
    result["cpu_s"] = time.process_time() - cpu  # all threads: compare with wall time to see contention
    return result


def spawn(name: str, spec_path: Path, isolate: bool, threads: int | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    if not isolate:
        try:
            result = run_child(name, spec_path)
        except Exception as e:  # noqa: BLE001 - one variant's failure is reported, the others still run
            result = {"error": f"{type(e).__name__}: {e}"}
    else:
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--child", name, "--spec", str(spec_path)],
                              cwd=repo, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1][len(RESULT_MARK):])
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            result = {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result["wall_s"] = time.perf_counter() - started
    return result


@dataclass
class Row:
    stage: str
    metric: str
    ours: str
    baseline: str
    ratio: float | None  # from wall time (what the targets are about)
    target: str = ""
    met: bool | None = None
    cpu_ratio: float | None = None  # the same ratio from process CPU time: less distorted by other load


@dataclass
class Report:
    size: str
    machine: str
    repeats: int
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else None


def _get(runs: dict[str, list[dict[str, Any]]], name: str, key: str) -> list[float]:
    return [r[key] for r in runs.get(name, []) if key in r]


def _ratio(runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str) -> float | None:
    """Median over repeats of a[key] / b[key], pairing the i-th run of each (ratios within one repeat)."""
    xs, ys = _get(runs, a, key), _get(runs, b, key)
    return _median([x / y for x, y in zip(xs, ys) if y])


def _fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if unit == "GB":
        return f"{value / 2**30:.2f} GB"
    return f"{value:.{digits}g}{(' ' + unit) if unit else ''}"


def _met(value: float | None, ok: Any) -> bool | None:
    return None if value is None else bool(ok(value))


def summarise(report: Report) -> None:
    runs, rows = report.runs, report.rows
    med = lambda name, key: _median(_get(runs, name, key))  # noqa: E731

    def speed(stage: str, metric: str, ours: str, base: str, key: str, target: str = "", ok: Any = None) -> None:
        ratio = _ratio(runs, ours, base, key)
        rows.append(Row(stage, metric, _fmt(med(ours, key)), _fmt(med(base, key)), ratio, target,
                        _met(ratio, ok) if ok else None, _ratio(runs, ours, base, "cpu_" + key)))

    def memory(metric: str, ours: str, base: str, key: str, target: str = "", ok: Any = None) -> None:
        ratio = _ratio(runs, ours, base, key)
        rows.append(Row("train", metric, _fmt(med(ours, key), "GB"), _fmt(med(base, key), "GB"), ratio, target,
                        _met(ratio, ok) if ok else None))

    for kind, ours, base in (("full FT", "train-ours-full", "train-base-full"),
                             ("LoRA", "train-ours-lora", "train-base-lora")):
        if ours in runs:
            speed("train", f"{kind}: pairs/s", ours, base, "pairs_per_s", ">= 1.5x", lambda r: r >= 1.5)
            if kind == "LoRA":
                memory(f"{kind}: peak RSS (loop)", ours, base, "peak_rss", "<= 0.6x", lambda r: r <= 0.6)
            else:
                memory(f"{kind}: peak RSS (loop)", ours, base, "peak_rss")
            memory(f"{kind}: peak RSS (whole process)", ours, base, "process_peak_rss")
    if "train-ours-full-padded" in runs:
        speed("train", "ablation: full FT pairs/s, ours vs ours without packing", "train-ours-full",
              "train-ours-full-padded", "pairs_per_s")
        memory("ablation: full FT peak RSS, ours vs ours without packing", "train-ours-full",
               "train-ours-full-padded", "peak_rss")
    if "train-ours-lora-ckpt" in runs:
        speed("train", "option: LoRA pairs/s, with vs without gradient checkpointing", "train-ours-lora-ckpt",
              "train-ours-lora", "pairs_per_s")
        memory("option: LoRA + gradient checkpointing, peak RSS (loop) vs baseline LoRA", "train-ours-lora-ckpt",
               "train-base-lora", "peak_rss", "<= 0.6x", lambda r: r <= 0.6)
    if "score-ours" in runs:
        speed("score", "pairs/s (ref log-probs + 2 reward models)", "score-ours", "score-base", "pairs_per_s",
              "> 1x", lambda r: r > 1.0)
        for part, label in (("ref", "reference log-probs"), ("reward", "reward models")):
            share = {}
            for name in ("score-ours", "score-base"):
                share[name] = _median([x[f"{part}_tokens"] / x[f"{part}_slots"] for x in runs.get(name, [])
                                       if x.get(f"{part}_slots")])
            rows.append(Row("score", f"real-token share, {label}", _fmt(share["score-ours"]),
                            _fmt(share["score-base"]), None, ">= 0.9", _met(share["score-ours"], lambda v: v >= 0.9)))

        def part_ratio(a: str, b: str, key: str) -> float | None:
            return _median([y[key]["ref"] / x[key]["ref"] for x, y in zip(runs.get(a, []), runs.get(b, []))
                            if key in x and key in y])

        rows.append(Row("score", "reference log-probs alone: speed", "", "", part_ratio("score-ours", "score-base",
                        "parts_s"), cpu_ratio=part_ratio("score-ours", "score-base", "cpu_parts_s")))
        if "score-ours-padded" in runs:
            rows.append(Row("score", "ablation: reference log-probs, ours vs ours without packing", "", "",
                            part_ratio("score-ours", "score-ours-padded", "parts_s"),
                            cpu_ratio=part_ratio("score-ours", "score-ours-padded", "cpu_parts_s")))
    if "gen-ours" in runs:
        speed("generate", "tokens/s, transformers backend", "gen-ours", "gen-base", "tokens_per_s", "> 1x",
              lambda r: r > 1.0)
        vllm = runs.get("gen-vllm", [])
        if vllm and "tokens_per_s" in vllm[0]:
            speed("generate", "tokens/s, vLLM backend (engine start excluded)", "gen-vllm", "gen-base",
                  "tokens_per_s")
            report.notes.append(f"vLLM engine start: {_fmt(med('gen-vllm', 'engine_start_s'))} s, once per run; "
                                "its responses run to the token limit (no EOS bias)")
        elif vllm:
            report.notes.append(f"vLLM: {vllm[0].get('skipped') or vllm[0].get('error')}")
    full = [r for r in runs.get("train-ours-full", []) if "matmul_flops" in r]
    if full:
        def fraction(tokens: str, per: str) -> float | None:
            loop, peak = ("loop_s", "matmul_flops") if per == "wall" else ("loop_cpu_s", "matmul_flops_cpu")
            return _median([6 * r["params"] * r[tokens] / r[loop] / r[peak] for r in full])

        achieved = _median([6 * r["params"] * r["unique_tokens"] / r["loop_s"] for r in full])
        rows.append(Row("efficiency", "full FT FLOP/s (6*params*tokens computed) / fp32 matmul FLOP/s",
                        _fmt(achieved / 1e9, "GFLOP/s"), _fmt(med("train-ours-full", "matmul_flops") / 1e9, "GFLOP/s"),
                        fraction("unique_tokens", "wall"), ">= 0.3", _met(fraction("unique_tokens", "wall"),
                        lambda v: v >= 0.3), fraction("unique_tokens", "cpu")))
        rows.append(Row("efficiency", "same, counting each pair's prompt twice (pair-equivalent work)", "", "",
                        fraction("sequence_tokens", "wall"), cpu_ratio=fraction("sequence_tokens", "cpu")))
    for name, results in runs.items():
        for r in results:
            if "error" in r:
                report.notes.append(f"{name} failed: {r['error']}")


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


def machine_description(threads: int | None = None) -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads or torch.get_num_threads()} threads)"
            f"{gpu}, Python {platform.python_version()}")


def format_table(report: Report, markdown: bool = False) -> str:
    header = ["stage", "metric", "ours", "baseline", "ratio", "target", "met", "ratio (CPU time)"]
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    body = [[r.stage, r.metric, r.ours, r.baseline, x(r.ratio), r.target,
             "" if r.met is None else ("yes" if r.met else "NO"), x(r.cpu_ratio) if r.cpu_ratio else ""]
            for r in report.rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    title = f"modpo-pipe benchmark, size {report.size}, {report.repeats} repeat(s); {report.machine}"
    return "\n".join([title, *lines, *(f"note: {n}" for n in report.notes)])


def run_benchmark(size_name: str, sections: list[str], repeats: int = 1, workdir: Path | None = None,
                  isolate: bool = True, extras: bool = True, threads: int | None = None, log=print) -> Report:
    size = SIZES[size_name]
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="modpo-bench-")
        workdir = Path(tmp.name)
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        t = time.perf_counter()
        build_workload(size, workdir)
        spec_path = workdir / "workload.json"
        log(f"workload '{size_name}' ready in {time.perf_counter() - t:.0f}s under {workdir}")
        report = Report(size_name, machine_description(threads), repeats)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        for k in range(repeats):
            for section in sections:
                names = SECTIONS[section] + (EXTRAS.get(section, []) if extras and size.extras else [])
                for name in (names if k % 2 == 0 else list(reversed(names))):  # alternate to cancel drift
                    result = spawn(name, spec_path, isolate, threads)
                    report.runs.setdefault(name, []).append(result)
                    brief = {key: result[key] for key in ("pairs_per_s", "tokens_per_s", "peak_rss", "error",
                                                          "skipped", "wall_s") if key in result}
                    log(f"[{k + 1}/{repeats}] {name}: {json.dumps(brief)}")
        summarise(report)
        if "score" in sections:
            ours, base = planned_shares(size)
            report.rows.append(Row("score", "real-token share, reference log-probs, 1024 pairs (batch plan only)",
                                   _fmt(ours), _fmt(base), None, ">= 0.9", ours >= 0.9))
        if load_before is not None:
            report.notes.append(f"1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
                                f"the end ({os.cpu_count()} cores): other jobs share the machine when it exceeds 0")
        if not isolate:
            report.notes.append("variants ran in one process (--no-isolate): peak RSS values are not comparable")
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small model: a short check")
    parser.add_argument("--size", choices=sorted(SIZES), help="workload size (overrides --quick)")
    parser.add_argument("--only", default="train,score,generate", help="comma-separated sections")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every variant")
    parser.add_argument("--no-extras", action="store_true", help="skip the ablations (ours without packing, "
                        "gradient checkpointing; --quick skips them anyway)")
    parser.add_argument("--threads", type=int, help="torch threads per variant (default: torch's, all cores); 1 "
                        "keeps ratios meaningful on a machine other jobs are loading")
    parser.add_argument("--workdir", type=Path, help="keep the workload here (reused when it matches)")
    parser.add_argument("--json", type=Path, help="write every variant's raw results and the table here")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-isolate", action="store_true", help="run variants in this process (tests only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        print(RESULT_MARK + json.dumps(run_child(args.child, args.spec)), flush=True)
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {sorted(SECTIONS)}")
    size = args.size or ("quick" if args.quick else "default")
    started = time.perf_counter()
    if args.threads and args.no_isolate:
        import torch

        torch.set_num_threads(args.threads)
    report = run_benchmark(size, sections, args.repeats, args.workdir, isolate=not args.no_isolate,
                           extras=not args.no_extras, threads=args.threads,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    report.notes.append(f"benchmark wall time {time.perf_counter() - started:.0f}s")
    table = format_table(report, markdown=args.markdown)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "table": table}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
