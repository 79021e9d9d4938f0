"""The GPU check: numerics and speed of modpo-pipe in bfloat16 on one GPU, in one run, written to a table.

    ./dev.sh gpu-check                          # = python -m benchmarks.gpu_check (CUDA; a few minutes on an H100)
    python -m benchmarks.gpu_check --device cpu --out /tmp/dry.md   # the dry run CI does, on tiny shapes

Models are built at random init with SmolLM2-135M's shape and a ~1.1B Llama shape (TinyLlama's); nothing is
downloaded. Needs torch, transformers, peft, accelerate, pyarrow, typer, tqdm and safetensors only (no vLLM,
no `datasets`), and runs from a checkout (`PYTHONPATH=.`). What it runs, all through modpo-pipe's own code:

  update    full fine-tuning at lr 1e-5 in bfloat16 (float32 masters, autocast) and in float32 on the same
            pairs: cosine of the two weight deltas (> 0.95) and their norm ratio (0.8 to 1.25); and the
            bfloat16 first-batch gap to a reference scored in bfloat16 (policy = reference), against
            train.REF_GAP_TOLERANCE.
  optimum   one-token responses from K candidates, one known reward: after bfloat16 training the policy over
            the candidates approaches pi* ∝ pi_ref exp(r / beta) (largest probability error < 0.05).
  train     tokens/s and model-FLOP utilisation (6N FLOPs a token for full fine-tuning, 4N for LoRA, attention
            left out) against the GPU's dense bf16 peak, both shapes, timed after the first step.
  score     reference log-prob tokens/s (logprobs.batched_sequence_logps), both shapes.
  sample    the transformers backend (generate.hf.sample_transformers) against `model.generate` on the same
            prompts, batches and token limit, generated tokens/s.
  flex, sweep, score budgets, trl: the throughput section, benchmarks/gpu_throughput.py (its docstring says what).

`--sections` runs some of them (numerics = update and optimum; speed = train, score and sample at both shapes;
throughput = the rest), so a GPU lease can split the check across commands of at most 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import gpu_throughput, synthetic
from benchmarks.synthetic import EOS_ID, FIRST_WORD, PAD_ID, SMOLLM2_135M, TINY, llama, words

SHAPES = {
    "cuda": {"135m": SMOLLM2_135M, "1b": {**llama(2048, 5632, 22, 32, 4, 32000), "tie_word_embeddings": False}},
    "cpu": {"135m": TINY, "1b": llama(96, 192, 2, 2, 1, 512)},  # the dry run
}
# Dense bf16 peak FLOP/s (no sparsity) by GPU name; an unknown GPU gets no MFU column.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
# Workload sizes: (update pairs, update batch, update epochs, bench pairs, bench batch, prompt, response, gen
# prompts, gen tokens). The CPU dry run checks the mechanics in seconds, not the numbers.
SIZES = {"cuda": dict(update_pairs=64, update_batch=8, update_epochs=2, bench_pairs=48, bench_batch=8,
                      prompt=(64, 512), response=(32, 256), gen_prompts=64, gen_tokens=128, optimum_epochs=100,
                      optimum_lr=1e-4),
         "cpu": dict(update_pairs=8, update_batch=4, update_epochs=3, bench_pairs=6, bench_batch=2,
                     prompt=(4, 12), response=(2, 8), gen_prompts=4, gen_tokens=6, optimum_epochs=60,
                     optimum_lr=1e-3)}


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_policy(root: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    """A random-init Llama of `shape` in float32 safetensors, with a word-level tokenizer (ids = words); kept
    when --workdir already holds one."""
    path = root / "policy"
    if (path / "config.json").is_file():
        return path
    return synthetic.write_policy(path, shape, seed)


def random_pairs(n: int, vocab: int, prompt: tuple[int, int], response: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)

    def ids(bounds: tuple[int, int]) -> list[int]:
        return [rng.randrange(FIRST_WORD, vocab) for _ in range(rng.randint(*bounds))]

    pairs = [(ids(prompt), ids(response), ids(response)) for _ in range(n)]
    rewards = [(rng.gauss(0, 1), rng.gauss(0, 1)) for _ in range(n)]
    return pairs, rewards


def write_scored(root: Path, policy: Path, pairs, rewards, device: Any, ref_dtype: Any, name: str) -> Path:
    """A scored.parquet whose ref_logp the policy itself computed (score's code path, `ref_dtype` weights), with
    one reward "r" as given; the reference is the policy, so train measures its first-batch gap."""
    import pyarrow as pa

    from modpo_pipe import models, schema
    from modpo_pipe.logprobs import batched_sequence_logps

    ref = models.load_causal_lm(str(policy), dtype=ref_dtype, device=device)
    prompts = [p for p, _, _ in pairs]
    logps = batched_sequence_logps(ref, prompts * 2, [a for _, a, _ in pairs] + [b for _, _, b in pairs], PAD_ID,
                                   token_budget=16384)
    del ref
    n = len(pairs)
    table = pa.table({  # one group of two responses per pair
        "group_id": [f"p{i}" for i in range(n)], "prompt_id": [f"q{i}" for i in range(n)],
        "prompt": [words(p) for p in prompts],
        "prompt_messages": [json.dumps([{"role": "user", "content": words(p)}]) for p in prompts],
        "prompt_ids": prompts, "responses": [[words(a), words(b)] for _, a, b in pairs],
        "response_ids": [[a, b] for _, a, b in pairs], "finish_reasons": [["stop", "stop"]] * n,
        "round": [0] * n, "gen_logps": [[None, None]] * n,
        "reward_r": pa.array([[r[0], r[1]] for r in rewards], pa.list_(pa.float32())),
        "ref_logps": pa.array([[logps[i], logps[n + i]] for i in range(n)], pa.list_(pa.float32())),
    }).cast(schema.scored_schema(["r"]))
    values = [v for r in rewards for v in r]
    tokenizer = models.load_tokenizer(str(policy))
    path = root / f"{name}.parquet"
    schema.write_table(table, path, schema.make_metadata(
        "scored", policy=models.identity(str(policy)), tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
        ref={**models.identity(str(policy)), "dtype": str(ref_dtype).removeprefix("torch.")},
        rewards={"r": {"spec": "synthetic", "fingerprint": "synthetic", "mean": statistics.fmean(values),
                       "std": statistics.pstdev(values)}}))
    return path


def train_run(policy: Path, scored: Path, out: Path, device: str, dtype: str, attention: str = "auto",
              **train: Any) -> dict[str, Any]:
    """modpo_pipe.train.train; returns its metrics lines, each with the time it was written."""
    import modpo_pipe.train as train_module
    from modpo_pipe.config import GenerateSettings, ModelSettings, ScoreSettings, Settings, TrainSettings

    settings = Settings(model=ModelSettings(device=device, dtype=dtype, attention=attention),
                        generate=GenerateSettings(),
                        score=ScoreSettings(),
                        train=TrainSettings(policy=str(policy), log_every=1, save_every=0, warmup_ratio=0.0,
                                            **train))
    lines: list[dict[str, Any]] = []
    real = train_module.append_jsonl

    def timed(path: Path, record: dict[str, Any]) -> None:
        lines.append({**record, "time": time.perf_counter()})
        real(path, record)

    train_module.append_jsonl = timed
    try:
        start = time.perf_counter()
        report = train_module.train(settings, [scored], out, progress=False)
    finally:
        train_module.append_jsonl = real
    return {"report": report, "lines": lines, "start": start}


# --- the checks ---------------------------------------------------------------------------------------------

def delta_agreement(reference: Any, other: Any) -> tuple[float, float]:
    """Cosine of two flat weight deltas and the norm ratio other / reference, in float64: over a model's 10^8
    weights, float32 sums drift by percents (torch's float32 cosine_similarity of a 2*10^7 vector with itself
    gives 1.015, and the first H200 run reported a cosine of 1.0225)."""
    a, b = reference.double(), other.double()
    return (a @ b / (a.norm() * b.norm())).item(), (b.norm() / a.norm()).item()


def check_update(root: Path, device: str, shape: dict[str, Any], size: dict[str, Any]) -> list[tuple]:
    import torch
    from safetensors.torch import load_file

    from modpo_pipe.train import REF_GAP_TOLERANCE

    policy = write_policy(root / "update", shape)
    pairs, rewards = random_pairs(size["update_pairs"], shape["vocab_size"], size["prompt"], size["response"])
    scored = write_scored(root / "update", policy, pairs, rewards, torch.device(device), torch.bfloat16, "scored")
    common = dict(lr=1e-5, batch_size=size["update_batch"], epochs=size["update_epochs"])
    runs = {dtype: train_run(policy, scored, root / "update" / dtype, device, dtype, **common)
            for dtype in ("float32", "bfloat16")}
    start = load_file(str(policy / "model.safetensors"))
    deltas = {}
    for dtype in runs:
        state = load_file(str(root / "update" / dtype / "state" / "trainable.safetensors"))
        deltas[dtype] = torch.cat([(state[k].float() - start[k].float()).flatten() for k in sorted(state)])
    cosine, ratio = delta_agreement(deltas["float32"], deltas["bfloat16"])
    first = runs["bfloat16"]["lines"][0]
    steps = len(runs["bfloat16"]["lines"])
    tolerance = REF_GAP_TOLERANCE[torch.bfloat16]
    return [
        ("update", f"bf16 vs fp32 full FT, lr 1e-5, {steps} steps: cosine of weight deltas", f"{cosine:.4f}",
         cosine > 0.95),
        ("update", "same: norm ratio bf16 / fp32", f"{ratio:.4f}", 0.8 <= ratio <= 1.25),
        ("update", "bf16 first-batch gap to bf16-scored ref_logp: max |gap| (nats)",
         f"{first['first_batch_ref_gap']:.4g}", None),
        ("update", f"same: max |gap| / sqrt(response tokens) (tolerance {tolerance})",
         f"{first['first_batch_ref_gap_scaled']:.4g}", first["first_batch_ref_gap_scaled"] <= tolerance),
    ]


def check_optimum(root: Path, device: str, shape: dict[str, Any], size: dict[str, Any]) -> list[tuple]:
    """Every pair of K one-token responses to each of 4 prompts; reward r_k known; beta 1, no normalisation.
    The loss is minimised where log pi(k) - log pi(l) = log pi_ref(k) - log pi_ref(l) + r_k - r_l, i.e. the
    policy restricted to the K candidates is softmax(log pi_ref + r)."""
    import torch

    from modpo_pipe import models
    from modpo_pipe.logprobs import batched_sequence_logps

    policy = write_policy(root / "optimum", shape, seed=1)
    k_candidates = 6
    rng = random.Random(1)
    candidates = rng.sample(range(FIRST_WORD, shape["vocab_size"]), k_candidates)
    reward = [-1.0 + 2.0 * i / (k_candidates - 1) for i in range(k_candidates)]
    prompts = [[rng.randrange(FIRST_WORD, shape["vocab_size"]) for _ in range(8)] for _ in range(4)]
    pairs, rewards = [], []
    for p in prompts:
        for i in range(k_candidates):
            for j in range(i + 1, k_candidates):
                pairs.append((p, [candidates[i]], [candidates[j]]))
                rewards.append((reward[i], reward[j]))
    scored = write_scored(root / "optimum", policy, pairs, rewards, torch.device(device), torch.bfloat16, "scored")

    def restricted(model_path: str) -> torch.Tensor:  # (prompts, K): log pi over the K candidates, renormalised
        model = models.load_causal_lm(model_path, dtype=torch.bfloat16, device=torch.device(device))
        logps = batched_sequence_logps(model, [p for p in prompts for _ in candidates],
                                       [[c] for _ in prompts for c in candidates], PAD_ID, token_budget=16384)
        return torch.log_softmax(torch.tensor(logps).view(len(prompts), k_candidates), -1)

    ref = restricted(str(policy))
    optimum = torch.softmax(ref + torch.tensor(reward), -1)
    train_run(policy, scored, root / "optimum" / "out", device, "bfloat16", lr=size["optimum_lr"], beta=1.0,
              normalize="none",
              batch_size=len(pairs), epochs=size["optimum_epochs"])
    final = restricted(str(root / "optimum" / "out" / "final")).exp()
    start_error = (ref.exp() - optimum).abs().max().item()
    error = (final - optimum).abs().max().item()
    return [("optimum", f"one-token bandit (K={k_candidates}, beta 1), bf16: largest |pi - pi*| before training",
             f"{start_error:.4f}", None),
            ("optimum", f"same after {size['optimum_epochs']} steps (lr {size['optimum_lr']})", f"{error:.4f}",
             error < 0.05 < start_error)]


def n_params(policy: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(policy / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)


def bench_train(root: Path, device: str, name: str, shape: dict[str, Any], size: dict[str, Any],
                peak: float | None) -> list[tuple]:
    import torch

    import modpo_pipe.train as train_module

    policy = write_policy(root / f"bench-{name}", shape)
    pairs, rewards = random_pairs(size["bench_pairs"], shape["vocab_size"], size["prompt"], size["response"], seed=2)
    scored = write_scored(root / f"bench-{name}", policy, pairs, rewards, torch.device(device), torch.bfloat16,
                          "scored")
    params = n_params(policy)
    rows: list[tuple] = []
    real_save_state = train_module.save_state  # the resumable state (1B: 13 GB of float32 moments) is not timed
    train_module.save_state = lambda *args, **kwargs: None
    try:
        rows += _bench_modes(root, device, name, policy, scored, pairs, params, size, peak)
    finally:
        train_module.save_state = real_save_state
    return rows


def _bench_modes(root: Path, device: str, name: str, policy: Path, scored: Path, pairs, params: int,
                 size: dict[str, Any], peak: float | None) -> list[tuple]:
    from modpo_pipe.config import TrainSettings
    from modpo_pipe.train import optimizer_step_groups

    rows = []
    for mode, extra, flops_per_token in (("full", {"lr": 1e-5}, 6), ("LoRA r16", {"lr": 1e-4, "lora_r": 16,
                                                                                  "lora_alpha": 32}, 4)):
        # As before issue 33: SDPA with the dense packed mask, one forward per step of bench_batch groups.
        run = train_run(policy, scored, root / f"bench-{name}" / mode.split()[0], device, "bfloat16",
                        attention="sdpa", batch_size=size["bench_batch"], epochs=1, micro_batch_tokens=10**9, **extra)
        steps = optimizer_step_groups(len(pairs), TrainSettings(batch_size=size["bench_batch"], epochs=1))
        # Tokens the packed forward computes: each pair's prompt once, both responses.
        tokens = [sum(len(pairs[i][0]) + len(pairs[i][1]) + len(pairs[i][2]) for i in idx) for _, idx in steps]
        times = [line["time"] for line in run["lines"]]
        seconds = times[-1] - times[0]  # steps 2 .. last: the first step pays for warm-up
        tokens_per_s = sum(tokens[1:]) / seconds
        mfu = flops_per_token * params * tokens_per_s / peak if peak else None
        rows.append(("train", f"{name} ({params / 1e6:.1f}M) {mode}, bf16, batch {size['bench_batch']} pairs: "
                              f"tokens/s", f"{tokens_per_s:,.0f}", None))
        rows.append(("train", f"same: MFU ({flops_per_token}N FLOPs a token / dense bf16 peak)",
                     f"{mfu:.1%}" if mfu is not None else "n/a (unknown peak)", None))
    return rows


def bench_score(root: Path, device: str, name: str) -> list[tuple]:
    import pyarrow.parquet as pq
    import torch

    from modpo_pipe import models
    from modpo_pipe.logprobs import batched_sequence_logps

    table = pq.read_table(root / f"bench-{name}" / "scored.parquet")
    groups = table.column("response_ids").to_pylist()
    prompts = [p for p, group in zip(table.column("prompt_ids").to_pylist(), groups) for _ in group]
    responses = [r for group in groups for r in group]
    model = models.load_causal_lm(str(root / f"bench-{name}" / "policy"), dtype=torch.bfloat16,
                                  device=torch.device(device))
    batched_sequence_logps(model, prompts[:2], responses[:2], PAD_ID, token_budget=16384)  # warm-up
    synchronize(device)
    stats: dict[str, int] = {}
    start = time.perf_counter()
    batched_sequence_logps(model, prompts, responses, PAD_ID, token_budget=16384, stats=stats)
    synchronize(device)
    seconds = time.perf_counter() - start
    return [("score", f"{name} reference log-probs, bf16: tokens/s (prompt once per response)",
             f"{stats['tokens'] / seconds:,.0f}", None),
            ("score", "same: sequence tokens/s (prompt + response per sequence)",
             f"{stats['sequence_tokens'] / seconds:,.0f}", None)]


def bench_sample(root: Path, device: str, name: str, size: dict[str, Any]) -> list[tuple]:
    """Both samplers on the same prompts, batch size and token limit; a random-init model seldom emits EOS, so
    most replies run to the limit for both."""
    import torch

    from modpo_pipe import models
    from modpo_pipe.config import GenerateSettings
    from modpo_pipe.generate.hf import sample_transformers
    from modpo_pipe.logprobs import build_batch

    policy = root / f"bench-{name}" / "policy"
    model = models.load_causal_lm(str(policy), dtype=torch.bfloat16, device=torch.device(device))
    tokenizer = models.load_tokenizer(str(policy))
    rng = random.Random(3)
    prompts = [[rng.randrange(FIRST_WORD, model.config.vocab_size) for _ in range(rng.randint(*size["prompt"]))]
               for _ in range(size["gen_prompts"])]
    batch, n, new = GenerateSettings().batch_size, 2, size["gen_tokens"]

    def ours() -> int:
        out = sample_transformers(model, tokenizer, prompts, n, temperature=1.0, top_p=1.0, max_new_tokens=new,
                                  seed=0, batch_size=batch, progress=False)
        return sum(len(s.ids) for per_prompt in out for s in per_prompt)

    def generate() -> int:
        produced = 0
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                left = build_batch(prompts[i:i + batch], [[] for _ in prompts[i:i + batch]], PAD_ID,
                                   padding_side="left")
                out = model.generate(input_ids=left.input_ids.to(device), attention_mask=left.attention_mask.to(device),
                                     do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                                     num_return_sequences=n, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
                for row in out[:, left.input_ids.shape[1]:].tolist():
                    produced += row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
        return produced

    rows = []
    for label, fn in (("modpo-pipe transformers backend", ours), ("model.generate", generate)):
        fn()  # warm-up (kernels, allocator)
        synchronize(device)
        start = time.perf_counter()
        produced = fn()
        synchronize(device)
        rows.append(("sample", f"{name} {label}, bf16, {len(prompts)} prompts x {n}, <= {new} new tokens, "
                               f"batch {batch}: tokens/s", f"{produced / (time.perf_counter() - start):,.0f}", None))
    return rows


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def machine(device: str) -> tuple[str, float | None]:
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    if device != "cuda":
        return f"CPU dry run ({platform.processor() or platform.machine()}), {versions}", None
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"{gpu} ({memory:.0f} GiB), {versions}", peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS-gpu.md")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and runs here (default: a temp dir)")
    parser.add_argument("--sections", default="numerics,speed,throughput",
                        help="comma-separated: numerics, speed, throughput (default: all)")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu for the dry run", file=sys.stderr)
        return 1
    shapes, size = SHAPES[args.device], SIZES[args.device]
    described, peak = machine(args.device)
    started = time.time()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="modpo-gpu-check-") as tmp:
        root = args.workdir or Path(tmp)
        steps = []
        if "numerics" in sections:
            steps += [("update", lambda: check_update(root, args.device, shapes["135m"], size)),
                      ("optimum", lambda: check_optimum(root, args.device, shapes["135m"], size))]
        for name in shapes if "speed" in sections else []:
            steps += [(f"train {name}", lambda name=name: bench_train(root, args.device, name, shapes[name], size,
                                                                        peak)),
                      (f"score {name}", lambda name=name: bench_score(root, args.device, name)),
                      (f"sample {name}", lambda name=name: bench_sample(root, args.device, name, size))]
        if "throughput" in sections:
            steps += gpu_throughput.steps(root, args.device, peak)
        for label, step in steps:
            log(f"{label} ...")
            t0 = time.time()
            try:
                rows += step()
            except Exception as e:  # one failed check must not hide the others' numbers
                rows.append((label.split()[0], f"{label}: FAILED", f"{type(e).__name__}: {e}"[:200], False))
            log(f"{label}: {time.time() - t0:.1f} s")
            if args.device == "cuda":
                torch.cuda.empty_cache()
    seconds = time.time() - started
    lines = [f"# GPU check ({'dry run on CPU, tiny shapes: mechanics only' if args.device == 'cpu' else 'bfloat16'})",
             "", f"Machine: {described}. Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{seconds:.0f} s in all (`python -m benchmarks.gpu_check --device {args.device}`).", "",
             "| section | what | value | pass |", "|---|---|---|---|"]
    lines += [f"| {s} | {w} | {v} | {'' if ok is None else ('yes' if ok else 'NO')} |" for s, w, v, ok in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [w for _, w, _, ok in rows if ok is False]
    if failed:
        print(f"{len(failed)} check(s) failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
