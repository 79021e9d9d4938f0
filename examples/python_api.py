"""modpo-pipe's three stages from Python: prompts (a list of dicts) -> pairs -> scored -> a trained policy.

    python examples/python_api.py POLICY [--out DIR] [--prompts N] [--max-new-tokens N]

POLICY is a causal language model's directory or Hub id (HuggingFaceTB/SmolLM2-135M-Instruct, say). Two rewards
pull apart: `reward_len` below, written as TRL's GRPOTrainer documentation writes reward functions, and the
built-in concision. What it writes is what `modpo-pipe generate`, `score` and `train` write given the same
settings as flags (tests/test_python_api.py runs both and compares the files). docs/python-api.md has the rest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from modpo_pipe import api

HERE = Path(__file__).resolve()


def reward_len(completions, **kwargs):
    """TRL's documentation example: replies near 20 characters score best."""
    return [-abs(20 - len(completion)) for completion in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", help="A causal LM: a local directory or a Hub id.")
    parser.add_argument("--out", type=Path, default=Path("python-api-out"), help="Where the files go.")
    parser.add_argument("--prompts", type=int, default=8, help="How many of examples/prompts.jsonl to use.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Longest reply, in tokens.")
    args = parser.parse_args()

    # Prompts as a notebook holds them: a list of dicts with the fields of a prompts file (a datasets.Dataset
    # works too). generate writes them beside its output, as OUT/pairs.prompts.jsonl.
    lines = (HERE.parent / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line) for line in lines[: args.prompts]]

    # Keyword settings are the keys of the sections each command reads (docs/configuration.md):
    # [generate] and [model] for generate, [score] and [model] for score, [train] and [model] for train.
    pairs = api.generate(prompts, args.out / "pairs.parquet", policy=args.policy, samples_per_prompt=2,
                         max_new_tokens=args.max_new_tokens)
    print(f"generate: {pairs.groups} groups from {pairs.prompts} prompts -> {pairs.out}")

    rewards = {"length": f"py:{HERE}:reward_len", "concise": "py:modpo_pipe.builtin_rewards:concision"}
    scored = api.score(pairs.out, args.out / "scored.parquet", rewards=rewards)
    means = ", ".join(f"{name} {stats['mean']:.3g}" for name, stats in scored.rewards.items())
    print(f"score: mean rewards {means} -> {scored.out}")

    trained = api.train(scored.out, args.out / "checkpoints", weights={"length": 0.5, "concise": 0.5}, beta=0.1)
    print(f"train: {trained.steps} steps, loss {trained.first_loss:.4g} -> {trained.last_loss:.4g} -> "
          f"{trained.out}/final")


if __name__ == "__main__":
    main()
