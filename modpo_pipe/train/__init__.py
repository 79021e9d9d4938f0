"""Stage 3, scored.parquet -> checkpoint: regress the policy's implicit reward margin onto the weighted
reward margin. The reference model is never loaded: its log-probs come from the scored files.

This file is the recipe. Read `train()` top to bottom: check_inputs, build_model, resume, one loop of steps
(each a forward and backward of `micro_batch_loss` per micro-batch, then one update), then the outputs. Its
parts live beside it: data (groups, pairs, micro-batch layout), loading (scored files -> groups), plan (steps,
orientation, learning rate), policy (the model's preparation and checks), distributed (several processes) and
state (the files). Output directory:
    OUT/final/          the trained policy (full weights, or the LoRA adapter), safetensors only
    OUT/merged/         with LoRA and --merge: base + adapter merged into full weights
    OUT/state/          resumable state (weights, optimizer moments, step), safetensors + JSON
    OUT/metrics.jsonl   one line per logging step

Several processes (`accelerate launch -m modpo_pipe train ...`, or `--num-processes N`) train data-parallel:
an optimizer step takes batch_size * grad_accum * processes groups (prompts, each with its N responses and the
pairs formed from them), each process computes the gradient of its own share of them, the gradients are
averaged, and only the main process writes files. One process without a launcher is the same loop with nothing
distributed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from modpo_pipe import models, tracking
from modpo_pipe.config import Settings, TrainSettings
from modpo_pipe.errors import ModpoError, out_of_memory
from modpo_pipe.logprobs import build_batch, sequence_logps
from modpo_pipe.losses import kl_k2, margin_stats, pair_loss
from modpo_pipe.prompts import is_hub_id
from modpo_pipe.train.data import (
    PAIRINGS,
    TOKEN_COLUMNS,
    GroupBatch,
    TokenLists,
    TrainingGroups,
    group_batch,
    group_pairs,
)
from modpo_pipe.train.distributed import (
    configure_deepspeed,
    gather_over_processes,
    gradient_sync,
    is_sharded,
    make_accelerator,
    on_main,
    sum_over_processes,
)
from modpo_pipe.train.loading import (
    check_context,
    check_finite,
    check_vocabulary,
    load_training_groups,
    read_scored_meta,
    same_scorers,
    target_record,
    warn_unusable_stats,
)
from modpo_pipe.train.plan import (
    StepPlan,
    epoch_order,
    lr_at,
    micro_batch_groups,
    optimizer_step_groups,
    pair_orientation,
    torch_seed,
)
from modpo_pipe.train.policy import (
    REF_GAP_TOLERANCE,
    check_lora_targets,
    check_reference_dtype,
    check_reference_gap,
    disable_dropout,
    top_layers,
)
from modpo_pipe.train.state import (
    append_jsonl,
    load_state,
    run_fingerprint,
    save_final,
    save_state,
    trained_already,
    truncate_metrics,
)

__all__ = [  # the package's face: what cli, rounds, tests and benchmarks import from modpo_pipe.train
    "PAIRINGS", "REF_GAP_TOLERANCE", "TOKEN_COLUMNS", "GroupBatch", "StepPlan", "TokenLists", "TrainReport",
    "TrainingGroups", "append_jsonl", "check_context", "check_finite", "check_lora_targets",
    "check_reference_dtype", "check_reference_gap", "check_vocabulary", "disable_dropout", "epoch_order",
    "group_batch", "group_pairs", "load_state", "load_training_groups", "lr_at", "micro_batch_groups",
    "micro_batch_loss", "optimizer_step_groups", "pair_orientation", "read_scored_meta", "run_fingerprint",
    "same_scorers", "save_final", "save_state", "top_layers", "torch_seed", "train", "trained_already",
    "truncate_metrics",
]


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
    processes: int = 1
    main_process: bool = True  # False on the other processes of a multi-process run: they print nothing
    target: dict[str, Any] | None = None  # beta, weights and reward statistics the policy was trained toward
    groups: int = 0  # the prompts the pairs come from
    up_to_date: bool = False  # OUT already held the policy trained from these files, this policy and settings


@dataclass
class Inputs:
    """What check_inputs established: the data, the policy that learns from it, and the plan of steps."""

    data: TrainingGroups
    teachers: torch.Tensor  # (pairs,) data.teacher, computed once
    target: dict[str, Any]  # what the policy is trained toward (target_record)
    policy_path: str
    policy_fingerprint: str
    policy_is_ref: bool  # the policy is the model that scored ref_logp: its first log-probs must match them
    ref_identity: dict[str, Any]  # the scored files' reference
    tokenizer: Any
    steps: StepPlan
    fingerprint: str  # what a saved state and a finished output must match (run_fingerprint)


@dataclass
class Policy:
    """The model being trained and what updates it. After prepare_for_processes, `model` is the engine's
    wrapper (DDP, FSDP, DeepSpeed, or the model itself) and `unwrapped` the model inside it."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # what the gradient is clipped over
    device: torch.device
    dtype: torch.dtype  # the compute dtype, and the dtype of the saved weights
    disabled_dropout: int


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor  # this micro-batch's share of the step's loss
    student: torch.Tensor  # (pairs,) beta times the log-ratio margin, as (y1, y2)
    teacher: torch.Tensor  # (pairs,) the weighted reward margin, as (y1, y2)
    log_ratio: torch.Tensor  # (responses,) log pi - log pi_ref
    logps: torch.Tensor  # (responses,) the policy's summed log-probs
    ref_logps: torch.Tensor  # (responses,) the cached reference's
    response_tokens: torch.Tensor  # (responses,)
    tokens: int  # prompt and response tokens in the forward


