"""The GPU check's throughput section (benchmarks/gpu_check.py runs it after the numerics):

  sweep     train tokens/s, MFU and peak memory over [train].micro_batch_tokens budgets (0 = sized from free
            memory), flex attention and torch.compile on, at the 1.1B Llama shape (full fine-tuning and LoRA r16)
            and a 3B shape (Llama 3.2 3B's, LoRA r16). Each run trains 2 epochs over the same pairs and is timed
            over the second (every pair once; compilation and warm-up fall in the first).
  score     reference log-prob tokens/s at 1.1B over [score].batch_tokens budgets, flex attention.
  flex      flex attention against SDPA on the packed rows, float32: largest difference of the log-probs and of
            the gradients (flex attention's backward runs on CUDA only, so the CPU suite checks values alone).
  trl       TRL's DPOTrainer on the same pairs, same model, same global batch and mixed precision, its documented
            speed settings (precompute_ref_log_probs; use_liger_kernel when liger-kernel imports; padding_free is
            requested, and TRL 1.16 says when it falls back): tokens/s and peak memory, timed the same way.

Tokens are counted alike for both trainers: a pair's prompt once and both responses (the packed forward's
work; TRL computes the prompt twice and appends an EOS to each response, so its own count is higher). MFU
takes 6N FLOPs a token for full fine-tuning and 4N for LoRA, attention left out, against the GPU's dense bf16 peak.

TRL and `datasets` are not on the GPU machine and it has no network: benchmarks/gpu-wheels.md says how their
wheels travel with the run. Without TRL the trl rows say so and the rest runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.synthetic import llama

SHAPES = {
    "cuda": {"1b": {**llama(2048, 5632, 22, 32, 4, 32000), "tie_word_embeddings": False},
             "3b": llama(3072, 8192, 28, 24, 8, 128256)},  # Llama 3.2 3B's shape (tied embeddings)
    "cpu": {"1b": llama(96, 192, 2, 2, 1, 512), "3b": llama(64, 128, 2, 2, 1, 2048)},  # the dry run
}
# (shape, mode, micro_batch_tokens budgets); 0 sizes the budget from free memory.
SWEEP = {
    "cuda": [("1b", "full", [8192, 16384, 32768, 0]), ("1b", "LoRA r16", [16384, 0]), ("3b", "LoRA r16", [0])],
    "cpu": [("1b", "full", [64, 0]), ("1b", "LoRA r16", [0]), ("3b", "LoRA r16", [0])],
}
SCORE_BUDGETS = {"cuda": [16384, 65536], "cpu": [64, 256]}
# pairs, groups per optimizer step, prompt and response lengths (uniform in the bounds)
SIZES = {"cuda": dict(pairs=256, step_groups=32, prompt=(64, 512), response=(32, 256), trl_micro=8),
         "cpu": dict(pairs=8, step_groups=4, prompt=(4, 12), response=(2, 8), trl_micro=2)}
MODES = {"full": ({"lr": 1e-5}, 6), "LoRA r16": ({"lr": 1e-4, "lora_r": 16, "lora_alpha": 32}, 4)}


def memory_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: str) -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "n/a (CPU)"


def pair_tokens(pairs) -> int:
    return sum(len(p) + len(a) + len(b) for p, a, b in pairs)


def second_epoch_rate(lines: list[dict[str, Any]], steps_per_epoch: int, tokens: int) -> float:
    """Tokens a second over the second epoch: from the end of the first epoch's last step to the end of the
    second's, every pair once."""
    times = [line["time"] for line in lines]
    return tokens / (times[2 * steps_per_epoch - 1] - times[steps_per_epoch - 1])


def throughput_data(root: Path, device: str, name: str, shape: dict[str, Any], size: dict[str, Any]):
    """The policy and scored pairs of one shape, written once (the sweep, score and TRL rows share them)."""
    import torch

    from benchmarks import gpu_check

    where = root / f"throughput-{name}"
    policy = gpu_check.write_policy(where, shape)
    pairs, rewards = gpu_check.random_pairs(size["pairs"], shape["vocab_size"], size["prompt"], size["response"],
                                            seed=4)
    scored = where / "scored.parquet"
    if not scored.is_file():
        gpu_check.write_scored(where, policy, pairs, rewards, torch.device(device), torch.bfloat16, "scored")
    return where, policy, scored, pairs


