"""The train variants: ours (modpo_pipe.train.train on cached reference log-probs) and the baseline (a plain
step that keeps the reference model loaded and runs it every step), full fine-tuning and LoRA."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.run.baseline import pad_right, plain_logps
from benchmarks.run.measure import clock, matmul_flops, peak_rss_bytes, process_peak_rss_bytes, reset_peak_rss
from benchmarks.run.workload import Pair, Size, load_pairs, workload_settings


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
    settings = workload_settings(spec, **_train_settings(size, lora, gradient_checkpointing=checkpointing))
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
              **_pair_tokens(load_pairs(spec["scored"], pairs))}
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
    pairs = load_pairs(spec["scored"], size.train_pairs)
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