@out_of_memory("train", "[train].batch_size (groups per micro-batch; raise grad_accum to keep the global "
               "batch, and the saved state resumes) or, below one group, samples_per_prompt or max_new_tokens")
def train(settings: Settings, scored_paths: list[Path], out: Path, progress: bool = True) -> TrainReport:
    t = settings.train
    started = time.time()
    trackers = tracking.parse_report_to(t.report_to)  # an uninstalled one is refused before any work
    accelerator = make_accelerator(settings.model.device, trackers, out)
    inputs = check_inputs(settings, scored_paths, accelerator)
    steps, merge = inputs.steps, t.lora_r > 0 and t.merge
    report = functools.partial(
        TrainReport, out=str(out), pairs=inputs.data.pairs, dropped_identical=inputs.data.dropped_identical,
        steps=len(steps), processes=accelerator.num_processes, main_process=accelerator.is_main_process,
        target=inputs.target, groups=len(inputs.data))
    if trained_already(out, inputs.fingerprint, merged=merge):  # a rerun: nothing to do
        return report(resumed_from=len(steps), first_loss=None, last_loss=None, first_batch_ref_gap=None,
                      seconds=time.time() - started, up_to_date=True)

    policy = build_model(settings, inputs, accelerator)
    start_step = resume(out, policy, inputs.fingerprint, is_sharded(accelerator))
    merged_due = merge and not (out / "merged" / "config.json").is_file()
    if start_step == len(steps) and (out / "final" / "modpo_pipe.json").is_file() and not merged_due:
        return report(resumed_from=start_step, first_loss=None, last_loss=None, first_batch_ref_gap=None,
                      seconds=time.time() - started)
    policy = prepare_for_processes(accelerator, policy, t)
    metrics = Metrics.open(out, accelerator, settings, inputs, start_step, trackers)

    bar = tqdm(total=len(steps), initial=start_step, desc="train", unit="step",
               disable=not progress or not accelerator.is_main_process)
    first_loss = last_loss = ref_gap = None
    saved_step = start_step if start_step > 0 else None  # the step of the state on disk, if any
    orientation_epoch, orientation = -1, torch.empty(0)
    for step in range(start_step, len(steps)):
        epoch, step_groups = steps[step]
        if epoch != orientation_epoch:
            orientation_epoch, orientation = epoch, pair_orientation(inputs.data.pairs, t.seed, epoch)
        step_started = time.time()
        lr = lr_at(step, len(steps), t.lr, t.warmup_ratio, t.lr_schedule)
        for group in policy.optimizer.param_groups:
            group["lr"] = lr
        # Dropout noise depends on the step (resumable) and the process (each draws its own).
        torch.manual_seed(torch_seed(t.seed * 1_000_003 + step + accelerator.process_index * 1_000_000_007))
        totals = step_gradients(accelerator, policy, inputs, t, step_groups, orientation,
                                check_gap=step == 0 and inputs.policy_is_ref and accelerator.is_main_process)
        ref_gap = ref_gap or totals.ref_gap
        loss, tokens = sum_over_processes(accelerator, totals.loss, totals.tokens)
        grad_norm = apply_update(accelerator, policy, t, loss, f"step {step + 1} (epoch {epoch})",
                                 kept_state(out, t, saved_step))
        first_loss = loss if first_loss is None else first_loss
        last_loss = loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        # The first step always: where the loss started, and the first batch's gap to the reference.
        if step == 0 or (step + 1) % t.log_every == 0 or step + 1 == len(steps):
            record = step_record(accelerator, inputs.data, step_groups, totals, step, epoch, loss, grad_norm, lr,
                                 tokens, step_started)
            if ref_gap is not None and step == 0:
                record["first_batch_ref_gap"], record["first_batch_ref_gap_scaled"] = ref_gap
            metrics.write(record)
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < len(steps) and not is_sharded(accelerator):
            on_main(accelerator, save_state, out / "state", policy.unwrapped, policy.optimizer, step + 1,
                    inputs.fingerprint)
            saved_step = step + 1
    bar.close()
    tracking.finish(accelerator.trackers)

    write_outputs(accelerator, policy, inputs, settings, scored_paths, out)
    return report(resumed_from=start_step, first_loss=first_loss, last_loss=last_loss,
                  first_batch_ref_gap=ref_gap[0] if ref_gap else None, seconds=time.time() - started)