def bench_sweep(root: Path, device: str, peak: float | None) -> list[tuple]:
    from benchmarks import gpu_check

    size = SIZES[device]
    rows: list[tuple] = []
    steps_per_epoch = size["pairs"] // size["step_groups"]
    for name, mode, budgets in SWEEP[device]:
        where, policy, scored, pairs = throughput_data(root, device, name, SHAPES[device][name], size)
        params = gpu_check.n_params(policy)
        extra, flops_per_token = MODES[mode]
        for budget in budgets:
            memory_reset(device)
            run = gpu_check.train_run(policy, scored, where / f"{mode.split()[0]}-{budget}", device, "bfloat16",
                                      batch_size=size["step_groups"], epochs=2, micro_batch_tokens=budget,
                                      compile=device == "cuda", **extra)
            rate = second_epoch_rate(run["lines"], steps_per_epoch, pair_tokens(pairs))
            mfu = f"{flops_per_token * params * rate / peak:.1%}" if peak else "n/a"
            chosen = run["lines"][0].get("micro_batch_tokens")
            label = f"auto ({chosen:,})" if budget == 0 and chosen else "auto" if budget == 0 else f"{budget:,}"
            rows.append(("sweep", f"{name} ({params / 1e6:,.1f}M) {mode}, micro_batch_tokens {label}, "
                                  f"{size['step_groups']} groups a step: tokens/s; MFU; peak memory",
                         f"{rate:,.0f}; {mfu}; {peak_memory(device)}", None))
    return rows


def bench_score_budgets(root: Path, device: str) -> list[tuple]:
    import torch

    from benchmarks.gpu_check import synchronize
    from benchmarks.synthetic import PAD_ID
    from modpo_pipe import models
    from modpo_pipe.logprobs import batched_sequence_logps

    size = SIZES[device]
    _, policy, _, pairs = throughput_data(root, device, "1b", SHAPES[device]["1b"], size)
    prompts = [p for p, _, _ in pairs] * 2
    responses = [a for _, a, _ in pairs] + [b for _, _, b in pairs]
    model = models.load_causal_lm(str(policy), dtype=torch.bfloat16, device=torch.device(device),
                                  attn_implementation=models.attention_implementation("auto", torch.device(device)))
    rows = []
    for budget in SCORE_BUDGETS[device]:
        batched_sequence_logps(model, prompts, responses, PAD_ID, token_budget=budget)  # warm-up and compilation
        memory_reset(device)
        synchronize(device)
        stats: dict[str, int] = {}
        start = time.perf_counter()
        batched_sequence_logps(model, prompts, responses, PAD_ID, token_budget=budget, stats=stats)
        synchronize(device)
        rate = stats["tokens"] / (time.perf_counter() - start)
        rows.append(("score", f"1b reference log-probs, {model.config._attn_implementation}, batch_tokens "
                              f"{budget:,}: tokens/s; peak memory", f"{rate:,.0f}; {peak_memory(device)}", None))
    return rows


