"""The policy being trained: which layers LoRA adapts, dropout off, and its first log-probs checked against the
cached reference's."""

from __future__ import annotations

import sys

import torch

from modpo_pipe.errors import ModpoError

# Policy log-probs on the first batch must equal the cached ref_logp when the policy is the reference; a
# larger gap means tokenisation, precision or model drift between score and train. The tolerance is per compute
# dtype, on a sequence's |gap| / sqrt(its response tokens): rounding errors of independent tokens add up like a
# random walk. float32 shows batch-shape rounding only. In bfloat16, full fine-tuning runs float32 master
# weights under autocast against a reference scored with bfloat16 weights, so the residual stream is rounded
# differently: measured on CPU (tests/test_numerics.py, tiny Llama, replies of <= 16 tokens) 0.041 at most
# (a gap of 0.058 nats); LoRA (a bfloat16 base, as scored) measured 0. The bf16 tolerance is about 3x that;
# benchmarks/gpu_check.py reports the same quantity on a GPU for SmolLM2-135M's shape.
REF_GAP_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.12}  # nats / sqrt(response tokens)


def check_reference_gap(policy_logps: torch.Tensor, ref_logps: torch.Tensor, response_tokens: torch.Tensor,
                        dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(largest |gap|, largest |gap| / sqrt(response tokens)) of the first batch; warns above
    REF_GAP_TOLERANCE."""
    gaps = (policy_logps - ref_logps).abs()
    gap, per_token = gaps.max().item(), (gaps / response_tokens.clamp(min=1).sqrt()).max().item()
    tolerance = REF_GAP_TOLERANCE.get(dtype, REF_GAP_TOLERANCE[torch.bfloat16])
    if per_token > tolerance:
        print(f"WARNING: the policy is the reference, but its log-probs differ from the cached ref_logp by up "
              f"to {gap:.3g} ({per_token:.3g} per sqrt(token); tolerance {tolerance} in "
              f"{str(dtype).removeprefix('torch.')}) on the first batch. Tokenization, dtype or model drift "
              f"between score and train: the student margins are biased by this much.", file=sys.stderr)
    return gap, per_token


def check_reference_dtype(ref_dtype: str | None, dtype: torch.dtype) -> None:
    """The cached ref_logp were computed in the dtype the scored file records; training in another one puts the
    difference between the two numerics into every log-ratio. Loud, but not fatal: it may be deliberate."""
    train_dtype = str(dtype).removeprefix("torch.")
    if ref_dtype and ref_dtype != train_dtype:
        print(f"WARNING: dtype mismatch: the reference log-probs were computed in {ref_dtype} (score) but the "
              f"policy trains in {train_dtype} ([model].dtype). Their numerics differ, so log pi - log pi_ref is "
              f"not 0 at step 0; score and train with the same [model].dtype.", file=sys.stderr)


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn off every dropout of the model for good (train() would switch nn.Dropout back on): nn.Dropout
    modules (LoRA's included) get p = 0, and so does every rate a module keeps as a plain number and passes to
    a kernel or F.dropout itself (Llama's `attention_dropout`, StarCoder2's `residual_dropout` and
    `embedding_dropout`, DBRX's `resid_pdrop`): any float attribute whose name holds "dropout" or ends in
    "pdrop". Returns how many were > 0."""
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            count += module.p > 0
            module.p = 0.0
            continue
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                count += value > 0
                setattr(module, name, 0.0)
    return count


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every [train].lora_targets entry names modules of the model (peft matches a module's name or its last
    dotted parts): peft skips a misspelt entry without a word when another one matches, and raises its own
    error, after the model has loaded, when none does."""
    if not targets:
        raise ModpoError("[train].lora_targets is empty: name the modules LoRA adapts (e.g. q_proj, v_proj), or "
                         "all-linear")
    if "all-linear" in targets:
        return
    # The layer kinds LoRA adapts (GPT-2's Conv1D is a Linear by another name); a block such as `mlp` is none.
    adaptable = [name for name, module in model.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d))
                 or type(module).__name__ == "Conv1D"]
    unknown = [t for t in targets if not t or not any(n == t or n.endswith("." + t) for n in adaptable)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ModpoError(f"[train].lora_targets {unknown} match no layer LoRA can adapt in the policy; its linear "
                         f"layers are {', '.join(linear)} (or give all-linear)")


def top_layers(model: torch.nn.Module, count: int) -> list[int] | None:
    """Indices of the last `count` transformer layers (None: all). Nothing below the lowest adapted layer
    needs a gradient, so autograd stops there: a cheaper backward pass, not just fewer trainable weights.
    Measured on the demo's 96 pairs (SmolLM2-135M, 2 CPU cores): the top 10 of 30 layers trained in 63 s
    against 96 s for all 30, and at the same learning rate moved the policy far less (KL 0.02 against 0.27)."""
    if count <= 0:
        return None
    total = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ModpoError("[train].lora_layers needs the model config's num_hidden_layers, which this model lacks")
    if count > total:
        raise ModpoError(f"[train].lora_layers = {count}, but the model has {total} layers")
    return list(range(total - count, total))