def check_inputs(settings: Settings, scored_paths: list[Path], accelerator: Accelerator) -> Inputs:
    """Teacher margins and cached reference log-probs (no reference model anywhere), checked against the policy
    that will learn from them: its tokenizer, vocabulary and context window."""
    t, m = settings.train, settings.model
    if t.reward_stats and t.normalize != "zscore":
        raise ModpoError(f"[train].reward_stats ({t.reward_stats}) needs normalize = \"zscore\"")
    data = load_training_groups(scored_paths, t.weights, t.normalize,
                                Path(t.reward_stats) if t.reward_stats else None, t.pairs)
    target = target_record(data, t)
    ref_identity = data.meta.get("ref", {})
    policy_path = t.policy or ref_identity.get("path") or ""
    if not policy_path:
        raise ModpoError("no policy: pass --policy (the scored file names no reference)")
    base = models.adapter_base(policy_path)
    if base is not None and t.lora_r > 0 and not t.merge:
        # peft saves the new adapter against the bare base: final/ alone would silently drop the policy's own
        # adapter. merged/ holds both (rounds train this way), so --merge is the way to a usable policy.
        raise ModpoError(f"[train].policy {policy_path} is a LoRA adapter (on {base}): a new adapter on it is saved "
                         "against that base without the policy's own adapter; pass --merge (merged/ holds both), "
                         "train with lora_r = 0 (its merged weights, fine-tuned whole), or merge it first")
    tokenizer = models.load_tokenizer(policy_path, m.trust_remote_code, what="[train].policy")
    if models.tokenizer_fingerprint(tokenizer) != data.meta["tokenizer_fingerprint"]:
        raise ModpoError(f"{scored_paths[0]}: tokenised with another tokenizer than the policy {policy_path}'s")
    check_vocabulary(scored_paths, data, len(tokenizer))
    check_context(scored_paths, data, policy_path, models.context_length(policy_path, m.trust_remote_code))
    if accelerator.is_main_process:
        warn_unusable_stats(data.stats)
    policy_fingerprint = models.fingerprint(policy_path)
    return Inputs(
        data=data, teachers=data.teacher, target=target, policy_path=policy_path,
        policy_fingerprint=policy_fingerprint, policy_is_ref=policy_fingerprint == ref_identity.get("fingerprint"),
        ref_identity=ref_identity, tokenizer=tokenizer,
        steps=optimizer_step_groups(len(data), t, accelerator.num_processes),
        fingerprint=run_fingerprint(data, t, policy_fingerprint, accelerator.num_processes))


