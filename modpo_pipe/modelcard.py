"""The model card (README.md) written beside every trained policy: Hub model-card YAML front matter, then in
words what the policy was trained on and how, and the command that trains it again.

`model_card` is a pure function of the info dict train.py writes to modpo_pipe.json and the metrics lines of
metrics.jsonl; keys are read with .get, so a card still renders from an older or partial info dict.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Any

from modpo_pipe import config as cfg
from modpo_pipe.prompts import is_hub_id

LOSS_WORDS = {
    "rpo": "MODPO Eq. 19 (`rpo`): -log σ(d)",
    "rpo-sym": "symmetric MODPO (`rpo-sym`): -log σ(d) - log σ(-d)",
    "rebel": "squared margin error (`rebel`): d²",
}


def model_card(info: dict[str, Any], metrics: list[dict[str, Any]], adapter: bool = False) -> str:
    """README.md text for a checkpoint directory; `adapter`: the directory holds a LoRA adapter (PEFT)."""
    policy = info.get("policy") or {}
    ref = info.get("ref") or {}
    weights: dict[str, float] = info.get("weights") or {}
    rewards: dict[str, dict[str, Any]] = info.get("rewards") or {}
    prompts = info.get("prompts")
    tags = ["modpo-pipe", "modpo", "multi-objective-alignment", "reward-model"] + (["lora"] if adapter else [])

    lines = front_matter(policy, prompts, info, tags, adapter)

    beta, loss = info.get("beta"), info.get("loss")
    trained = f"LoRA r = {info['lora_r']}" if info.get("lora_r") else "full fine-tuning"
    lines += [
        f"# {'LoRA adapter' if adapter else 'Policy'} trained with modpo-pipe (MODPO, reward-model-only form)",
        "",
        "**Method.** For each prompt the policy sampled a group of replies; reward models scored each and a "
        "reference model's log-probs were cached. Training regressed, for pairs y1, y2 of a group, the student "
        "margin "
        "β[(log π(y1) − log π_ref(y1)) − (log π(y2) − log π_ref(y2))] onto the teacher margin "
        "Σ_k w_k (r_k(y1) − r_k(y2)) "
        + ("(rewards z-scored with the statistics below) " if info.get("normalize") == "zscore" else "")
        + f"with the loss {LOSS_WORDS.get(str(loss), f'`{loss}`')}, minimised at "
        "π* ∝ π_ref · exp(Σ_k w_k r_k / β).",
        "",
        f"- β = {beta}",
        f"- loss: `{loss}`; normalisation: `{info.get('normalize')}`",
        f"- starting policy: `{policy.get('path')}` (fingerprint `{policy.get('fingerprint')}`)",
        f"- reference: `{ref.get('path')}` (fingerprint `{ref.get('fingerprint')}`)",
        f"- weights: {trained}" + (" (this directory: the adapter alone; load it on the starting policy)"
                                   if adapter else ""),
        "",
        "## Rewards",
        "",
        "| reward | weight | spec | fingerprint | mean | std |",
        "|---|---|---|---|---|---|",
    ]
    lines += rewards_table(info, weights, rewards)
    lines += data_and_curve(info, prompts, metrics)

    lines += ["", "## Reproduce", "", "```bash", reproduce_command(info), "```", ""]
    return "\n".join(lines)


def front_matter(policy: dict[str, Any], prompts: Any, info: dict[str, Any], tags: list[str],
                 adapter: bool) -> list[str]:
    """The Hub's YAML header: library, tags, and the base model and dataset when they are Hub ids."""
    front = {"library_name": "peft" if adapter else "transformers", "tags": tags}
    if is_hub_id(policy.get("path")):
        front["base_model"] = policy["path"]
    if info.get("prompts_on_hub") and is_hub_id(prompts):
        front["datasets"] = [prompts]
    lines = ["---"]
    for key in ("base_model", "library_name", "tags", "datasets"):
        if key in front:
            value = front[key]
            if isinstance(value, list):
                lines.append(f"{key}:")
                lines += [f"- {json.dumps(v)}" for v in value]
            else:
                lines.append(f"{key}: {json.dumps(value)}")
    lines += ["---", ""]
    return lines


