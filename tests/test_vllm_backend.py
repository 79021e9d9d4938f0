"""vLLM backend: sampling from token-id prompts, finish reasons, seeds and raw log-probs.

Builds a tiny random-init Llama (head_dim 64, which vLLM's CPU attention supports) with a byte-level BPE
tokenizer made on the spot, so nothing is downloaded. The engine starts once for the module (about 30 s on
2 CPU cores); the LoRA test starts a second, LoRA-enabled one.
"""

from __future__ import annotations

import os

import pytest

from modpo_pipe.generate import vllm as backend

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # one engine start: ~30 s

backend._set_cpu_env()  # before vLLM is imported: KV cache size and cache dir on CPU
pytest.importorskip("vllm")

torch = pytest.importorskip("torch")

EOS_ID = 1
MAX_NEW = 16
N = 4
ENGINE = dict(
    dtype="auto",
    max_model_len=128,
    gpu_memory_utilization=0.3,
    tensor_parallel_size=1,
    enforce_eager=True,
    trust_remote_code=False,
)
SAMPLING = dict(temperature=0.8, top_p=0.9, max_new_tokens=MAX_NEW)


def _build_tiny_model(out: str) -> int:
    """Save a tiny Llama + tokenizer to ``out``; returns the vocabulary size.

    Dimension 0 of every embedding is a constant that only the EOS row of lm_head reads, which gives EOS an
    almost constant logit bump, so a good share of the samples end on EOS within MAX_NEW tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["hello world, this is a tiny corpus for a tiny tokenizer."] * 20
    corpus += ["the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    hf_tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert hf_tok.eos_token_id == EOS_ID
    cfg = LlamaConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256,
        num_hidden_layers=2, vocab_size=len(hf_tok), max_position_embeddings=512,
        pad_token_id=hf_tok.pad_token_id, eos_token_id=EOS_ID, bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peakier than the 0.02 init, so samples are not uniform noise
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[EOS_ID, 0] = 0.5
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    return len(hf_tok)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 11, 7, 19, 5]
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logps(model_dir: str, prompts: list[list[int]], samples) -> list[list[float]]:
    """Summed fp32 log-softmax of each sample's ids given its prompt, from a transformers forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, group in zip(prompts, samples):
            row = []
            for s in group:
                ids = torch.tensor([prompt + s.ids])
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
                pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(s.ids))
                row.append(logp[pos, torch.tensor(s.ids)].sum().item())
            out.append(row)
    return out


@pytest.fixture(scope="module")
def vmodel(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vllm-tiny-llama"))
    vocab = _build_tiny_model(path)
    yield path, vocab
    backend.shutdown_vllm()


@pytest.fixture(scope="module")
def first_run(vmodel):
    path, vocab = vmodel
    prompts = _prompts(vocab)
    return prompts, backend.sample_vllm(path, prompts, N, seed=7, **SAMPLING, **ENGINE)


def test_shapes_ids_and_finish_reasons(vmodel, first_run):
    _, vocab = vmodel
    prompts, samples = first_run
    assert len(samples) == len(prompts)
    reasons = []
    for group in samples:
        assert len(group) == N
        for s in group:
            assert isinstance(s.ids, list) and s.ids, "empty response"
            assert all(type(t) is int and 0 <= t < vocab for t in s.ids)
            assert len(s.ids) <= MAX_NEW
            assert s.finish_reason in ("stop", "length")
            assert EOS_ID not in s.ids[:-1], "EOS before the end"
            if s.finish_reason == "stop":
                assert s.ids[-1] == EOS_ID, "stopped without the EOS in ids"
            else:
                assert len(s.ids) == MAX_NEW and s.ids[-1] != EOS_ID
            assert isinstance(s.logp, float) and s.logp < 0
            reasons.append(s.finish_reason)
    # the EOS-biased tiny model ends some samples on EOS and runs others to the limit
    assert "stop" in reasons and "length" in reasons


def test_raw_logp_matches_transformers_fp32(vmodel, first_run):
    path, _ = vmodel
    prompts, samples = first_run
    ref = _hf_logps(path, prompts, samples)
    gap = max(abs(s.logp - r) for group, rgroup in zip(samples, ref) for s, r in zip(group, rgroup))
    print(f"max |vLLM logp - transformers fp32 logp| = {gap:.2e}")
    # processed (temperature 0.8 / top-p 0.9) log-probs would be off by whole nats
    assert gap < 1e-3


def test_same_seed_same_output_and_batch_independent(vmodel, first_run):
    path, _ = vmodel
    prompts, samples = first_run
    again = backend.sample_vllm(path, prompts, N, seed=7, **SAMPLING, **ENGINE)
    assert [[s.ids for s in g] for g in again] == [[s.ids for s in g] for g in samples]
    # a prompt's samples depend on (seed, its index), not on the other prompts in the batch
    head = backend.sample_vllm(path, prompts[:2], N, seed=7, **SAMPLING, **ENGINE)
    assert [[s.ids for s in g] for g in head] == [[s.ids for s in g] for g in samples[:2]]
    other = backend.sample_vllm(path, prompts, N, seed=8, **SAMPLING, **ENGINE)
    assert [[s.ids for s in g] for g in other] != [[s.ids for s in g] for g in samples]
    # the n samples of one prompt differ from each other
    assert len({tuple(s.ids) for s in samples[0]}) > 1


def test_cheap_checks(vmodel):
    path, _ = vmodel
    assert backend.vllm_available()
    assert backend.prompt_seed(7, 0) == backend.prompt_seed(7, 0) != backend.prompt_seed(7, 1)
    if backend._on_cpu():
        assert backend._resolve_dtype("auto") == "float32"
        assert os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    with pytest.raises(ValueError, match="max_model_len"):
        backend.sample_vllm(path, [[5] * 128], 1, seed=0, **SAMPLING, **ENGINE)
    assert backend.sample_vllm(path, [], 2, seed=0, **SAMPLING, **ENGINE) == []
    # max_model_len=0: "longest prompt + max_new_tokens"; the running engine (128) is long enough and is reused
    engine = backend._ENGINE
    out = backend.sample_vllm(path, [[5, 6, 7]], 1, seed=0, **SAMPLING, **{**ENGINE, "max_model_len": 0})
    assert backend._ENGINE is engine and len(out) == 1 and len(out[0]) == 1


def test_lora_adapter_logp_matches_merged_model(vmodel, tmp_path_factory):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    path, vocab = vmodel
    adapter = str(tmp_path_factory.mktemp("lora"))
    merged = str(tmp_path_factory.mktemp("merged"))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(base, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B is zero at init: make the adapter actually change the model
    model.save_pretrained(adapter)
    model.merge_and_unload().save_pretrained(merged, safe_serialization=True)

    prompts = _prompts(vocab)[:3]
    samples = backend.sample_vllm(path, prompts, 2, seed=11, lora_path=adapter, **SAMPLING, **ENGINE)
    ref = _hf_logps(merged, prompts, samples)
    gap = max(abs(s.logp - r) for group, rgroup in zip(samples, ref) for s, r in zip(group, rgroup))
    print(f"LoRA: max |vLLM logp - merged transformers fp32 logp| = {gap:.2e}")
    assert gap < 1e-3
    # an adapter directory passed as the model samples as base + adapter on the same engine
    engine = backend._ENGINE
    as_model = backend.sample_vllm(adapter, prompts, 2, seed=11, **SAMPLING, **ENGINE)
    assert backend._ENGINE is engine
    assert [[s.ids for s in g] for g in as_model] == [[s.ids for s in g] for g in samples]
    # the same (LoRA-enabled) engine still serves the base model
    base_samples = backend.sample_vllm(path, prompts, 2, seed=11, **SAMPLING, **ENGINE)
    assert backend._ENGINE is engine
    base_ref = _hf_logps(path, prompts, base_samples)
    assert max(abs(s.logp - r) for g, rg in zip(base_samples, base_ref) for s, r in zip(g, rg)) < 1e-3


def test_generate_score_train_through_the_cli_with_vllm(tiny, tmp_path):
    """The vLLM path end to end: the same pairs.parquet contract, ids that decode to the stored text, raw
    log-probs that match transformers in fp32, and score and train accept the file."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from modpo_pipe import schema
    from modpo_pipe.cli import app

    runner = CliRunner()
    config = tmp_path / "modpo.toml"
    result = runner.invoke(app, ["init", str(config), "--policy", str(tiny.policy), "--reward",
                                 f"rm={tiny.reward}", "--reward", f"length={tiny.reward_fn}"])
    assert result.exit_code == 0, result.output
    common = ["--config", str(config)]
    steps = [
        ["generate", str(tiny.prompts), *common, "--backend", "vllm", "--max-new-tokens", "12",
         "--vllm-gpu-memory-utilization", "0.3"],
        ["score", str(tmp_path / "pairs.parquet"), *common],
        ["train", str(tmp_path / "scored.parquet"), *common, "--lr", "1e-3"],
    ]
    for args in steps:
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)

    table, meta = schema.read_table(tmp_path / "pairs.parquet", "pairs")
    assert meta["sampling"]["backend"] == "vllm"
    assert pq.read_schema(tmp_path / "pairs.parquet").names == [n for n, _ in schema.GROUP_COLUMNS]
    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    model = AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for row in table.to_pylist():
            for j in range(len(row["response_ids"])):
                ids = row["response_ids"][j]
                assert row["responses"][j] == tokenizer.decode(ids, skip_special_tokens=True)
                full = torch.tensor([row["prompt_ids"] + ids])
                logp = torch.log_softmax(model(full).logits[0].double(), -1)
                n = len(row["prompt_ids"])
                expected = sum(logp[t - 1, full[0, t]].item() for t in range(n, full.shape[1]))
                worst = max(worst, abs(expected - row["gen_logps"][j]))
    print(f"vLLM fp32 gen_logp vs transformers: max abs gap {worst:.2e}")
    assert worst < 1e-3
    assert (tmp_path / "checkpoints" / "final" / "model.safetensors").is_file()


def test_intermediate_temperature_and_top_p_sample_the_tempered_nucleus(vmodel):
    """The same frequency check as the transformers backend's (tests/test_sampler.py): one-token draws at
    T = 0.7, top-p = 0.8 follow softmax(logits / T) restricted to the nucleus and renormalised."""
    from test_sampler import assert_draws_follow, nucleus_distribution
    from transformers import AutoModelForCausalLM

    path, vocab = vmodel
    prompt = _prompts(vocab)[1]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    expected = nucleus_distribution(logits, 0.7, 0.8)
    assert 2 <= int((expected > 0).sum()) <= 20
    assert (nucleus_distribution(logits, 1.0, 0.8) > 0).sum() > (expected > 0).sum()  # T matters here
    samples = backend.sample_vllm(path, [prompt], 2000, seed=5, temperature=0.7, top_p=0.8, max_new_tokens=1,
                                  **ENGINE)
    assert_draws_follow([s.ids[0] for s in samples[0]], expected)
