"""Numerics a GPU user depends on, made visible on the CPU: bfloat16 training with float32 master weights,
dropout off while training, the reference dtype checked, a KL estimate that is >= 0, and the distributed
forward. (Reward pooling and truncation: test_truncation.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import POLICY_TEMPLATE, cli, config, llama_config, make_tokenizer, ok, settings_toml, tiny_generate

from modpo_pipe import train as train_module
from modpo_pipe.config import ModelSettings, ScoreSettings, TrainSettings


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory) -> Path:
    """pairs.parquet from the tiny policy (6 prompts x 4 pairs), scored in float32 by it (scored.parquet)."""
    work = tmp_path_factory.mktemp("numerics")
    (work / "modpo.toml").write_text(settings_toml(
        model=ModelSettings(device="cpu", dtype="float32"),
        generate=tiny_generate(tiny, max_new_tokens=16, samples_per_prompt=8),
        score=ScoreSettings(rewards={"length": tiny.reward_fn}),
        train=TrainSettings(lr=1e-05, beta=0.1, warmup_ratio=0.0)))
    shutil.copy(tiny.prompts, work / "prompts.jsonl")
    ok(["generate", "prompts.jsonl", "--out", "pairs.parquet"], work)
    ok(["score", "pairs.parquet", "--out", "scored.parquet"], work)
    return work


def trainable(out: Path) -> dict[str, torch.Tensor]:
    """The float32 master weights of the resumable state (what the optimizer updated)."""
    from safetensors.torch import load_file

    return load_file(str(out / "state" / "trainable.safetensors"))


def initial(policy: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(policy / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_bf16_full_fine_tuning_makes_the_float32_update(env, tiny, tmp_path):
    """24 steps at lr 1e-5: in bfloat16 each AdamW step (~1e-5) is below half the spacing of a bfloat16 weight of
    magnitude 0.02 (6e-5), so updating bf16 weights in place leaves most of them where they were. With float32
    master weights and bfloat16 compute the update is the float32 one, up to bf16 noise in the gradients."""
    common = ["train", env / "scored.parquet", *config(env), "--epochs", 4, "--batch-size", 4]
    ok([*common, "--out", tmp_path / "fp32"])
    out = cli([*common, "--dtype", "bfloat16", "--out", tmp_path / "bf16"])
    assert out.exit_code == 0, out.output
    # item 6: scored in float32, trained in bfloat16: said loudly, naming both
    assert "dtype mismatch" in out.output and "float32" in out.output and "bfloat16" in out.output
    start = initial(tiny.policy)
    a, b = trainable(tmp_path / "fp32"), trainable(tmp_path / "bf16")
    da = torch.cat([(a[k] - start[k]).flatten() for k in sorted(a)])
    db = torch.cat([(b[k] - start[k]).flatten() for k in sorted(a)])
    cosine = torch.nn.functional.cosine_similarity(da, db, dim=0).item()
    ratio = (db.norm() / da.norm()).item()
    print(f"\nbf16 vs fp32 full fine-tuning, 24 steps at lr 1e-5: cosine {cosine:.4f}, norm ratio {ratio:.4f}")
    assert cosine > 0.95 and 0.8 <= ratio <= 1.25
    assert all(v.dtype == torch.float32 for v in b.values())  # master weights, and so the state, are float32
    # The saved policy keeps the dtype asked for.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (not a dict)
    assert json.loads((tmp_path / "bf16" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(m["kl_k2"] >= 0 for m in metrics(tmp_path / "bf16"))


def test_float16_training_is_refused_in_one_line(env, tmp_path):
    result = cli(["train", env / "scored.parquet", *config(env), "--dtype", "float16", "--out", tmp_path / "x"])
    assert result.exit_code == 1
    assert result.output.count("error: ") == 1 and "float16 needs loss scaling" in result.output


def test_a_lora_merge_is_computed_in_float32(tiny):
    """A bfloat16 base plus a small float32 update: the merged weight is round(W + dW), not W + round(dW)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modpo_pipe.models import merge_lora

    def adapted():
        model = AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.bfloat16)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        torch.manual_seed(0)
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.data = torch.randn_like(p, dtype=torch.float32) * 3e-3  # a delta of ~1e-5 * alpha / r
        return peft

    peft = adapted()
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    exact = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
    merged = merge_lora(peft).model.layers[0].self_attn.q_proj.weight
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, exact.to(torch.bfloat16))  # one rounding, of the float32 sum


