"""Every failure loud, every error one line (issue 18): what a hostile but realistic user tried, each case
through the command a user runs. A failure exits non-zero with one `error:` line naming the file, row,
reward or setting; nothing half-done is kept, and a rerun of a finished stage costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cli, config, fails, ok, one_round_run, scored_env, write_unchecked

from modpo_pipe import parts, schema
from modpo_pipe.errors import ModpoError
from modpo_pipe.rewards import CallableReward, RewardInput

MAX_NEW_TOKENS = 6

REWARD_FNS = '''
import sys

import numpy as np

def length(prompts, responses):
    return [len(r) / 10.0 for r in responses]

def exits_0(prompts, responses):
    sys.exit(0)

def exits_bare(prompts, responses):
    sys.exit()

def exits_text(prompts, responses):
    raise SystemExit("bye")

class Stop(BaseException):
    pass

def base_exception(prompts, responses):
    raise Stop("not an Exception")

def huge(prompts, responses):
    return [1e300 if "France" in p else len(r) / 10.0 for p, r in zip(prompts, responses)]

def as_dict(prompts, responses):
    return {f"k{i}": 1.0 for i in range(len(responses))}
'''



@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory):
    """A directory with a modpo.toml, reward callables, 6 prompts, pairs.parquet and scored.parquet (6 groups of 4
    responses, one group a step)."""
    work = tmp_path_factory.mktemp("failures")
    return scored_env(work, tiny, REWARD_FNS, MAX_NEW_TOKENS, epochs=1)


def _score(env: Path, out: Path, fn: str, *flags) -> list:
    return ["score", env / "pairs.parquet", *config(env), "--out", out, "--reward-batch-size", 64,
            "--reward", f"bad=py:{env / 'rewards.py'}:{fn}", "--reward", f"length=py:{env / 'rewards.py'}:length",
            *flags]


# ------------------------------------------------------------------ 1. a reward that exits is a failure


@pytest.mark.parametrize(("fn", "raised"), [
    ("exits_0", "raised SystemExit: 0"),
    ("exits_bare", "raised SystemExit"),
    ("exits_text", "raised SystemExit: bye"),
    ("base_exception", "raised Stop: not an Exception"),
])
def test_a_reward_that_exits_fails_score_with_one_line(env, tmp_path, fn, raised):
    out = tmp_path / "scored.parquet"
    line = fails(_score(env, out, fn), raised)
    assert line.startswith(f"error: reward 'bad' (py:{env / 'rewards.py'}:{fn}) raised")
    assert not out.exists()


def test_a_reward_module_that_exits_on_import_fails_with_one_line(env, tmp_path):
    module = tmp_path / "exiting.py"
    module.write_text("import sys\nsys.exit(0)\n\ndef fn(prompts, responses):\n    return [0.0] * len(responses)\n")
    fails(["score", env / "pairs.parquet", *config(env), "--out", tmp_path / "s.parquet",
           "--reward", f"bad=py:{module}:fn"], f"reward 'bad': cannot import {module}: SystemExit: 0")


def test_run_exits_1_on_every_firing_while_a_reward_exits_and_status_says_so(env, tiny, tmp_path):
    run_dir = one_round_run(tmp_path / "run", tiny, "bad", f"py:{env / 'rewards.py'}:exits_0")
    for _ in range(2):  # every firing, not only the first
        fails(["run", "--workdir", run_dir], f"reward 'bad' (py:{env / 'rewards.py'}:exits_0) raised SystemExit: 0")
    report = json.loads(ok(["status", "--workdir", run_dir, "--json"]))
    by_stage = {row["stage"]: row for row in report["table"]}
    assert by_stage["generate"]["status"] == "done"
    assert by_stage["score"]["status"] == "failed"
    assert "reward 'bad'" in by_stage["score"]["reason"] and "SystemExit: 0" in by_stage["score"]["reason"]
    assert report["next"] == "round-000 score"


def test_run_turns_a_stage_that_exits_into_a_failure(env, tiny, tmp_path, monkeypatch):
    """Whatever calls sys.exit(0) inside a stage (a library, a plugin), `run` records a failure and exits 1."""
    import modpo_pipe.generate as generate

    def exits(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(generate, "run_generate", exits)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "modpo.toml").write_text(f"""
