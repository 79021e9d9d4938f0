"""Pair terms per second: groups of N = 4 responses (all 6 pairs) against the same responses as groups of
N = 2 (one pair each, the layout before groups), trained side by side in one run by modpo_pipe.train.train.

    python -m benchmarks.groups                 # SmolLM2-135M's shape (a random Llama of its size)
    python -m benchmarks.groups --size tiny     # the CI smoke test's shape: mechanics only

Both arms forward the same responses per optimizer step (B groups of 4 against 2B groups of 2), so a step
costs about the same; N = 4 trains 6 pair terms per 4 responses where N = 2 trains 2: the ideal ratio of pair
terms per second is 3. Each arm trains two epochs and only the second is timed (the first warms up), so both
arms time exactly the same responses; step times are each step's `step_seconds` in metrics.jsonl. The arms
alternate `--repeats` times and the ratio is the median of the per-repeat ratios. Timings depend on the
machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.synthetic import SMOLLM2_135M, TINY, make_tokenizer, words, write_policy

SHAPES = {"smollm2-135m": SMOLLM2_135M, "tiny": TINY}
LENGTHS = {"smollm2-135m": ((20, 200), (10, 120)), "tiny": ((5, 20), (3, 12))}


def build(root: Path, shape: str, groups: int, seed: int = 0) -> tuple[Path, dict[int, Path]]:
    """A random policy of `shape` and two scored files over the same responses: N = 4 and N = 2."""
    import pyarrow as pa

    from modpo_pipe import models, schema

    model_kwargs = SHAPES[shape]
    tokenizer = make_tokenizer(model_kwargs["vocab_size"])
    policy = write_policy(root / "policy", model_kwargs, seed)
    rng = random.Random(seed)
    (p_lo, p_hi), (r_lo, r_hi) = LENGTHS[shape]
    vocab = range(10, model_kwargs["vocab_size"])
    prompts = [[rng.choice(vocab) for _ in range(rng.randint(p_lo, p_hi))] for _ in range(groups)]
    responses = [[[rng.choice(vocab) for _ in range(rng.randint(r_lo, r_hi))] for _ in range(4)]
                 for _ in range(groups)]
    rewards = [[rng.gauss(0, 1) for _ in range(4)] for _ in range(groups)]
    refs = [[-rng.uniform(1, 50) for _ in range(4)] for _ in range(groups)]
    identity = {"path": str(policy), "fingerprint": models.fingerprint(str(policy))}
    flat = [v for g in rewards for v in g]
    meta = schema.make_metadata(
        "scored", policy=identity, tokenizer_fingerprint=models.tokenizer_fingerprint(tokenizer),
        ref={"path": str(policy), "fingerprint": "synthetic-reference"},  # not the policy: no gap check
        rewards={"r": {"spec": "synthetic", "fingerprint": "synthetic", "mean": statistics.fmean(flat),
                       "std": statistics.pstdev(flat)}})
    files = {}
    for n in (4, 2):
        rows = []
        for g in range(groups):
            for k in range(0, 4, n):  # N = 2: responses (1, 2) and (3, 4) of the group of 4
                part = slice(k, k + n)
                rows.append({"group_id": f"g{g}/{k}", "prompt_id": f"p{g}", "prompt": words(prompts[g]),
                             "prompt_messages": json.dumps([{"role": "user", "content": words(prompts[g])}]),
                             "prompt_ids": prompts[g], "responses": [words(r) for r in responses[g][part]],
                             "response_ids": responses[g][part], "finish_reasons": ["length"] * n, "round": 0,
                             "gen_logps": [None] * n, "reward_r": rewards[g][part], "ref_logps": refs[g][part]})
        files[n] = root / f"scored-n{n}.parquet"
        schema.write_table(pa.Table.from_pylist(rows, schema=schema.scored_schema(["r"])), files[n], meta)
    return policy, files


def train_arm(policy: Path, scored: Path, out: Path, batch_groups: int, steps: int) -> dict[str, float]:
    """Train two epochs of `steps` optimizer steps of `batch_groups` groups; pair terms and seconds of the
    second epoch (the first warms up)."""
    from modpo_pipe.config import GenerateSettings, ModelSettings, ScoreSettings, Settings, TrainSettings
    from modpo_pipe.train import train

    settings = Settings(model=ModelSettings(device="cpu", dtype="float32"), generate=GenerateSettings(),
                        score=ScoreSettings(), train=TrainSettings(
                            policy=str(policy), batch_size=batch_groups, epochs=2, lr=1e-5, save_every=0,
                            log_every=1, pairs="all"))
    train(settings, [scored], out, progress=False)
    lines = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["epoch"] == 1]
    assert len(lines) == steps, (len(lines), steps)
    return {"pairs": sum(m["pairs"] for m in lines), "seconds": sum(m["step_seconds"] for m in lines),
            "steps": len(lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4, help="groups of 4 per step (N = 2: twice as many)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm (after as many of warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="modpo-groups-") as tmp:
        root = Path(tmp)
        policy, files = build(root, args.size, args.batch * args.steps)
        results: dict[int, list[dict[str, float]]] = {4: [], 2: []}
        for repeat in range(args.repeats):
            for n in (4, 2):  # side by side: the arms alternate
                arm = train_arm(policy, files[n], root / f"out-{n}-{repeat}", args.batch * 4 // n, args.steps)
                results[n].append({**arm, "pairs_per_s": arm["pairs"] / max(arm["seconds"], 1e-9)})
    ratios = [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(results[4], results[2])]
    summary = {"size": args.size, "batch_groups_of_4": args.batch, "runs": results,
               "pair_terms_per_s": {n: statistics.median(r["pairs_per_s"] for r in results[n]) for n in (4, 2)},
               "ratio_n4_over_n2": statistics.median(ratios)}
    print("| arm | pair terms per step | pair terms/s (median) |\n|---|---|---|")
    for n in (4, 2):
        per_step = results[n][0]["pairs"] / max(results[n][0]["steps"], 1)
        print(f"| N = {n} ({'all 6 pairs' if n == 4 else 'one pair'} per group) | {per_step:.0f} | "
              f"{summary['pair_terms_per_s'][n]:.2f} |")
    print(f"\nratio N = 4 / N = 2: {summary['ratio_n4_over_n2']:.2f} (ideal 3; per repeat: "
          + ", ".join(f"{r:.2f}" for r in ratios) + ")")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