def build_model(settings: Settings, inputs: Inputs, accelerator: Accelerator) -> Policy:
    """The policy in training mode (LoRA adapters added, dropout off) and its AdamW optimizer.

    Mixed precision: [model].dtype is the compute dtype (and the dtype of the saved weights). Whatever it is,
    the weights the optimizer updates and its moments are float32: a bfloat16 weight of 0.02 has a spacing of
    1.2e-4, so an AdamW step of 1e-5 applied to it in place rounds back to the old value. Frozen LoRA base
    weights need no such care and stay in the compute dtype."""
    t, m = settings.train, settings.model
    # Alone: [model].device. Under a launcher: the device it gave this process (FSDP and DeepSpeed place the
    # weights themselves).
    device = accelerator.device if accelerator.distributed_type != DistributedType.NO else models.resolve_device(
        m.device)
    dtype = models.resolve_dtype(m.dtype, device)
    if dtype == torch.float16:
        raise ModpoError("[model].dtype = float16: training in float16 needs loss scaling, which modpo-pipe does "
                         "not do; train in bfloat16 (GPUs since Ampere) or float32")
    if accelerator.is_main_process:
        check_reference_dtype(inputs.ref_identity.get("dtype"), dtype)
    torch.manual_seed(torch_seed(t.seed))
    model = models.load_causal_lm(inputs.policy_path, dtype=dtype if t.lora_r > 0 else torch.float32,
                                  device=None if is_sharded(accelerator) else device,
                                  trust_remote_code=m.trust_remote_code, what="[train].policy")
    if t.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        check_lora_targets(model, t.lora_targets)
        lora = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=t.lora_targets, task_type="CAUSAL_LM",
                          layers_to_transform=top_layers(model, t.lora_layers))
        model = get_peft_model(model, lora, autocast_adapter_dtype=True)  # adapters in float32
    # The cached ref_logp came from a model in eval mode: with dropout on, log pi - log pi_ref would not be 0
    # at step 0 and every student margin would carry dropout noise (lora_dropout included).
    disabled_dropout = disable_dropout(model)
    if t.gradient_checkpointing:
        # Reentrant checkpointing breaks DDP's gradient hooks; one process keeps the library's default.
        model.gradient_checkpointing_enable(**({"gradient_checkpointing_kwargs": {"use_reentrant": False}}
                                               if accelerator.num_processes > 1 else {}))
        if t.lora_r > 0:
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # float32 master weights (a no-op for what already is)
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return Policy(model=model, unwrapped=model, optimizer=optimizer, params=params, device=device, dtype=dtype,
                  disabled_dropout=disabled_dropout)


def resume(out: Path, policy: Policy, fingerprint: str, sharded: bool) -> int:
    """The step to start at: the saved state's, loaded into the plain model and optimizer (before an engine
    wraps them), or 0."""
    out.mkdir(parents=True, exist_ok=True)
    if not sharded:
        return load_state(out / "state", policy.model, policy.optimizer, fingerprint)
    if (out / "state").exists():
        raise ModpoError(f"{out / 'state'} holds a resumable state, which FSDP and DeepSpeed runs can neither "
                         f"load nor write; resume it with one process or DDP, or use another --out")
    return 0


def prepare_for_processes(accelerator: Accelerator, policy: Policy, t: TrainSettings) -> Policy:
    """The model and optimizer wrapped by the engine accelerate runs (none with one process)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, t)
    model, optimizer = accelerator.prepare(policy.model, policy.optimizer)
    # FSDP and DeepSpeed clip the engine's own (flat or sharded) parameters.
    params = list(model.parameters()) if is_sharded(accelerator) else policy.params
    return dataclasses.replace(policy, model=model, optimizer=optimizer, params=params,
                               unwrapped=accelerator.unwrap_model(model))


def micro_batch_loss(policy: Policy, inputs: Inputs, groups: list[int], orientation: torch.Tensor,
                     groups_in_step: int, t: TrainSettings, wrapped: bool) -> MicroBatchLoss:
    """The loss of some groups of one step, weighted so that the step's loss is the mean over its groups of each
    group's mean pair loss. One forward over every response of every group: each response once, however many
    pairs it is in."""
    device = policy.device
    batch_groups: GroupBatch = group_batch(inputs.data, groups)
    batch = build_batch(batch_groups.prompts, batch_groups.responses, inputs.tokenizer.pad_token_id).to(device)
    with models.autocast(device, policy.dtype):
        logps = sequence_logps(policy.model, batch, wrapped=wrapped)
    ref = inputs.data.ref_logps[batch_groups.response_index].to(device)
    log_ratio = logps - ref
    first, second = batch_groups.first.to(device), batch_groups.second.to(device)
    student = t.beta * (log_ratio[first] - log_ratio[second])
    teacher = inputs.teachers[batch_groups.pair_index].to(device)
    sign = orientation[batch_groups.pair_index].to(device)  # the pair as (y1, y2) or (y2, y1)
    weight = batch_groups.pair_weight.to(device) / groups_in_step
    loss = (pair_loss(sign * student, sign * teacher, t.loss) * weight).sum()
    return MicroBatchLoss(loss=loss, student=student, teacher=teacher, log_ratio=log_ratio, logps=logps,
                          ref_logps=ref, response_tokens=batch.response_mask.sum(1), tokens=batch.num_tokens)


@dataclass
class StepTotals:
    """One process's sums over the micro-batches of a step (for the metrics line)."""

    loss: float = 0.0
    tokens: int = 0
    students: list[torch.Tensor] = dataclasses.field(default_factory=list)
    teachers: list[torch.Tensor] = dataclasses.field(default_factory=list)
    log_ratios: list[torch.Tensor] = dataclasses.field(default_factory=list)
    ref_gap: tuple[float, float] | None = None  # check_reference_gap of the first micro-batch, when asked for