def rewards_table(info: dict[str, Any], weights: dict[str, float], rewards: dict[str, dict[str, Any]]) -> list[str]:
    """Each reward's weight, spec, fingerprint and the statistics the target was built with."""
    lines: list[str] = []
    # The statistics the target was built from (one set for every file: train.target_record), else the file's.
    target_stats = ((info.get("target") or {}).get("reward_stats") or {})
    for name in dict.fromkeys([*weights, *rewards]):
        r = rewards.get(name) or {}
        stat = (target_stats.get("rewards") or {}).get(name) or r
        lines.append(f"| {name} | {_num(weights.get(name))} | `{r.get('spec', '')}` | `{r.get('fingerprint', '')}` "
                     f"| {_num(stat.get('mean'))} | {_num(stat.get('std'))} |")
    lines.append("")
    lines.append("Mean and std: the statistics z-scoring used when normalisation is on"
                 + (f" (from `{target_stats['from']}`)." if target_stats.get("from") else "."))
    for name, why in (target_stats.get("constant") or {}).items():
        lines.append(f"- `{name}` contributed nothing: {why}")
    return lines


def data_and_curve(info: dict[str, Any], prompts: Any, metrics: list[dict[str, Any]]) -> list[str]:
    """What the policy trained on, and its loss and diagnostics from the first logged step to the last."""
    lines: list[str] = []
    files = info.get("scored_files") or []
    lines += ["", "## Data", ""]
    if prompts:
        lines.append(f"- prompts: `{prompts}`")
    lines.append("- scored files: " + (", ".join(f"`{f}`" for f in files) or "unknown"))
    counts = info.get("file_pairs")  # per file, when the info dict carries them
    if isinstance(counts, dict):
        lines += [f"  - `{f}`: {n} pairs" for f, n in counts.items()]
    groups = f" from {info['groups']} groups ({info.get('pairing', 'all')} pairing)" if "groups" in info else ""
    lines.append(f"- pairs trained on: {info.get('pairs')}{groups}; dropped (identical responses): "
                 f"{info.get('dropped_identical')}")
    for key, value in info.items():  # other drop counts (e.g. invalid rewards), whatever the info dict has
        if key.startswith("dropped_") and key != "dropped_identical":
            lines.append(f"- {key.removeprefix('dropped_').replace('_', ' ')} dropped: {value}")
    lines.append(f"- optimizer steps: {info.get('steps')}")

    lines += ["", "## Training curve", ""]
    losses = [m for m in metrics if isinstance(m.get("loss"), (int, float))]
    if losses:
        first, last = losses[0], losses[-1]
        lines.append(f"- loss: {first['loss']:.4g} at step {first.get('step')} → {last['loss']:.4g} at step "
                     f"{last.get('step')} ({len(losses)} logged steps; all in metrics.jsonl)")
        for key in ("kl_k2", "sign_agreement", "margin_corr"):
            if isinstance(first.get(key), (int, float)) and isinstance(last.get(key), (int, float)):
                lines.append(f"- {key}: {first[key]:.4g} → {last[key]:.4g}")
    else:
        lines.append("- no metrics lines were logged")
    return lines


def reproduce_command(info: dict[str, Any]) -> str:
    """`modpo-pipe train` with the same files and every setting that differs from its default."""
    settings = info.get("settings") or {}
    args = ["modpo-pipe", "train", *(info.get("scored_files") or [])]
    defaults = {"train": cfg.TrainSettings(), "model": cfg.ModelSettings()}
    for section in ("model", "train"):
        given = settings.get(section) or {}
        for f in dataclasses.fields(defaults[section]):
            if f.name not in given or f.name in ("weights", "policy"):
                continue
            value = given[f.name]
            if value == getattr(defaults[section], f.name) and f.name != "out":
                continue
            flag = cfg.flag_name(f)
            if isinstance(value, bool):
                args.append(flag if value else f"--no-{flag[2:]}")
            else:
                args += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    policy = (info.get("policy") or {}).get("path")
    if policy:
        args += ["--policy", policy]
    if info.get("weights"):
        args += ["--weights", ",".join(f"{k}={v:g}" for k, v in info["weights"].items())]
    return " ".join(shlex.quote(a) for a in args)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