[generate]
policy = "{tiny.policy}"
[score.rewards]
length = "{tiny.reward_fn}"
[run]
rounds = 1
prompts = "{tiny.prompts}"
""")
    fails(["run", "--workdir", run_dir], "round-000 generate failed: SystemExit: 0")
    state = json.loads((run_dir / "state.json").read_text())
    assert state["rounds"]["0"]["generate"]["status"] == "failed"


# ------------------------------------------------------------------------- 2. tracebacks become one line


def test_safetensors_disk_full_while_saving_the_state_keeps_the_previous_one(env, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError, not OSError: the same one-line message, the previous
    state untouched, and a rerun resumes from it to the weights of an uninterrupted run."""
    import safetensors.torch
    from safetensors import SafetensorError

    full, out = tmp_path / "full", tmp_path / "ckpt"
    args = ["train", env / "scored.parquet", *config(env)]
    ok([*args, "--out", full])
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def fills_the_disk(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the first file of the second save (step 4)
            # what safetensors 0.8 raises on a full tmpfs (seen with a 64 KiB mount)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_the_disk)
    fails([*args, "--out", out],
          f"cannot save the training state of step 4 to {out / 'state'}: No space left on device (os error 28); "
          "the previous one is untouched. Free space and rerun the same command to resume")
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 2
    assert not (out / "state.tmp").exists() and not (out / "final").exists()
    monkeypatch.undo()
    output = ok([*args, "--out", out])
    assert "resumed from step: 2" in output
    from safetensors.torch import load_file

    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(full / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_safetensors_disk_full_while_saving_the_final_policy(env, tmp_path, monkeypatch):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def fills_the_disk(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "ckpt"
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fills_the_disk)
    fails(["train", env / "scored.parquet", *config(env), "--out", out],
          f"cannot save the trained policy to {out / 'final'}: No space left on device (os error 28); there was "
          "none before")
    assert not (out / "final").exists() and not (out / "final.tmp").exists()


def _make_read_only(path: Path) -> None:
    """Read-only for this process: chmod for a user; root ignores modes, so the immutable flag for root."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("running as root where the immutable flag is not supported: no way to make a directory "
                    "read-only here")


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_read_only_run_directory_fails_with_one_line_and_status_stays_true(env, tiny, tmp_path):
    run_dir = one_round_run(tmp_path / "run", tiny, "length", tiny.reward_fn)
    ok(["run", "--workdir", run_dir, "--max-stages", 1])
    before = (run_dir / "state.json").read_bytes()
    _make_read_only(run_dir)
    try:
        line = fails(["run", "--workdir", run_dir], "the run directory must be writable")
        assert str(run_dir) in line
        assert (run_dir / "state.json").read_bytes() == before  # nothing recorded that did not happen
        report = json.loads(ok(["status", "--workdir", run_dir, "--json"]))  # status reads a read-only run
        assert [row["status"] for row in report["table"]] == ["done", "pending", "pending"]
    finally:
        _make_writable(run_dir)
    ok(["run", "--workdir", run_dir, "--max-stages", 1])
    assert json.loads((run_dir / "state.json").read_text())["rounds"]["0"]["score"]["status"] == "done"


def _surrogate_prompts(path: Path, row: bytes) -> Path:
    path.write_bytes(b'{"id": "a", "prompt": "Why is the sky blue?"}\n' + row + b"\n"
                     + b'{"id": "b", "prompt": "Count from one to five."}\n')
    return path


@pytest.mark.parametrize("row", [
    rb'{"id": "x", "prompt": "\ud800"}',
    rb'{"id": "x", "prompt": "tail \udfff"}',
    rb'{"id": "x", "messages": [{"role": "user", "content": "\ud83d"}]}',
    rb'{"id": "\ud800", "prompt": "fine"}',
], ids=["lone-high", "lone-low", "in-messages", "in-id"])
def test_a_lone_surrogate_is_not_valid_unicode_and_skippable(env, tmp_path, row):
    prompts, out = _surrogate_prompts(tmp_path / "prompts.jsonl", row), tmp_path / "pairs.parquet"
    args = ["generate", prompts, *config(env), "--out", out, "--samples-per-prompt", 2]
    fails(args, f"{prompts}:2: not valid Unicode")
    assert not out.exists()
    ok([*args, "--skip-invalid"])
    table, meta = schema.read_table(out, "pairs")
    assert meta["counts"]["skipped_invalid"] == 1
    assert table.column("prompt_id").to_pylist() == ["a", "b"]


@pytest.mark.parametrize("grid", [1, 0, -2])
def test_sweep_refuses_a_grid_of_fewer_than_two_points(env, tmp_path, grid):
    out = tmp_path / "sweep"
    scored = tmp_path / "two.parquet"
    table, meta = schema.read_table(env / "scored.parquet", "scored")
    # a second reward: the grid spans two
    table = table.append_column("reward_other", table.column("reward_length"))
    order = [c for c in table.column_names if not c.startswith("ref_")] + ["ref_logps"]
    meta["rewards"]["other"] = meta["rewards"]["length"]
    schema.write_table(table.select(order), scored, meta)
    fails(["sweep", scored, *config(env), "--out", out, "--grid", grid], f"--grid must be >= 2 (the two ends of "
                                                                        f"the front); got {grid}")
    assert not out.exists()


def test_sweep_takes_no_weights_and_needs_two_rewards(env, tmp_path):
    """sweep took --weights and ignored it (it sets each policy's weights), and on a one-reward file it blamed a
    --vector nobody gave ("would both train into ...")."""
    out = tmp_path / "sweep"
    result = cli(["sweep", env / "scored.parquet", *config(env), "--weights", "length=1", "--out", out])
    assert result.exit_code == 2 and "No such option: --weights" in result.output, result.output
    fails(["sweep", env / "scored.parquet", *config(env), "--out", out],
          "holds one reward (length); a sweep trades rewards off, so it needs two or more")
    assert not out.exists()


FRONT_FILES = [
    ("an-object", {"x": 1}, "expected a non-empty list of policy summaries"),
    ("empty-list", [], "expected a non-empty list of policy summaries"),
    ("list-of-numbers", [1, 2], "summary 0: expected an object, got a number"),
    ("no-rewards", [{"label": "a", "is_reference": False}], "summary 0: 'rewards' is missing or null, expected dict"),
    ("bad-estimate", [{"label": "a", "is_reference": True, "rewards": {"r": 1.0}}],
     "summary 0: rewards.r must be an object with numbers 'mean' and 'sem'"),
]


@pytest.mark.parametrize(("case", "content", "fragment"), FRONT_FILES, ids=[c[0] for c in FRONT_FILES])
def test_front_refuses_an_eval_file_of_another_shape(tmp_path, case, content, fragment):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(content))
    line = fails(["front", path, "--out", tmp_path / "front"], fragment)
    assert str(path) in line
    assert not (tmp_path / "front.png").exists()


def test_front_names_the_summary_that_lacks_a_reward(tmp_path):
    def entry(label, rewards):
        return {"label": label, "policy": label, "is_reference": label == "reference", "weights": None,
                "samples": 1, "rewards": {r: {"mean": 0.5, "sem": 0.1} for r in rewards}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([entry("reference", ["x", "y"])]))
    b.write_text(json.dumps([entry("pol", ["x", "z"])]))
    fails(["front", a, b, "--out", tmp_path / "front"], "no reward 'y' in the summary of 'pol'")


# ------------------------------------------------------------------- 3. scores are checked as stored


def test_a_reward_beyond_float32_is_an_error_naming_the_pair_and_value(env, tmp_path):
    out = tmp_path / "scored.parquet"
    line = fails(_score(env, out, "huge"), "group 'r0/p0' response 1: score 1e+300 is beyond float32 (inf)")
    assert line.startswith("error: reward 'bad' (py:") and "earlier run" not in line
    assert not out.exists()
    # no part holds a value that is not finite as stored
    for part in parts.work_dir(out).glob("*.parquet"):
        table = pq.read_table(part)
        for col in table.column_names:
            values = table.column(col)
            if pa.types.is_list(values.type):
                values = pa.compute.list_flatten(values)
            assert all(np.isfinite(values.to_numpy())), (part, col)
    assert not list(parts.work_dir(out).glob("reward-bad-*.parquet"))


def test_a_reward_beyond_float32_is_dropped_and_counted_in_drop_mode(env, tmp_path):
    out = tmp_path / "scored.parquet"
    ok(_score(env, out, "huge", "--on-invalid-reward", "drop"))
    table, meta = schema.read_table(out, "scored")
    assert meta["score_counts"]["invalid_by_reward"] == {"bad": 4, "length": 0}  # every response of p0's group
    assert meta["score_counts"]["dropped_invalid_reward"] == 1  # so the group goes whole
    assert "r0/p0" not in table.column("group_id").to_pylist()
    assert np.isfinite(pa.compute.list_flatten(table.column("reward_bad")).to_numpy()).all()


def test_no_reference_part_with_a_non_finite_log_prob_is_kept(env, tmp_path, monkeypatch):
    import modpo_pipe.score as score

    real = score.batched_sequence_logps

    def infinite(*args, **kwargs):
        logps = real(*args, **kwargs)
        return [float("-inf")] + logps[1:]

    monkeypatch.setattr(score, "batched_sequence_logps", infinite)
    out = tmp_path / "scored.parquet"
    fails(["score", env / "pairs.parquet", *config(env), "--out", out, "--shard-size", 4],
          "group 'r0/p0' response 1: ref_logps is -inf as stored (float32)")
    assert not list(parts.work_dir(out).glob("ref-*.parquet"))  # the finished reward parts stay, no ref part


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


# --------------------------------------------------------------------- 4. safetensors only, adapters too


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("adapter") / "lora"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny.policy),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(path)
    assert (path / "adapter_model.safetensors").is_file()
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
    from modpo_pipe import models

    model = models.load_causal_lm(str(adapter), dtype=torch.float32, device=torch.device("cpu"))
    assert not hasattr(model, "peft_config")  # merged into its base


# ------------------------------------------------------------------- 5. a causal-LM head in the weights


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


# --------------------------------------------------------------- 6. a huge prompt line is bounded first


def test_a_huge_prompt_is_dropped_without_tokenising_it_whole(env, tmp_path, monkeypatch):
    from modpo_pipe import models

    seen: list[int] = []
    real_load = models.load_tokenizer

    def spying_load(*args, **kwargs):
        tokenizer = real_load(*args, **kwargs)
        real_call = type(tokenizer).__call__

        def spy(self, text, *a, **k):
            seen.append(max(len(t) for t in text) if isinstance(text, list) else len(text))
            return real_call(self, text, *a, **k)

        monkeypatch.setattr(type(tokenizer), "__call__", spy)
        return tokenizer

    monkeypatch.setattr(models, "load_tokenizer", spying_load)
    huge = "Tell me a story about a brave little robot. " * 50_000  # 2.2 MB on one line
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.parquet"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Why is the sky blue?"}) + "\n"
                       + json.dumps({"id": "huge", "prompt": huge}) + "\n")
    args = ["generate", prompts, *config(env), "--out", out, "--samples-per-prompt", 2]
    ok(args)
    assert schema.read_table(out, "pairs")[1]["counts"]["long_prompts_dropped"] == 1
    limit = 512 - MAX_NEW_TOKENS  # the tiny policy's context leaves this for a prompt
    assert max(seen) < 100 * limit < len(huge), max(seen)  # a bounded slice, never the whole line
    seen.clear()
    ok([*args, "--long-prompts", "truncate", "--out", tmp_path / "t.parquet"])
    table = schema.read_table(tmp_path / "t.parquet", "pairs")[0]
    kept = {r["prompt_id"]: r["prompt_ids"] for r in table.to_pylist()}
    assert len(kept["huge"]) == limit and max(seen) < 100 * limit


def test_bounding_keeps_the_tokens_of_the_end(tiny_tokenizer):
    """Cut to its end before tokenising, a long prompt truncates to the same last tokens as tokenised whole."""
    from modpo_pipe.prompts import PromptRecord, max_token_chars, render

    text = " ".join(f"word{i} and more words" for i in range(3000))
    record = PromptRecord("p", prompt=text)
    whole = tiny_tokenizer(text)["input_ids"]
    _, bounded = render(record, tiny_tokenizer, use_chat_template=False, max_tokens=100)
    assert len(bounded) > 100 and len(bounded) < len(whole)
    assert bounded[-100:] == whole[-100:]
    assert 2 * 100 * max_token_chars(tiny_tokenizer) < len(text)
    short = PromptRecord("s", prompt="Why is the sky blue?")
    assert render(short, tiny_tokenizer, False, max_tokens=100) == render(short, tiny_tokenizer, False)


# ------------------------------------------------------------------ 7. only a sequence of numbers is a score


def _reward(fn) -> CallableReward:
    reward = CallableReward.__new__(CallableReward)
    reward.name, reward.spec, reward.fn, reward.source = "r", "py:test:fn", fn, None
    return reward


@pytest.mark.parametrize(("returned", "fragment"), [
    (lambda n: {f"k{i}": 1.0 for i in range(n)}, "returned dict, expected a list of floats"),
    (lambda n: set(range(n)), "returned set, expected a list of floats"),
    (lambda n: (float(i) for i in range(n)), "returned generator, expected a list of floats"),
    (lambda n: np.zeros((n, 1)), "returned a 2-D array of shape (3, 1), expected a list of floats"),
    (lambda n: torch.zeros(n, 2), "returned a 2-D array of shape (3, 2)"),
    (lambda n: "abc", "returned str, expected a list of floats"),
    (lambda n: ["1.5"] * n, "response 0: score '1.5' is not a number"),
    (lambda n: [[1.0]] * n, "response 0: score [1.0] is not a number"),
])
def test_a_reward_returning_anything_but_numbers_is_refused(returned, fragment):
    reward = _reward(lambda prompts, responses: returned(len(responses)))
    inputs = [RewardInput([{"role": "user", "content": "hi"}], r) for r in ("a", "bb", "ccc")]
    with pytest.raises(ModpoError, match="reward 'r' \\(py:test:fn\\)") as error:
        reward.score(inputs, batch_size=8)
    assert fragment in str(error.value)


@pytest.mark.parametrize("returned", [
    lambda n: [1, 2.5, True][:n], lambda n: (1.0, 2.0, 3.0), lambda n: np.arange(n, dtype=np.float32),
    lambda n: torch.arange(n, dtype=torch.float64), lambda n: [np.float64(1), torch.tensor(2.0), 3],
])
def test_lists_tuples_and_1d_arrays_of_numbers_are_scores(returned):
    reward = _reward(lambda prompts, responses: returned(len(responses)))
    inputs = [RewardInput([{"role": "user", "content": "hi"}], r) for r in ("a", "bb", "ccc")]
    scores = reward.score(inputs, batch_size=8)
    assert scores == [float(v) for v in returned(3)]


def test_a_reward_returning_a_dict_fails_score(env, tmp_path):
    line = fails(_score(env, tmp_path / "s.parquet", "as_dict"), "returned dict, expected a list of floats")
    assert line.startswith("error: reward 'bad' (py:")


# --------------------------------------------------------------------- 8. eval refuses a malformed spec


@pytest.mark.parametrize(("spec", "fragment"), [
    ("NAME", "--policies 'NAME': no such directory; give PATH (a model directory) or LABEL=PATH"),
    ("=some/where", "--policies '=some/where': expected PATH or LABEL=PATH, with neither part empty"),
    ("label=", "--policies 'label=': expected PATH or LABEL=PATH, with neither part empty"),
    ("reference=org/model", "the label 'reference' is the reference's own"),
])
def test_eval_refuses_a_malformed_policy_spec_at_once(env, tmp_path, monkeypatch, spec, fragment):
    import modpo_pipe.evaluate as evaluate
    from modpo_pipe import models

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluate ran"))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("a model was looked up"))
    fails(["eval", env / "prompts.jsonl", *config(env), "--policies", spec,
           "--summary-out", tmp_path / "eval.json"], fragment)


def test_eval_refuses_a_label_given_twice(env, tiny, tmp_path, monkeypatch):
    import modpo_pipe.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluate ran"))
    fails(["eval", env / "prompts.jsonl", *config(env), "--policies", f"a={tiny.policy}", "--policies",
           f"a={tiny.reward}", "--summary-out", tmp_path / "eval.json"], "label 'a' is given twice")


# ----------------------------------------------------------------------- 9. a finished generate reruns free


def test_rerunning_a_finished_generate_samples_nothing(env, tmp_path, monkeypatch):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    args = ["generate", env / "prompts.jsonl", *config(env), "--out", out]
    ok(args)
    before = out.read_bytes()
    monkeypatch.setattr(generate, "sample", lambda *a, **k: pytest.fail("sampled again"))
    monkeypatch.setattr(generate, "load_policy", lambda *a, **k: pytest.fail("loaded the policy again"))
    output = ok(args)
    assert f"nothing to do: {out} is already written from these prompts, this policy and these settings" in output
    assert "groups: 6" in output
    assert out.read_bytes() == before
    monkeypatch.undo()
    # other settings, other prompts or a damaged file: sampled again
    calls = {"n": 0}
    real = generate.sample

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(generate, "sample", counting)
    ok([*args, "--seed", 7])
    assert calls["n"] == 1
    out.write_bytes(before[: len(before) // 2])
    ok(args)
    assert calls["n"] == 2
    assert out.read_bytes() != before[: len(before) // 2]
    schema.read_table(out, "pairs")


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES"])
def test_a_full_disk_or_read_only_path_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    """merge, train (its metrics and out directory) and init wrote through OSErrors the CLI did not catch: a full
    disk or a read-only mount ended in a traceback (cli.user_errors now turns them into one line for every
    command; init and train here). Any other OSError is still a bug's traceback."""
    import errno

    path = tmp_path / "modpo.toml"
    path.write_text("# mine\n")

    def refuse(self, *args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(self))

    monkeypatch.setattr(Path, "write_text", refuse)
    line = fails(["init", path, "--force"], os.strerror(getattr(errno, code)))
    assert "(finished outputs are intact)" in line and ".modpo.toml.tmp" in line
    monkeypatch.undo()
    assert path.read_text() == "# mine\n"


def test_a_read_only_output_directory_fails_train_in_one_line(env, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "ckpt"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    fails(["train", env / "scored.parquet", *config(env), "--out", out],
          f"cannot write or read {out}: Read-only file system; fix the permissions or choose another path")


def test_an_unexpected_os_error_keeps_its_traceback(tmp_path, monkeypatch):
    import errno

    def broken(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "write_text", broken)
    result = cli(["init", tmp_path / "modpo.toml"])
    assert result.exit_code == 1 and isinstance(result.exception, OSError)


def test_a_reward_model_without_its_head_is_refused(env, tiny, tmp_path):
    """A causal LM given as a reward (its config saying one label) loaded with a random `score` head: score
    exited 0 with rewards that changed from load to load."""
    lm = tmp_path / "lm-as-rm"
    shutil.copytree(tiny.policy, lm)
    config_json = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config_json, "id2label": {"0": "LABEL_0"},
                                                 "label2id": {"LABEL_0": 0}}))
    fails(["score", env / "pairs.parquet", *config(env), "--reward", f"x={lm}", "--out", tmp_path / "s.parquet"],
          f"{lm} lacks weights of a sequence-classification reward model (score.weight missing; it was saved as "
          "LlamaForCausalLM)")
    assert not (tmp_path / "s.parquet").exists()


def test_an_output_that_is_the_input_is_refused_before_any_work(env, tmp_path):
    """`generate prompts.jsonl --out prompts.jsonl` replaced the user's prompts with a Parquet file, exit 0."""
    for name in ("prompts.jsonl", "pairs.parquet"):
        shutil.copy(env / name, tmp_path / name)
    before = (tmp_path / "prompts.jsonl").read_bytes()
    fails(["generate", tmp_path / "prompts.jsonl", *config(env), "--out", tmp_path / "prompts.jsonl"],
          "is the input file")
    assert (tmp_path / "prompts.jsonl").read_bytes() == before
    fails(["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "pairs.parquet"],
          "is the input file")
    fails(["eval", tmp_path / "prompts.jsonl", *config(env), "--out", tmp_path / "prompts.jsonl"],
          "is the input file")
    assert (tmp_path / "prompts.jsonl").read_bytes() == before
    fails(["eval", tmp_path / "prompts.jsonl", *config(env), "--out", tmp_path], "not a path a summary file can")


def test_an_output_directory_that_is_a_file_is_one_line(env, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    fails(["train", env / "scored.parquet", *config(env), "--out", tmp_path / "a-file"],
          "is a file; give a directory for the outputs")
    fails(["train", env / "scored.parquet", *config(env), "--out", tmp_path / "a-file" / "ckpt"],
          f"{tmp_path / 'a-file'} is a file, not a directory")
    assert (tmp_path / "a-file").read_text() == "mine"


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


def test_a_large_seed_trains(env, tmp_path):
    """A seed past about 9.2e12 overflowed torch.manual_seed at the first step (seed * 1_000_003 > 2**64), after
    the model had loaded: a traceback. Derived seeds wrap; seeds that fit draw what they drew before."""
    from modpo_pipe.train import torch_seed

    assert torch_seed(12345) == 12345 and torch_seed(-7) == -7 and torch_seed(2**64 + 5) == 5
    ok(["train", env / "scored.parquet", *config(env), "--seed", 92233720368547, "--out", tmp_path / "ckpt"])
    assert (tmp_path / "ckpt" / "final").is_dir()


@pytest.mark.parametrize("rank,world,printed", [("1", "2", False), ("1", None, True), ("", "2", True),
                                                ("x", "2", True), ("0", "2", True)])
def test_only_the_other_processes_of_a_multi_process_run_keep_quiet(tmp_path, monkeypatch, rank, world, printed):
    """A RANK set by a platform for a one-process job hid the error line; an empty or odd RANK was a traceback."""
    monkeypatch.setenv("RANK", rank)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    result = cli(["inspect", tmp_path / "missing.parquet"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert ("error: " in result.output) == printed, result.output


def test_eval_says_how_many_held_out_prompts_it_dropped_as_too_long(env, tmp_path):
    """eval dropped long held-out prompts without a word: its means covered fewer prompts than the file."""
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "word " * 200}) + "\n")
    output = ok(["eval", prompts, *config(env), "--max-prompt-tokens", 32, "--out", tmp_path / "eval.json"])
    assert "note: 1 held-out prompts longer than 32 tokens dropped, 0 truncated" in output, output


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


@pytest.mark.parametrize(("command", "out_is", "fragment"), [
    ("generate", "directory", "is a directory; give the output file's path"),
    ("score", "directory", "is a directory; give the output file's path"),
    ("train", "file", "is a file; give a directory for the outputs"),
    ("score", "under a file", "is a file, not a directory"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(env, tmp_path, command, out_is, fragment):
    """generate and score sampled and scored everything, then failed to write, saying to rerun the same command
    (which failed again the same way); train trained to the end, then failed on the file in its way."""
    out = tmp_path / "out"
    if out_is == "directory":
        out.mkdir()
    else:
        out.write_text("in the way\n")
        out = out / "scored.parquet" if out_is == "under a file" else out
    inputs = {"generate": "prompts.jsonl", "score": "pairs.parquet", "train": "scored.parquet"}[command]
    fails([command, env / inputs, *config(env), "--out", out], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no work started (no parts beside it)


STRICT_TEMPLATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                   "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_chat_the_chat_template_refuses_is_a_bad_row(env, tiny, tmp_path):
    """Real templates (Llama 2, Mistral, Gemma) refuse roles that do not alternate: a jinja2 TemplateError
    traceback that named no prompt, in generate (even with --skip-invalid) and in score."""
    strict = Path(shutil.copytree(tiny.policy, tmp_path / "strict"))
    (strict / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "two-users", "messages": [{"role": "user", "content": "q"},
                                                                   {"role": "user", "content": "q2"}]}) + "\n"
                       + json.dumps({"id": "fine", "prompt": "Hello?"}) + "\n")
    generate = ["generate", prompts, *config(env), "--policy", strict, "--out", tmp_path / "pairs.parquet"]
    fails(generate, "prompt 'two-users': the policy's chat template refuses it: Conversation roles must alternate")
    output = ok([*generate, "--skip-invalid"])
    assert [r["prompt_id"] for r in pq.read_table(tmp_path / "pairs.parquet").to_pylist()] == ["fine"]
    assert schema.read_metadata(tmp_path / "pairs.parquet")["counts"]["skipped_invalid"] == 1, output
    # the reward model's template, on a conversation the policy's template took
    ok(["generate", prompts, *config(env), "--out", tmp_path / "loose.parquet"])
    reward = Path(shutil.copytree(tiny.reward, tmp_path / "strict-reward"))
    (reward / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    fails(["score", tmp_path / "loose.parquet", *config(env), "--reward", f"rm={reward}",
           "--out", tmp_path / "scored.parquet"],
          "the reward model's chat template refuses this conversation: Conversation roles must alternate")


def test_train_refuses_files_scored_by_other_reward_models_or_another_reference(env, tiny, tmp_path):
    """train compared the files' reward names only: one name could stand for two reward models, and two files
    scored against two references trained as one target, silently (the run itself never mixes them)."""
    prompts = tmp_path / "more.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    ok(["generate", prompts, *config(env), "--out", tmp_path / "pairs.parquet"])
    other_fn = tmp_path / "other.py"
    other_fn.write_text("def length(prompts, responses):\n    return [len(r) / 5.0 for r in responses]\n")
    ok(["score", tmp_path / "pairs.parquet", *config(env), "--reward", f"length=py:{other_fn}:length",
        "--out", tmp_path / "swapped.parquet"])
    train = ["train", env / "scored.parquet", *config(env), "--out", tmp_path / "x"]
    fails([*train[:2], tmp_path / "swapped.parquet", *train[2:]],
          f"reward 'length' was scored with 'py:{other_fn}:length', in {env / 'scored.parquet'} with")
    other_ref = Path(shutil.copytree(tiny.policy, tmp_path / "other-ref"))
    config_json = json.loads((other_ref / "config.json").read_text())
    (other_ref / "config.json").write_text(json.dumps({**config_json, "note": "another copy"}))
    ok(["score", tmp_path / "pairs.parquet", *config(env), "--ref", other_ref, "--out", tmp_path / "ref.parquet"])
    fails([*train[:2], tmp_path / "ref.parquet", *train[2:]], f"scored against the reference '{other_ref}'")
    ok(["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "same.parquet"])
    ok([*train[:2], tmp_path / "same.parquet", *train[2:]])  # same reward models, same reference: one target
    # the file whose statistics z-score the rewards: the same reward models, whatever its reference
    fails([*train, "--reward-stats", tmp_path / "swapped.parquet"], "one name, two reward models")
    ok([*train[:-1], tmp_path / "y", "--reward-stats", tmp_path / "ref.parquet"])


def test_score_refuses_a_sampling_policy_changed_since_as_its_reference(env, tiny, tmp_path):
    """With no --ref, score loads the policy the pairs file names; a directory overwritten since (a checkpoint
    saved in place) became the reference silently, another model than the one that sampled."""
    policy = Path(shutil.copytree(tiny.policy, tmp_path / "policy"))
    ok(["generate", env / "prompts.jsonl", *config(env), "--policy", policy, "--out", tmp_path / "pairs.parquet"])
    config_json = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config_json, "note": "saved again"}))
    score = ["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "scored.parquet"]
    fails(score, f"the policy that sampled it, {policy}, has changed since (other contents); give the reference "
                 "explicitly")
    ok([*score, "--ref", policy])  # what is there now, asked for by name


def test_max_min_pairs_of_a_constant_reward_say_the_rewards_tie(env, tmp_path):
    """The error blamed a collapsed policy and its learning rate: nothing had collapsed, the rewards tied."""
    fn = tmp_path / "const.py"
    fn.write_text("def const(prompts, responses):\n    return [1.0] * len(responses)\n")
    ok(["score", env / "pairs.parquet", *config(env), "--reward", f"c=py:{fn}:const", "--out", tmp_path / "s.parquet"])
    fails(["train", tmp_path / "s.parquet", *config(env), "--pairs", "max-min", "--out", tmp_path / "x"],
          "no pairs left to train on: in 6 groups every response has the same weighted reward")


def test_score_names_the_metadata_a_pairs_file_lacks(env, tmp_path):
    """A pairs file built outside the pipeline with the schema's columns but not all of its metadata passed
    validation, then score ended in KeyError: 'policy' (or 'tokenizer_fingerprint' with --ref)."""
    table, meta = schema.read_table(env / "pairs.parquet", "pairs")
    path = write_unchecked(table, {"schema_version": meta["schema_version"], "stage": "pairs"},
                           tmp_path / "pairs.parquet")
    fails(["score", path, *config(env), "--out", tmp_path / "s.parquet"], "metadata has no 'policy'")


def test_reward_stats_of_other_rewards_is_no_corrupt_file(env, tmp_path):
    """--reward-stats naming a good scored file of other rewards was called 'corrupt or not written by
    modpo-pipe'."""
    fn = tmp_path / "const.py"
    fn.write_text("def const(prompts, responses):\n    return [1.0] * len(responses)\n")
    ok(["score", env / "pairs.parquet", *config(env), "--reward", f"c=py:{fn}:const", "--out", tmp_path / "s.parquet"])
    output = fails(["train", env / "scored.parquet", *config(env), "--reward-stats", tmp_path / "s.parquet",
                    "--out", tmp_path / "x"], "holds no reward 'length'; it was scored with the rewards ['c']")
    assert "corrupt" not in output


def test_two_files_of_prompts_without_ids_say_why_their_groups_collide(env, tmp_path):
    """Both files number their prompts row-000000, ...: train said only 'the scored files share group_ids'."""
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"{name} {i}?"}) + "\n"
                                                        for i in range(2)))
        ok(["generate", tmp_path / f"{name}.jsonl", *config(env), "--out", tmp_path / f"{name}-pairs.parquet"])
        ok(["score", tmp_path / f"{name}-pairs.parquet", *config(env), "--out", tmp_path / f"{name}.parquet"])
    fails(["train", tmp_path / "a.parquet", tmp_path / "b.parquet", *config(env), "--out", tmp_path / "x"],
          f"{tmp_path / 'b.parquet'}: group 'r0/row-000000' is in {tmp_path / 'a.parquet'} too: the same groups "
          "given twice (or prompts without ids in both, numbered row-NNNNNN in each: give them ids)")


def test_a_sampling_policy_gone_is_not_blamed_on_score_ref(env, tiny, tmp_path):
    """With no --ref, the reference is the policy the pairs file names; when that directory was gone the error
    named [score].ref, a setting the user never gave."""
    policy = Path(shutil.copytree(tiny.policy, tmp_path / "policy"))
    ok(["generate", env / "prompts.jsonl", *config(env), "--policy", policy, "--out", tmp_path / "pairs.parquet"])
    shutil.rmtree(policy)
    output = fails(["score", tmp_path / "pairs.parquet", *config(env), "--out", tmp_path / "s.parquet"],
                   f"the policy that sampled {tmp_path / 'pairs.parquet'} (its default reference)")
    assert "[score].ref" not in output


@pytest.mark.parametrize(("value", "group"), [("not json", 0), ('{"role": "user"}', 1), ("[]", 2),
                                              ('[{"role": "user", "content": 3}]', 3)])
def test_a_pairs_file_whose_prompt_messages_are_not_a_chat_is_one_line(env, tmp_path, value, group):
    """prompt_messages, what the reward models read, was parsed inside scoring: a JSONDecodeError, TypeError or
    KeyError traceback, or an IndexError blamed on the user's reward function."""
    table, meta = schema.read_table(env / "pairs.parquet", "pairs")
    column = table.column("prompt_messages").to_pylist()
    column[group] = value
    table = table.set_column(table.schema.get_field_index("prompt_messages"), "prompt_messages", pa.array(column))
    path = write_unchecked(table, meta, tmp_path / "pairs.parquet")
    gid = table.column("group_id")[group].as_py()
    fails(["score", path, *config(env), "--out", tmp_path / "s.parquet"],
          f"{path}: group {gid!r}: prompt_messages must be a JSON list of {{role, content}} strings")


def test_metrics_keep_the_first_step_whatever_log_every(env, tmp_path):
    """log_every beyond the step count logged the last step alone: run's and status's headline showed its loss as
    both the first and the last, and the first batch's gap to the reference was never recorded."""
    ok(["train", env / "scored.parquet", *config(env), "--log-every", 1000, "--out", tmp_path / "x"])
    records = [json.loads(line) for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 6]
    assert "first_batch_ref_gap" in records[0]