def step_gradients(accelerator: Accelerator, policy: Policy, inputs: Inputs, t: TrainSettings,
                   step_groups: list[int], orientation: torch.Tensor, check_gap: bool) -> StepTotals:
    """Forward and backward of this process's micro-batches of one step: the step's gradient, reduced over the
    processes, is left in the parameters."""
    processes = accelerator.num_processes
    batches = micro_batch_groups(step_groups, t.batch_size, accelerator.process_index, processes)
    wrapped = accelerator.distributed_type != DistributedType.NO
    totals = StepTotals()
    for j, groups in enumerate(batches):
        padding = not groups  # this process has no groups left in the step: a zero-weight pass over one
        with gradient_sync(accelerator, policy.model, last=j == len(batches) - 1):
            result = micro_batch_loss(policy, inputs, groups or step_groups[:1], orientation, len(step_groups),
                                      t, wrapped)
            if check_gap and totals.ref_gap is None and not padding:
                totals.ref_gap = check_reference_gap(result.logps.detach().cpu(), result.ref_logps.cpu(),
                                                     result.response_tokens.cpu(), policy.dtype)
            # Averaging over processes divides the summed gradient by their number: scale it back.
            accelerator.backward(result.loss * (0 if padding else processes))
        if padding:
            continue
        totals.loss += result.loss.item()
        totals.tokens += result.tokens
        totals.students.append(result.student.detach().cpu())
        totals.teachers.append(result.teacher.cpu())
        totals.log_ratios.append(result.log_ratio.detach().cpu())
    return totals


def kept_state(out: Path, t: TrainSettings, saved_step: int | None) -> str:
    return (f"the last good state (step {saved_step}) is kept in {out / 'state'}" if saved_step
            else f"no state was saved yet (save_every={t.save_every})")


def apply_update(accelerator: Accelerator, policy: Policy, t: TrainSettings, loss: float, where: str,
                 kept: str) -> float | None:
    """Clip the gradient and take the optimizer step; returns the gradient's norm (None: DeepSpeed clips). A
    non-finite loss or gradient stops before the update: no bad weights reach a state or final/, and the last
    good state (`kept` says which) stays."""
    grad_norm = accelerator.clip_grad_norm_(policy.params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
    bad_gradient = grad_norm is not None and not math.isfinite(float(grad_norm))
    if not math.isfinite(loss) or bad_gradient:
        raise ModpoError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at {where}; the update "
                         f"was not applied and {kept}. Lower lr or check the scored data")
    policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    return None if grad_norm is None else float(grad_norm)


def step_record(accelerator: Accelerator, data: TrainingGroups, step_groups: list[int], totals: StepTotals,
                step: int, epoch: int, loss: float, grad_norm: float | None, lr: float, tokens: int,
                step_started: float) -> dict[str, Any]:
    """One metrics.jsonl line: the step's margins and KL over every process's pairs."""
    pairs = int(sum(data.pair_start[g + 1] - data.pair_start[g] for g in step_groups))
    student, teacher, log_ratio = (gather_over_processes(accelerator, x)
                                   for x in (totals.students, totals.teachers, totals.log_ratios))
    return {
        "step": step + 1, "epoch": epoch, "loss": loss, **margin_stats(student, teacher),
        "kl_k2": kl_k2(log_ratio), "grad_norm": grad_norm,
        "lr": lr, "tokens_per_s": tokens / max(time.time() - step_started, 1e-9),
        "step_seconds": time.time() - step_started, "pairs": pairs, "groups": len(step_groups),
    }


