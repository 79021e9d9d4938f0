"""Stage 3, scored.parquet -> checkpoint: regress the policy's implicit reward margin onto the weighted
reward margin. The reference model is never loaded: its log-probs come from the scored files.

Read `train()` top to bottom: data, model, optimizer, then one loop. Output directory:
    OUT/final/          the trained policy (full weights, or the LoRA adapter), safetensors only
    OUT/merged/         with LoRA and --merge: base + adapter merged into full weights
    OUT/state/          resumable state (weights, optimizer moments, step), safetensors + JSON
    OUT/metrics.jsonl   one line per logging step
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modpo_pipe import models, schema
from modpo_pipe.config import Settings, TrainSettings
from modpo_pipe.errors import ModpoError
from modpo_pipe.logprobs import build_batch, sequence_logps
from modpo_pipe.losses import margin_stats, normalise_weights, pair_loss, student_margin, teacher_margin, zscore

# Policy log-probs on the first batch must equal the cached ref_logp when the policy is the reference;
# a larger gap means tokenisation or precision drift between score and train.
REF_GAP_TOLERANCE = 1e-3


@dataclass
class TrainingPairs:
    pair_ids: list[str]
    prompt_ids: list[list[int]]
    response_ids_1: list[list[int]]
    response_ids_2: list[list[int]]
    ref_logp_1: torch.Tensor  # (N,)
    ref_logp_2: torch.Tensor
    teacher: torch.Tensor  # (N,) weighted (normalised) reward margin
    reward_names: list[str]
    weights: dict[str, float]  # normalised
    dropped_identical: int
    meta: dict[str, Any]  # the first file's metadata
    fingerprints: list[str]  # one per input file, for the resume check

    def __len__(self) -> int:
        return len(self.pair_ids)


def load_training_pairs(paths: list[Path], weights: dict[str, float], normalize: str) -> TrainingPairs:
    """Read scored files, compute each pair's teacher margin, drop pairs with identical responses."""
    if not paths:
        raise ModpoError("train needs at least one scored file")
    columns: dict[str, list] = {k: [] for k in ("pair_id", "prompt_ids", "response_ids_1", "response_ids_2")}
    ref_1, ref_2, teachers, fingerprints = [], [], [], []
    names: list[str] | None = None
    first_meta: dict[str, Any] = {}
    w = None
    dropped = 0
    for path in paths:
        table, meta = schema.read_table(path, "scored")
        file_names = schema.reward_names_of(table.schema)
        if names is None:
            names, first_meta = file_names, meta
            try:
                w = normalise_weights(weights or dict.fromkeys(names, 1.0), names)
            except ValueError as e:
                raise ModpoError(f"--weights / [train].weights: {e} (file {path})") from None
        elif sorted(file_names) != sorted(names):
            raise ModpoError(f"{path}: rewards {file_names} differ from {paths[0]}'s {names}")
        if meta["tokenizer_fingerprint"] != first_meta["tokenizer_fingerprint"]:
            raise ModpoError(f"{path}: tokenised with another tokenizer than {paths[0]}")
        r1 = torch.tensor([table.column(schema.reward_columns(n)[0]).to_pylist() for n in names]).T
        r2 = torch.tensor([table.column(schema.reward_columns(n)[1]).to_pylist() for n in names]).T
        if normalize == "zscore":
            mean = torch.tensor([meta["rewards"][n]["mean"] for n in names])
            std = torch.tensor([meta["rewards"][n]["std"] for n in names])
            r1, r2 = zscore(r1, mean, std), zscore(r2, mean, std)
        teacher = teacher_margin(r1, r2, w)
        ids_1, ids_2 = table.column("response_ids_1").to_pylist(), table.column("response_ids_2").to_pylist()
        keep = [i for i in range(table.num_rows) if ids_1[i] != ids_2[i]]  # identical: no signal
        dropped += table.num_rows - len(keep)
        prompt_ids, pair_ids = table.column("prompt_ids").to_pylist(), table.column("pair_id").to_pylist()
        columns["pair_id"] += [pair_ids[i] for i in keep]
        columns["prompt_ids"] += [prompt_ids[i] for i in keep]
        columns["response_ids_1"] += [ids_1[i] for i in keep]
        columns["response_ids_2"] += [ids_2[i] for i in keep]
        ref_1.append(torch.tensor(table.column("ref_logp_1").to_pylist())[keep])
        ref_2.append(torch.tensor(table.column("ref_logp_2").to_pylist())[keep])
        teachers.append(teacher[keep])
        fingerprints.append(f"{meta['created']}:{table.num_rows}:{meta.get('ref', {}).get('fingerprint')}")
    if len(set(columns["pair_id"])) != len(columns["pair_id"]):
        raise ModpoError("the scored files share pair_ids: the same pairs given twice")
    if not columns["pair_id"]:
        raise ModpoError(f"no pairs left to train on ({dropped} had identical responses)")
    assert names is not None and w is not None
    return TrainingPairs(
        columns["pair_id"], columns["prompt_ids"], columns["response_ids_1"], columns["response_ids_2"],
        torch.cat(ref_1), torch.cat(ref_2), torch.cat(teachers), names,
        {n: float(x) for n, x in zip(names, w)}, dropped, first_meta, fingerprints,
    )


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_ratio: float) -> float:
    """Linear warmup to peak_lr, then cosine decay to 0 at total_steps. `step` counts from 0."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The pair order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def optimizer_steps(n_pairs: int, t: TrainSettings) -> list[tuple[int, list[list[int]]]]:
    """Every optimizer step as (epoch, its micro-batches of pair indices), in training order."""
    steps = []
    for epoch in range(t.epochs):
        order = epoch_order(n_pairs, t.seed, epoch)
        micro = [order[i : i + t.batch_size] for i in range(0, n_pairs, t.batch_size)]
        steps += [(epoch, micro[i : i + t.grad_accum]) for i in range(0, len(micro), t.grad_accum)]
    return steps


def run_fingerprint(data: TrainingPairs, t: TrainSettings, policy_fingerprint: str) -> str:
    """What a resumable state must match: data, policy and every setting that changes the result."""
    settings = {k: v for k, v in dataclasses.asdict(t).items() if k not in ("out", "log_every", "save_every",
                                                                           "merge", "policy")}
    blob = json.dumps({"data": data.fingerprints, "settings": settings, "policy": policy_fingerprint},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class TrainReport:
    out: str
    pairs: int
    dropped_identical: int
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    first_batch_ref_gap: float | None
    seconds: float


def train(settings: Settings, scored_paths: list[Path], out: Path, progress: bool = True) -> TrainReport:
    t, m = settings.train, settings.model
    started = time.time()

    # --- data: teacher margins and cached reference log-probs; no reference model anywhere ---
    data = load_training_pairs(scored_paths, t.weights, t.normalize)
    ref_identity = data.meta.get("ref", {})
    policy_path = t.policy or ref_identity.get("path") or ""
    if not policy_path:
        raise ModpoError("no policy: pass --policy (the scored file names no reference)")
    tokenizer = models.load_tokenizer(policy_path, m.trust_remote_code, what="[train].policy")
    if models.tokenizer_fingerprint(tokenizer) != data.meta["tokenizer_fingerprint"]:
        raise ModpoError(f"{scored_paths[0]}: tokenised with another tokenizer than the policy {policy_path}'s")
    policy_fingerprint = models.fingerprint(policy_path)
    policy_is_ref = policy_fingerprint == ref_identity.get("fingerprint")
    steps = optimizer_steps(len(data), t)
    fingerprint = run_fingerprint(data, t, policy_fingerprint)

    # --- model ---
    device = models.resolve_device(m.device)
    dtype = models.resolve_dtype(m.dtype, device)
    torch.manual_seed(t.seed)
    model = models.load_causal_lm(policy_path, dtype=dtype, device=device, trust_remote_code=m.trust_remote_code,
                                  what="[train].policy")
    if t.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=t.lora_targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if t.lora_r > 0:
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    # --- resume ---
    out.mkdir(parents=True, exist_ok=True)
    start_step = load_state(out / "state", model, optimizer, fingerprint)
    if start_step == len(steps) and (out / "final" / "modpo_pipe.json").is_file():
        return TrainReport(str(out), len(data), data.dropped_identical, len(steps), start_step, None, None,
                           None, time.time() - started)
    metrics_path = out / "metrics.jsonl"
    truncate_metrics(metrics_path, start_step)

    # --- loop ---
    pad_id = tokenizer.pad_token_id
    first_loss = last_loss = ref_gap = None
    bar = tqdm(total=len(steps), initial=start_step, desc="train", unit="step", disable=not progress)
    for step in range(start_step, len(steps)):
        epoch, micro_batches = steps[step]
        lr = lr_at(step, len(steps), t.lr, t.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(t.seed * 1_000_003 + step)  # dropout noise depends on the step alone: resumable
        step_started = time.time()
        pairs_in_step = sum(len(mb) for mb in micro_batches)
        loss_sum, tokens, students, teachers, log_ratios = 0.0, 0, [], [], []
        for idx in micro_batches:
            # One forward over both responses of every pair: y1 rows then y2 rows.
            prompts = [data.prompt_ids[i] for i in idx]
            batch = build_batch(prompts * 2, [data.response_ids_1[i] for i in idx]
                                + [data.response_ids_2[i] for i in idx], pad_id).to(device)
            logps = sequence_logps(model, batch)
            logp_1, logp_2 = logps[: len(idx)], logps[len(idx):]
            ref_1, ref_2 = data.ref_logp_1[idx].to(device), data.ref_logp_2[idx].to(device)
            if step == start_step and ref_gap is None and policy_is_ref and start_step == 0:
                ref_gap = check_reference_gap(logps.detach().cpu(), torch.cat([ref_1, ref_2]).cpu())
            student = student_margin(logp_1, logp_2, ref_1, ref_2, t.beta)
            teacher = data.teacher[idx].to(device)
            loss = pair_loss(student, teacher, t.loss).sum() / pairs_in_step
            loss.backward()
            loss_sum += loss.item()
            tokens += batch.num_tokens
            students.append(student.detach().cpu())
            teachers.append(teacher.cpu())
            log_ratios.append(torch.cat([logp_1 - ref_1, logp_2 - ref_2]).detach().cpu())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        if not math.isfinite(loss_sum) or not torch.isfinite(grad_norm):
            raise ModpoError(f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient'} at step "
                             f"{step + 1}; not applied. The last good state is in {out / 'state'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss_sum if first_loss is None else first_loss
        last_loss = loss_sum
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")

        if (step + 1) % t.log_every == 0 or step + 1 == len(steps):
            student_all, teacher_all = torch.cat(students), torch.cat(teachers)
            record = {
                "step": step + 1, "epoch": epoch, "loss": loss_sum, **margin_stats(student_all, teacher_all),
                "kl_proxy": torch.cat(log_ratios).mean().item(), "grad_norm": float(grad_norm), "lr": lr,
                "tokens_per_s": tokens / max(time.time() - step_started, 1e-9), "pairs": pairs_in_step,
            }
            if ref_gap is not None and step == 0:
                record["first_batch_ref_gap"] = ref_gap
            append_jsonl(metrics_path, record)
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < len(steps):
            save_state(out / "state", model, optimizer, step + 1, fingerprint)
    bar.close()

    # --- outputs ---
    save_state(out / "state", model, optimizer, len(steps), fingerprint)
    info = {
        "weights": data.weights, "beta": t.beta, "loss": t.loss, "normalize": t.normalize,
        "scored_files": [str(p) for p in scored_paths],
        "policy": {"path": policy_path, "fingerprint": policy_fingerprint},
        "ref": ref_identity, "pairs": len(data), "dropped_identical": data.dropped_identical,
        "steps": len(steps), "lora_r": t.lora_r,
    }
    save_final(out / "final", model, tokenizer, info)
    if t.lora_r > 0 and t.merge:
        save_final(out / "merged", model.merge_and_unload(), tokenizer, info)
    return TrainReport(str(out), len(data), data.dropped_identical, len(steps), start_step, first_loss,
                       last_loss, ref_gap, time.time() - started)


def check_reference_gap(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> float:
    gap = (policy_logps - ref_logps).abs().max().item()
    if gap > REF_GAP_TOLERANCE:
        print(f"WARNING: the policy is the reference, but its log-probs differ from the cached ref_logp by up "
              f"to {gap:.3g} on the first batch (tolerance {REF_GAP_TOLERANCE}). Tokenization, dtype or model "
              f"drift between score and train: the student margins are biased by this much.", file=sys.stderr)
    return gap


# --- files: state, checkpoints, metrics. Every write goes to a temporary name, then a rename. ---

def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temporary directory into place; a crash leaves either the old or the new one."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               fingerprint: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "trainable.safetensors"))
    opt = optimizer.state_dict()
    moments = {f"{idx}.{key}": value.cpu().contiguous() for idx, state in opt["state"].items()
               for key, value in state.items() if torch.is_tensor(value)}
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                "param_groups": opt["param_groups"]}))
    _replace_dir(tmp, path)


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> int:
    """Restore weights and optimizer from a state that matches this run; returns the step to start at."""
    from safetensors.torch import load_file

    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames of _replace_dir
    if not (path / "state.json").is_file():
        return 0
    state = json.loads((path / "state.json").read_text())
    if state["fingerprint"] != fingerprint:
        raise ModpoError(f"{path} holds a training state for other data or settings; use another --out or "
                         f"delete {path.parent} to start over")
    trainable = load_file(str(path / "trainable.safetensors"))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            named[name].copy_(value)
    moments = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return int(state["step"])


def save_final(path: Path, model: torch.nn.Module, tokenizer: Any, info: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "modpo_pipe.json").write_text(json.dumps(info, indent=2))
    _replace_dir(tmp, path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, start_step: int) -> None:
    """Drop lines a killed run logged past its last saved state, so a resume never duplicates steps."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= start_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