def dropout_policy(tiny, root: Path, kind: str) -> Path:
    """The tiny policy's weights in a model whose config has dropout 0.1 (same tokenizer, same ids)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Starcoder2Config, Starcoder2ForCausalLM

    tokenizer = make_tokenizer(POLICY_TEMPLATE)
    path = root / kind
    torch.manual_seed(0)
    if kind == "gpt2":  # nn.Dropout modules: embeddings, attention, residual
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2,
                                           n_head=2, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                           bos_token_id=None))
    elif kind == "starcoder2":  # rates kept as plain numbers, passed to F.dropout: residual and embedding
        model = Starcoder2ForCausalLM(Starcoder2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, residual_dropout=0.1,
            embedding_dropout=0.1, attention_dropout=0.1, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    else:  # Llama: a dropout rate passed to the attention kernel, not a module
        model = LlamaForCausalLM(llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                              attention_dropout=0.1))
        model.load_state_dict(LlamaForCausalLM.from_pretrained(tiny.policy).state_dict())
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,lora", [("llama", 0), ("gpt2", 0), ("starcoder2", 0), ("llama-lora", 8)])
def test_dropout_is_off_while_training(env, tiny, tmp_path, kind, lora):
    """The policy is the reference and its config has dropout 0.1 (or lora_dropout 0.1): the first batch's
    log-probs must equal the cached ref_logp (eval mode) up to float noise."""
    policy = dropout_policy(tiny, tmp_path, kind.removesuffix("-lora"))
    scored = tmp_path / "scored.parquet"
    ok(["score", env / "pairs.parquet", *config(env), "--ref", policy, "--out", scored])
    extra = ["--lora-r", lora, "--lora-dropout", 0.1] if lora else []
    ok(["train", scored, *config(env), "--policy", policy, "--batch-size", 32, *extra, "--out", tmp_path / "out"])
    gap = metrics(tmp_path / "out")[0]["first_batch_ref_gap"]
    print(f"\n{kind}: first-batch gap to the cached ref_logp with dropout 0.1 in the config: {gap:.3g}")
    assert gap < 1e-4
    info = json.loads((tmp_path / "out" / "final" / "modpo_pipe.json").read_text())
    assert info["dropout_disabled"] > 0


def test_reference_gap_tolerance_depends_on_the_dtype(capsys):
    ref, tokens = torch.zeros(4), torch.tensor([16, 16, 16, 4])
    gaps = torch.tensor([0.01, 0.01, 0.01, 0.02])
    assert train_module.check_reference_gap(ref + gaps, ref, tokens, torch.float32) == pytest.approx((0.02, 0.01))
    assert "tolerance 0.0001 in float32" in capsys.readouterr().err
    train_module.check_reference_gap(ref + gaps, ref, tokens, torch.bfloat16)
    assert capsys.readouterr().err == ""


def test_kl_estimate_is_nonnegative_and_close_to_the_exact_kl_near_the_reference():
    """Responses drawn from pi_ref over 5 one-token replies, pi a small step away: k2 is >= 0 for every sample and
    within 10% of the exact KL(pi_ref || pi), while the mean log-ratio (the former kl_proxy) is its negative."""
    from modpo_pipe.losses import kl_k2

    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(5), 0)
    pol = torch.log_softmax(ref + 0.2 * torch.randn(5), 0)
    exact = (ref.exp() * (ref - pol)).sum().item()
    draws = torch.multinomial(ref.exp(), 200_000, replacement=True)
    ratio = pol[draws] - ref[draws]
    assert kl_k2(ratio) == pytest.approx(exact, rel=0.1)
    assert ratio.mean().item() == pytest.approx(-exact, rel=0.05) and ratio.mean().item() < 0
    assert all(kl_k2(r) >= 0 for r in ratio[:100].split(1))


@pytest.mark.parametrize("lora", [0, 8])
def test_bf16_first_batch_gap_is_within_its_tolerance(env, tiny, tmp_path, lora):
    """Scored and trained in bfloat16: the reference scored with bfloat16 weights, the policy trained as float32
    masters under bfloat16 autocast (full) or a bfloat16 base with float32 adapters (LoRA). The gap this leaves
    at step 0 is what REF_GAP_TOLERANCE[bfloat16] was set from."""
    scored = tmp_path / "scored-bf16.parquet"
    ok(["score", env / "pairs.parquet", *config(env), "--dtype", "bfloat16", "--out", scored])
    extra = ["--lora-r", lora] if lora else []
    out = cli(["train", scored, *config(env), "--dtype", "bfloat16", "--batch-size", 32, *extra,
               "--out", tmp_path / "out"])
    assert out.exit_code == 0, out.output
    assert "dtype mismatch" not in out.output, out.output
    first = metrics(tmp_path / "out")[0]
    gap, per_token = first["first_batch_ref_gap"], first["first_batch_ref_gap_scaled"]
    print(f"\nbf16 {'LoRA' if lora else 'full'}: first-batch gap {gap:.3g}, {per_token:.3g} per sqrt(token) "
          f"(tolerance {train_module.REF_GAP_TOLERANCE[torch.bfloat16]})")
    assert per_token <= train_module.REF_GAP_TOLERANCE[torch.bfloat16] and "WARNING" not in out.output


def test_a_distributed_model_runs_its_own_forward(tiny):
    """wrapped=True: the log-probs come from the wrapper's forward (where FSDP gathers weights and DDP and
    DeepSpeed keep their books), never from the inner decoder and lm_head called directly, and they equal the
    packed single-process path's."""
    from transformers import AutoModelForCausalLM

    from modpo_pipe.logprobs import build_batch, sequence_logps

    class Wrapper(torch.nn.Module):  # what DDP and DeepSpeed look like: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    model = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    batch = build_batch([[5, 6, 7], [5, 6, 7], [8]], [[9, 10], [11], [12, 13, 14]], pad_id=1)
    wrapped = Wrapper(model)
    with torch.no_grad():
        through = sequence_logps(wrapped, batch, wrapped=True)
        direct = sequence_logps(model, batch)
    assert wrapped.calls == 1
    torch.testing.assert_close(through, direct, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_like_one(env, tmp_path):
    """FSDP2 (gloo, 2 CPU processes, accelerate's launcher): the same steps and weights as one process with the
    same global batch, and the full policy gathered into OUT/final."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("""compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
rdzv_backend: static
same_network: true
main_training_function: main
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
""")
    common = ["train", str(env / "scored.parquet"), *map(str, config(env)), "--lr", "0.0005"]
    ok([*common, "--batch-size", 8, "--out", tmp_path / "one"])
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp),
                             "-m", "modpo_pipe", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes: 2" in result.stderr
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-5)
    wa = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    gap = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"\nFSDP on 2 CPU processes vs 1 process, same global batch: max |weight gap| {gap:.3g}")
    assert sorted(wa) == sorted(wb) and gap < 1e-4


def test_disable_dropout_zeroes_every_rate_a_module_keeps_as_a_number():
    """Modules that pass their rate to F.dropout themselves keep it as a float: StarCoder2's residual_dropout
    and embedding_dropout, DBRX's resid_pdrop stayed on while training. Other numbers are left alone."""
    from modpo_pipe.train import disable_dropout

    block = torch.nn.Module()
    block.residual_dropout, block.resid_pdrop, block.attention_dropout = 0.1, 0.2, 0.0
    block.eps, block.use_dropout = 1e-5, True
    block.drop = torch.nn.Dropout(0.3)
    assert disable_dropout(block) == 3
    assert (block.residual_dropout, block.resid_pdrop, block.attention_dropout, block.drop.p) == (0, 0, 0, 0)
    assert block.eps == 1e-5 and block.use_dropout is True