@dataclass
class Metrics:
    """OUT/metrics.jsonl and the trackers, written by the main process."""

    path: Path
    accelerator: Accelerator
    target: dict[str, Any]
    target_logged: bool  # the first line names the target (a resume keeps the line that already does)

    @classmethod
    def open(cls, out: Path, accelerator: Accelerator, settings: Settings, inputs: Inputs, start_step: int,
             trackers: list[str]) -> Metrics:
        path = out / "metrics.jsonl"
        if accelerator.is_main_process:
            truncate_metrics(path, start_step)
        metrics = cls(path, accelerator, inputs.target, target_logged=path.is_file() and path.stat().st_size > 0)
        hyperparameters = tracking.hyperparameters({"train": settings.train, "model": settings.model,
                                                    "weights": inputs.data.weights})
        accelerator.init_trackers(tracking.PROJECT, hyperparameters,
                                  tracking.tracker_kwargs(trackers, out.name, out,
                                                          tracking.resume_id(str(out.resolve()), inputs.fingerprint),
                                                          purge_step=start_step + 1 if start_step else None))
        return metrics

    def write(self, record: dict[str, Any]) -> None:
        if not self.target_logged:
            record["target"] = self.target
        if self.accelerator.is_main_process:
            append_jsonl(self.path, record)
            self.target_logged = True
            self.accelerator.log(tracking.scalars(record), step=record["step"])


def write_outputs(accelerator: Accelerator, policy: Policy, inputs: Inputs, settings: Settings,
                  scored_paths: list[Path], out: Path) -> None:
    """The last state, final/ (and merged/), written by the main process alone."""
    t, m, data = settings.train, settings.model, inputs.data
    sharded, steps = is_sharded(accelerator), len(inputs.steps)
    if not sharded:
        on_main(accelerator, save_state, out / "state", policy.unwrapped, policy.optimizer, steps, inputs.fingerprint)
    info = {
        "weights": data.weights, "beta": t.beta, "loss": t.loss, "normalize": t.normalize,
        "scored_files": [str(p) for p in scored_paths],
        "policy": {"path": inputs.policy_path, "fingerprint": inputs.policy_fingerprint},
        "run_fingerprint": inputs.fingerprint,  # what a rerun compares (trained_already)
        "ref": inputs.ref_identity, "pairs": data.pairs, "groups": len(data), "pairing": data.pairing,
        "dropped_identical": data.dropped_identical,
        "steps": steps, "lora_r": t.lora_r, "target": inputs.target,
        "dtype": str(policy.dtype).removeprefix("torch."), "dropout_disabled": policy.disabled_dropout,
        # For the model card: reward specs, fingerprints and normalisation statistics, the prompts, settings.
        "rewards": data.meta.get("rewards", {}), "prompts": data.meta.get("prompts_file"),
        "prompts_on_hub": is_hub_id(data.meta.get("prompts_file")) and not Path(data.meta["prompts_file"]).exists(),
        "settings": {"train": dataclasses.asdict(t), "model": dataclasses.asdict(m)},
    }
    full_state = accelerator.get_state_dict(policy.model) if sharded else None  # gathered from every process
    on_main(accelerator, save_final, out / "final", policy.unwrapped, inputs.tokenizer, info, full_state, policy.dtype)
    if t.lora_r > 0 and t.merge:
        def merged() -> torch.nn.Module:
            if not sharded:
                return models.merge_lora(policy.unwrapped)
            # The live adapter is split across processes: the one just written, merged on the CPU.
            return models.load_causal_lm(str(out / "final"), dtype=policy.dtype, device=torch.device("cpu"),
                                         trust_remote_code=m.trust_remote_code, what="the trained adapter")

        on_main(accelerator, lambda: save_final(out / "merged", merged(), inputs.tokenizer, info, dtype=policy.dtype))
