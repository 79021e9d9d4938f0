"""The three commands end to end, in their short form, in a fresh directory holding a modpo.toml."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from modpo_pipe import schema
from modpo_pipe.cli import app

runner = CliRunner()

GROUP_COLUMNS = [
    "group_id", "prompt_id", "prompt", "prompt_messages", "prompt_ids", "responses", "response_ids",
    "finish_reasons", "round", "gen_logps",
]


def invoke(args: list[str], cwd: Path) -> str:
    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(app, args, catch_exceptions=False)
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def workdir(tiny, tmp_path_factory) -> Path:
    """A fresh directory with a modpo.toml and a prompts file; the three commands run in it."""
    work = tmp_path_factory.mktemp("pipeline")
    shutil.copy(tiny.prompts, work / "prompts.jsonl")
    invoke(["init", "--policy", str(tiny.policy), "--reward", f"rm={tiny.reward}",
            "--reward", f"length={tiny.reward_fn}"], work)
    toml = (work / "modpo.toml").read_text()
    toml = toml.replace('backend = "auto"', 'backend = "transformers"').replace("max_new_tokens = 256",
                                                                                "max_new_tokens = 20")
    toml = toml.replace("samples_per_prompt = 2", "samples_per_prompt = 4")
    toml = toml.replace("lr = 1e-05", "lr = 0.0005").replace("epochs = 1", "epochs = 4")
    toml = toml.replace("batch_size = 8", "batch_size = 2")
    (work / "modpo.toml").write_text(toml)
    invoke(["generate", "prompts.jsonl"], work)
    invoke(["score", "pairs.parquet"], work)
    invoke(["train", "scored.parquet"], work)
    return work


def test_outputs_land_next_to_the_config(workdir):
    assert (workdir / "pairs.parquet").is_file()
    assert (workdir / "scored.parquet").is_file()
    assert (workdir / "checkpoints" / "final" / "model.safetensors").is_file()
    assert not list((workdir / "checkpoints" / "final").glob("*.bin"))  # safetensors only
    assert not list(workdir.glob(".*tmp*"))  # no temporary leftovers


def test_columns_are_exactly_the_contract(workdir):
    assert pq.read_schema(workdir / "pairs.parquet").names == GROUP_COLUMNS
    scored = pq.read_schema(workdir / "scored.parquet").names
    assert scored == GROUP_COLUMNS + ["reward_rm", "reward_length", "ref_logps"]
    table, meta = schema.read_table(workdir / "scored.parquet", "scored")
    assert table.num_rows == 6  # six prompts, one group each
    assert schema.group_sizes(table) == [4] * 6  # every response of a prompt, in its row
    assert meta["schema_version"] == 2 and set(meta["rewards"]) == {"rm", "length"}
    assert meta["sampling"]["samples_per_prompt"] == 4
    assert {"mean", "std", "spec", "fingerprint"} <= set(meta["rewards"]["rm"])
    group_ids = table.column("group_id").to_pylist()
    assert len(set(group_ids)) == len(group_ids)


def test_stored_ids_round_trip(workdir, tiny_tokenizer):
    table, meta = schema.read_table(workdir / "pairs.parquet", "pairs")
    eos = tiny_tokenizer.eos_token_id
    for row in table.to_pylist():
        assert row["prompt_ids"] == tiny_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert json.loads(row["prompt_messages"])[0]["role"] == "user"
        for j in range(4):
            ids = row["response_ids"][j]
            assert row["responses"][j] == tiny_tokenizer.decode(ids, skip_special_tokens=True)
            assert eos not in ids[:-1]  # nothing after the end of turn
            assert row["finish_reasons"][j] == ("stop" if ids[-1] == eos else "length")
            assert len(ids) <= 20
    assert meta["policy"]["fingerprint"] and meta["tokenizer_fingerprint"]


def test_ref_logps_equal_an_independent_transformers_computation(workdir, tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.policy, dtype=torch.float32).eval()
    table, _ = schema.read_table(workdir / "scored.parquet", "scored")
    worst = 0.0
    with torch.inference_mode():
        for row in table.to_pylist():
            for j in range(4):
                ids = row["prompt_ids"] + row["response_ids"][j]
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                logp = torch.log_softmax(logits.double(), -1)
                n = len(row["prompt_ids"])
                expected = sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids)))
                worst = max(worst, abs(expected - row["ref_logps"][j]))
                # the sampler's own log-prob (temperature 1, top-p 1) is the same quantity
                assert row["gen_logps"][j] == pytest.approx(expected, abs=1e-3)
    assert worst < 1e-4


def test_training_lowers_loss_and_moves_margins_toward_teacher(workdir, tiny):
    from transformers import AutoModelForCausalLM

    from modpo_pipe.logprobs import batched_sequence_logps
    from modpo_pipe.train import load_training_groups

    metrics = [json.loads(line) for line in (workdir / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["first_batch_ref_gap"] < 1e-4  # policy == reference: log-probs match the cache
    first_epoch = [m["loss"] for m in metrics if m["epoch"] == 0]
    last_epoch = [m["loss"] for m in metrics if m["epoch"] == 3]
    assert sum(last_epoch) / len(last_epoch) < sum(first_epoch) / len(first_epoch)
    for key in ("loss", "mean_abs_d", "sign_agreement", "kl_k2", "grad_norm", "lr", "tokens_per_s"):
        assert key in metrics[-1]
    assert all(m["kl_k2"] >= 0 for m in metrics)  # a KL estimate, never negative

    data = load_training_groups([workdir / "scored.parquet"], {}, "zscore")
    trained = AutoModelForCausalLM.from_pretrained(workdir / "checkpoints" / "final", dtype=torch.float32).eval()
    sizes = (data.response_start[1:] - data.response_start[:-1]).tolist()
    prompts = [ids for ids, k in zip(data.prompt_ids, sizes) for _ in range(k)]
    logp = batched_sequence_logps(trained, prompts, list(data.response_ids), pad_id=1, token_budget=4096)
    ratio = torch.tensor(logp) - data.ref_logps
    student = 0.1 * (ratio[data.first] - ratio[data.second])
    assert data.pairs == 6 * 6  # all pairs of 4 responses (none identical here)
    before = data.teacher.abs().mean()  # at the start the student margin is 0
    after = (student - data.teacher).abs().mean()
    assert after < 0.7 * before, (after, before)


def test_train_is_idempotent_once_finished(workdir):
    before = (workdir / "checkpoints" / "final" / "model.safetensors").stat().st_mtime_ns
    output = invoke(["train", "scored.parquet"], workdir)
    assert output.startswith("nothing to do:") and "steps: 12" in output  # 6 groups / batch 2: 3 steps x 4 epochs
    assert (workdir / "checkpoints" / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_resume_continues_at_the_same_step_with_the_same_result(workdir, tmp_path, monkeypatch):
    """A run killed mid-way resumes from its last state: same steps logged once, same final weights."""
    from safetensors.torch import load_file

    import modpo_pipe.train as train_module

    # 6 groups, batch 2: 3 steps an epoch, 6 in all; state saved at steps 2 and 4.
    common = ["train", str(workdir / "scored.parquet"), "--config", str(workdir / "modpo.toml"),
              "--epochs", "2", "--save-every", "2"]
    invoke([*common, "--out", str(tmp_path / "full")], tmp_path)

    calls = {"n": 0}
    real_loss = train_module.pair_loss

    def dies_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "pair_loss", dies_in_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        runner.invoke(app, [*common, "--out", str(tmp_path / "part")], catch_exceptions=False)
    assert json.loads((tmp_path / "part" / "state" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(train_module, "pair_loss", real_loss)
    output = invoke([*common, "--out", str(tmp_path / "part")], tmp_path)
    assert "resumed from step: 2" in output

    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    full = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    part = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    worst = max((full[k] - part[k]).abs().max().item() for k in full)
    assert worst < 1e-6


def test_identical_pairs_are_dropped_and_counted(workdir, tmp_path):
    table, meta = schema.read_table(workdir / "scored.parquet", "scored")
    rows = table.to_pylist()
    rows[0]["response_ids"][1] = rows[0]["response_ids"][0]
    rows[0]["responses"][1] = rows[0]["responses"][0]
    import pyarrow as pa

    copy = pa.Table.from_pylist(rows, schema=table.schema)
    schema.write_table(copy, tmp_path / "scored.parquet", meta)
    from modpo_pipe.train import load_training_groups

    data = load_training_groups([tmp_path / "scored.parquet"], {"rm": 1, "length": 1}, "zscore")
    assert data.dropped_identical == 1 and len(data) == table.num_rows  # the group keeps its other 5 pairs
    assert data.pairs == 6 * 6 - 1
    disjoint = load_training_groups([tmp_path / "scored.parquet"], {"rm": 1, "length": 1}, "zscore",
                                    pairing="disjoint")
    assert disjoint.dropped_identical == 1 and disjoint.pairs == 6 * 2 - 1


def test_weights_must_name_the_file_rewards(workdir):
    result = runner.invoke(app, ["train", str(workdir / "scored.parquet"), "--config", str(workdir / "modpo.toml"),
                                 "--weights", "rm=0.5,helpful=0.5"])
    assert result.exit_code == 1
    assert "weights" in result.output and "helpful" in result.output


def test_lora_training_with_merge(workdir, tmp_path):
    invoke(["train", str(workdir / "scored.parquet"), "--config", str(workdir / "modpo.toml"), "--lora-r", "4",
            "--lr", "1e-3", "--epochs", "1", "--merge", "--out", str(tmp_path / "lora")], tmp_path)
    assert (tmp_path / "lora" / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "merged" / "model.safetensors").is_file()
    from modpo_pipe import models

    merged = models.load_causal_lm(str(tmp_path / "lora" / "merged"), dtype=torch.float32, device=torch.device("cpu"))
    via_adapter = models.load_causal_lm(str(tmp_path / "lora" / "final"), dtype=torch.float32,
                                        device=torch.device("cpu"))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(merged(ids).logits, via_adapter(ids).logits, atol=1e-5)


def test_lora_layers_adapts_only_the_top_layers(workdir, tiny, tmp_path):
    from safetensors.torch import load_file

    from modpo_pipe import models

    invoke(["train", str(workdir / "scored.parquet"), "--config", str(workdir / "modpo.toml"), "--lora-r", "4",
            "--lora-layers", "1", "--lr", "1e-2", "--epochs", "1", "--merge", "--out", str(tmp_path / "top")],
           tmp_path)
    adapted = {name.split(".layers.")[1].split(".")[0] for name in
               load_file(tmp_path / "top" / "final" / "adapter_model.safetensors")}
    assert adapted == {"1"}  # the tiny model has layers 0 and 1
    cpu = torch.device("cpu")
    base = models.load_causal_lm(tiny.policy, dtype=torch.float32, device=cpu).state_dict()
    merged = models.load_causal_lm(str(tmp_path / "top" / "merged"), dtype=torch.float32, device=cpu).state_dict()
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(merged[q.format(0)], base[q.format(0)])
    assert not torch.equal(merged[q.format(1)], base[q.format(1)])

    result = runner.invoke(app, ["train", str(workdir / "scored.parquet"), "--config", str(workdir / "modpo.toml"),
                                 "--lora-r", "4", "--lora-layers", "3", "--out", str(tmp_path / "too-many")])
    assert result.exit_code == 1
    assert "[train].lora_layers = 3, but the model has 2 layers" in result.output


def test_tokenizer_mismatch_is_refused(workdir, tmp_path, tiny):
    from tests.conftest import make_tokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny.policy, other)
    tok = make_tokenizer("{{ messages[0]['content'] }}")
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(other)
    result = runner.invoke(app, ["score", str(workdir / "pairs.parquet"), "--config", str(workdir / "modpo.toml"),
                                 "--ref", str(other), "--out", str(tmp_path / "s.parquet")])
    assert result.exit_code == 1 and "another tokenizer" in result.output
    assert not (tmp_path / "s.parquet").exists()


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "modpo_pipe", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout
