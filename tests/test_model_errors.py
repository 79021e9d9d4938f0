"""Model directories: safetensors only (adapters too), a causal-LM head in the weights, a base an adapter names,
LoRA targets that exist, a device the machine has and memory it lacks: each a one-line refusal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import config, fails, modpo_pipe, ok

from modpo_pipe.errors import ModpoError


@pytest.fixture(scope="module")
def env(failures_env: Path) -> Path:
    """conftest.failures_env: modpo.toml, reward callables (rewards.py), prompts, pairs and scored (one epoch)."""
    return failures_env


# ----------------------------------------------------------------------------- safetensors only, adapters too


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter") / "lora"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny.policy),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(path)
    return path


def _pickled_adapter(adapter: Path, tmp_path: Path, keep_safetensors: bool) -> Path:
    from safetensors.torch import load_file

    path = tmp_path / "adapter"
    shutil.copytree(adapter, path)
    weights = load_file(str(path / "adapter_model.safetensors"))
    torch.save(weights, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    if keep_safetensors:  # any unrelated safetensors file beside it
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path / "unrelated.safetensors"))
    return path


@pytest.mark.parametrize(("keep_safetensors", "fragment"), [
    (True, "holds pickle weights (adapter_model.bin), which can run code when loaded"),
    (False, "holds only pickle weights (adapter_model.bin), which can run code when loaded"),
])
def test_an_adapter_with_pickle_weights_is_refused(env, adapter, tmp_path, monkeypatch, keep_safetensors, fragment):
    path = _pickled_adapter(adapter, tmp_path, keep_safetensors)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    fails(["generate", env / "prompts.jsonl", *config(env), "--policy", path, "--out", tmp_path / "p.parquet"],
          f"[generate].policy: {path} {fragment}")
    fails(["train", env / "scored.parquet", *config(env), "--policy", path, "--out", tmp_path / "ckpt"], fragment)


def test_an_adapter_needs_adapter_model_safetensors(env, adapter, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(adapter, path)
    (path / "adapter_model.safetensors").rename(path / "weights.safetensors")
    fails(["train", env / "scored.parquet", *config(env), "--policy", path, "--out", tmp_path / "ckpt"],
          f"[train].policy: {path} is an adapter directory without adapter_model.safetensors")


def test_an_adapter_policy_trains_whole_and_a_new_adapter_on_it_is_refused(env, adapter, tmp_path):
    """Full fine-tuning of an adapter policy was a traceback (peft left every merged weight frozen: "optimizer got
    an empty parameter list"); a LoRA on it saved final/ against the bare base, silently without the policy's
    own adapter."""
    from safetensors.torch import load_file

    from modpo_pipe import models

    out = tmp_path / "whole"
    ok(["train", env / "scored.parquet", *config(env), "--policy", adapter, "--lora-r", 0, "--out", out])
    start = models.load_causal_lm(str(adapter), dtype=torch.float32, device=None).state_dict()
    trained = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(trained[name], start[name]) for name in trained if name in start)
    fails(["train", env / "scored.parquet", *config(env), "--policy", adapter, "--lora-r", 2, "--no-merge", "--out",
           tmp_path / "lora"], f"[train].policy {adapter} is a LoRA adapter")
    # merged/ holds the policy's adapter and the new one (how rounds train an adapter policy with LoRA)
    ok(["train", env / "scored.parquet", *config(env), "--policy", adapter, "--lora-r", 2, "--merge", "--out",
        tmp_path / "merged"])
    merged = load_file(str(tmp_path / "merged" / "merged" / "model.safetensors"))
    assert any(not torch.equal(merged[name], start[name]) for name in merged if name in start)


def test_a_model_directory_with_any_pickle_is_refused(env, tiny, tmp_path, monkeypatch):
    policy = tmp_path / "policy"
    shutil.copytree(tiny.policy, policy)
    torch.save({"anything": torch.zeros(1)}, policy / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    fails(["generate", env / "prompts.jsonl", *config(env), "--policy", policy, "--out", tmp_path / "p.parquet"],
          f"[generate].policy: {policy} holds pickle weights (pytorch_model.bin)")


def test_an_adapter_with_safetensors_still_loads(env, adapter):
    assert (adapter / "adapter_model.safetensors").is_file()  # peft's own format
    from modpo_pipe import models

    model = models.load_causal_lm(str(adapter), dtype=torch.float32, device=torch.device("cpu"))
    assert not hasattr(model, "peft_config")  # merged into its base


def test_an_adapter_whose_base_cannot_load_names_its_base(env, adapter, tmp_path):
    """The error named the adapter directory and transformers' message about '../base/policy' or the Hub,
    not that the value came from the adapter's base_model_name_or_path."""
    path = tmp_path / "adapter"
    shutil.copytree(adapter, path)
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    for base in ("../base/policy", "nobody-here/no-such-model"):
        (path / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": base}))
        line = fails(["generate", env / "prompts.jsonl", *config(env), "--policy", path, "--out",
                      tmp_path / "p.parquet"], "[generate].policy")
        assert f"base model of adapter {path}" in line or "base_model_name_or_path" in line, line
        assert base in line, line


# ------------------------------------------------------------------------------ a causal-LM head in the weights


@pytest.fixture(scope="module")
def classifier(tiny, tmp_path_factory) -> Path:
    """A sequence classifier with the policy's own tokenizer: only its missing head tells it apart."""
    from conftest import llama_config
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("classifier") / "rm"
    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    LlamaForSequenceClassification(llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                                num_labels=1)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_a_sequence_classifier_is_refused_as_policy_or_reference(env, classifier, tmp_path):
    fragment = (f"{classifier} has no causal-LM head in its weights (lm_head.weight missing; it was saved as "
                "LlamaForSequenceClassification)")
    fails(["train", env / "scored.parquet", *config(env), "--policy", classifier, "--out", tmp_path / "ckpt"],
          f"[train].policy: {fragment}")
    assert not (tmp_path / "ckpt" / "final").exists()
    fails(["score", env / "pairs.parquet", *config(env), "--ref", classifier, "--out", tmp_path / "s.parquet"],
          f"[score].ref: {fragment}")
    fails(["generate", env / "prompts.jsonl", *config(env), "--policy", classifier, "--out", tmp_path / "p.parquet"],
          f"[generate].policy: {fragment}")


@pytest.mark.slow
def test_a_classifier_given_as_the_policy_is_refused_without_the_load_report(faults_env, tiny, tmp_path):
    """The refusal came after transformers' multi-line LOAD REPORT table."""
    done = modpo_pipe(["generate", faults_env / "prompts.jsonl", *config(faults_env), "--policy", tiny.reward,
                       "--out", tmp_path / "pairs.parquet"], tmp_path)
    assert done.returncode == 1
    assert "has no causal-LM head in its weights" in done.stderr
    assert "LOAD REPORT" not in done.stderr and "MISSING" not in done.stderr, done.stderr


def test_held_transformers_logs_are_shown_after_a_load_that_succeeds():
    import logging

    from modpo_pipe.models import held_logs

    shown: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            shown.append(record.getMessage())

    root = logging.getLogger("transformers")
    collect = Collect()
    root.addHandler(collect)
    try:
        with held_logs():
            logging.getLogger("transformers.modeling_utils").warning("a report")
            assert shown == []  # held while the load runs
        assert shown == ["a report"]
        with pytest.raises(RuntimeError), held_logs():
            logging.getLogger("transformers.modeling_utils").warning("the report of a refused load")
            raise RuntimeError("refused")
        assert shown == ["a report"]
    finally:
        root.removeHandler(collect)


def test_a_head_tied_to_the_embeddings_is_legitimate(tiny, tmp_path):
    from conftest import llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    from modpo_pipe import models

    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    cfg = llama_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    cfg.tie_word_embeddings = True
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied", safe_serialization=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        stored = list(f.keys())
    assert "lm_head.weight" not in stored  # the head is the embedding matrix: stored once
    model = models.load_causal_lm(str(tmp_path / "tied"), dtype=torch.float32, device=torch.device("cpu"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_missing_policy_path_with_slashes_is_no_such_directory(faults_env, tmp_path):
    """A local path such as q/a/b that does not exist got the Hub's "Repo id must be in the form ..."."""
    line = fails(["generate", faults_env / "prompts.jsonl", *config(faults_env), "--policy", "q/a/b",
                  "--out", tmp_path / "pairs.parquet"], "q/a/b: no such model directory")
    assert "Repo id" not in line


@pytest.mark.parametrize("targets,fragment", [
    ("q_proj,v_prj", "[train].lora_targets ['v_prj'] match no layer LoRA can adapt in the policy; its linear "
                     "layers are "),
    ("nosuch", "[train].lora_targets ['nosuch'] match no layer"),
    ("q_proj,mlp", "[train].lora_targets ['mlp'] match no layer"),  # a block: peft's ValueError traceback
    (",", "[train].lora_targets is empty"),
])
def test_lora_targets_that_match_nothing_are_refused(env, tmp_path, targets, fragment):
    """A misspelt target was skipped without a word when another matched (an adapter on q_proj alone, exit 0);
    none matching ended in peft's traceback after the model had loaded."""
    fails(["train", env / "scored.parquet", *config(env), "--lora-r", 4, "--lora-targets", targets,
           "--out", tmp_path / "ckpt"], fragment)
    assert not (tmp_path / "ckpt" / "final").exists()


# ------------------------------------------------------------------------------------- devices and memory


@pytest.mark.parametrize(("stage", "module", "function", "setting"), [
    ("generate", "modpo_pipe.generate.hf", "sample_rows", "lower [generate].batch_size"),
    ("score", "modpo_pipe.score", "batched_sequence_logps", "lower [score].batch_tokens"),
    ("train", "modpo_pipe.train", "sequence_logps", "lower [train].micro_batch_tokens"),
    ("eval", "modpo_pipe.generate.hf", "sample_rows", "lower [generate].batch_size"),
])
def test_out_of_device_memory_is_one_line_naming_the_setting_to_lower(env, tmp_path, monkeypatch, stage, module,
                                                                      function, setting):
    """A GPU out of memory (torch.OutOfMemoryError) was a traceback deep in torch, naming no setting."""
    import importlib

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.19 GiB total)\nmore")

    monkeypatch.setattr(importlib.import_module(module), function, out_of_memory)
    source = {"generate": env / "prompts.jsonl", "score": env / "pairs.parquet", "train": env / "scored.parquet",
              "eval": env / "prompts.jsonl"}
    line = fails([stage, source[stage], *config(env), "--out", tmp_path / "out.json"],
                 f"{stage}: out of device memory")
    assert "Tried to allocate 2.00 GiB" in line and setting in line and "more" not in line


def test_a_long_cuda_out_of_memory_message_is_cut_at_a_sentence():
    """CUDA's real message (seen on an H200) runs on for 400 characters; the line keeps whole sentences."""
    from modpo_pipe.errors import out_of_memory

    cuda = ("CUDA out of memory. Tried to allocate 382.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which "
            "139.29 GiB is free. Including non-PyTorch memory, this process has 520.00 MiB memory in use. Of the "
            "allocated memory 0 bytes is allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated.")
    with pytest.raises(ModpoError) as raised, out_of_memory("train", "[train].batch_size"):
        raise torch.OutOfMemoryError(cuda)
    assert str(raised.value) == ("train: out of device memory (CUDA out of memory. Tried to allocate 382.00 MiB. GPU "
                                 "0 has a total capacity of 139.80 GiB of which 139.29 GiB is free. Including "
                                 "non-PyTorch memory, this process has 520.00 MiB memory in use.); lower "
                                 "[train].batch_size, then rerun: finished work is kept")


@pytest.mark.parametrize(("device", "fragment"), [
    ("mps", "[model].device is 'mps' but this torch build or machine has no mps device"),
    ("meta", "[model].device: 'meta' holds no data"),
    ("vulkan", "has no vulkan device"),
])
@pytest.mark.parametrize("command", ["generate", "train"])
def test_a_device_this_machine_lacks_is_one_line(env, tmp_path, device, fragment, command):
    """Any device name torch can parse got through: the first tensor on it raised a RuntimeError traceback."""
    inputs = env / ("prompts.jsonl" if command == "generate" else "scored.parquet")
    fails([command, inputs, *config(env), "--device", device, "--out", tmp_path / "out"], fragment)