def check_flex(device: str) -> list[tuple]:
    """Packed log-probs and their gradients through flex attention and through SDPA, float32 (TF32 off), a small
    random Llama: the largest differences relative to the largest value, within 1e-5 (the kernels sum in
    different orders). On CPU the values only: torch has no flex attention backward there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.gpu_check import random_pairs
    from modpo_pipe.logprobs import pack_sequences, packed_sequence_logps

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    config = LlamaConfig(**llama(256, 512, 2, 4, 2, 1000), pad_token_id=0, eos_token_id=1, bos_token_id=None)
    base = LlamaForCausalLM(config).to(device)
    pairs, _ = random_pairs(12, 1000, (4, 40), (2, 30), seed=5)
    packed = pack_sequences([p for p, _, _ in pairs] * 2, [a for _, a, _ in pairs] + [b for _, _, b in pairs],
                            pad_id=0).to(device)
    weight = torch.linspace(-1.0, 1.0, len(pairs) * 2, device=device)
    grad_on = device == "cuda"
    results = {}
    for implementation in ("sdpa", "flex_attention"):
        base.set_attn_implementation(implementation)
        base.zero_grad()
        with torch.set_grad_enabled(grad_on):
            values = packed_sequence_logps(base, packed)
            if grad_on:
                (values * weight).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in base.parameters()]) if grad_on else None
        results[implementation] = (values.detach(), grads)
    a, b = results["sdpa"][0], results["flex_attention"][0]
    value_gap = ((a - b).abs().max() / a.abs().max()).item()
    tolerance = 1e-5
    rows = [("flex", "flex attention vs SDPA, packed rows, float32: largest log-prob difference / largest log-prob",
             f"{value_gap:.2e}", value_gap < tolerance)]
    if grad_on:
        a, b = results["sdpa"][1], results["flex_attention"][1]
        grad_gap = ((a - b).abs().max() / a.abs().max()).item()
        rows.append(("flex", "same: largest gradient difference / largest gradient", f"{grad_gap:.2e}",
                     grad_gap < tolerance))
    return rows


def bench_trl(root: Path, device: str, peak: float | None) -> list[tuple]:
    """TRL's DPOTrainer, full fine-tuning of the 1.1B shape on the sweep's pairs: 2 epochs, the second timed."""
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError as e:
        return [("trl", "TRL DPOTrainer", f"not run: {e} (benchmarks/gpu-wheels.md carries it)", None)]
    size = SIZES[device]
    where, policy, _, pairs = throughput_data(root, device, "1b", SHAPES[device]["1b"], size)
    memory_reset(device)
    lines, settings = _trl_train(where, policy, pairs, device, size)
    steps_per_epoch = size["pairs"] // size["step_groups"]
    rate = second_epoch_rate(lines, steps_per_epoch, pair_tokens(pairs))
    from benchmarks.gpu_check import n_params

    mfu = f"{6 * n_params(policy) * rate / peak:.1%}" if peak else "n/a"
    return [("trl", f"TRL {trl.__version__} DPOTrainer, 1b full, {size['step_groups']} pairs a step ({settings}): "
                    f"tokens/s; MFU; peak memory", f"{rate:,.0f}; {mfu}; {peak_memory(device)}", None)]


def _trl_train(where: Path, policy: Path, pairs, device: str, size: dict[str, Any]) -> tuple[list[dict], str]:
    import importlib.util

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from benchmarks.gpu_check import synchronize
    from benchmarks.synthetic import make_tokenizer, words

    cuda = device == "cuda"
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    micro = size["trl_micro"]
    args = DPOConfig(output_dir=str(where / "trl"), per_device_train_batch_size=micro,
                     gradient_accumulation_steps=size["step_groups"] // micro, num_train_epochs=2, learning_rate=1e-5,
                     lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda, precompute_ref_log_probs=True,
                     padding_free=True, use_liger_kernel=liger, max_length=None, logging_steps=10**6,
                     save_strategy="no", report_to="none", disable_dropout=True, seed=0, dataloader_num_workers=0)
    # The word-level tokenizer maps " w12 w34" back to ids 12, 34: a response's text starts with a space so that
    # prompt + response tokenizes to the pair's ids (TRL then appends EOS to each response).
    data = Dataset.from_dict({"prompt": [words(p) for p, _, _ in pairs],
                              "chosen": [" " + words(a) for _, a, _ in pairs],
                              "rejected": [" " + words(b) for _, _, b in pairs]})
    model = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32)
    lines: list[dict[str, Any]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            lines.append({"time": time.perf_counter()})

    trainer = DPOTrainer(model=model, args=args, train_dataset=data,
                         processing_class=make_tokenizer(model.config.vocab_size), callbacks=[Clock()])
    trainer.train()
    settings = (f"precompute_ref_log_probs, padding_free {'on' if trainer.padding_free else 'off (TRL fell back)'}, "
                f"liger {'on' if liger else 'off (not installed)' if cuda else 'off (CPU)'}, micro-batch {micro}")
    return lines, settings


def steps(root: Path, device: str, peak: float | None) -> list[tuple[str, Any]]:
    """The section's steps as gpu_check runs them: (label, a function returning table rows)."""
    return [("flex", lambda: check_flex(device)),
            ("sweep", lambda: bench_sweep(root, device, peak)),
            ("score budgets", lambda: bench_score_budgets(root, device)),
            ("trl", lambda: bench_trl(root, device, peak))]
