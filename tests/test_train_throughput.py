"""Training's speed settings change how a step is computed, never what it computes: the gradient of an optimizer
step is the same however [train].micro_batch_tokens cuts it into forwards, and [train].compile gives the same
losses. [model].attention = flex is refused off CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import config, fails, ok, scored_env

from modpo_pipe import logprobs


@pytest.fixture(scope="module")
def env(tiny, tmp_path_factory) -> Path:
    """6 prompts x 4 responses from the tiny policy, scored by it (float32 on the CPU), one reward."""
    return scored_env(tmp_path_factory.mktemp("throughput"), tiny, "def length(prompts, responses):\n"
                      "    return [len(r) / 10.0 for r in responses]\n", max_new_tokens=12, epochs=1)


def first_step(env: Path, out: Path, monkeypatch, *flags) -> tuple[list[torch.Tensor], int, float]:
    """Train one step of all 6 groups; the gradients the optimizer got, the forwards run, the step's loss."""
    grads: list[list[torch.Tensor]] = []
    forwards = []

    class Recording(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
            return super().step(*args, **kwargs)

    real = logprobs.packed_sequence_logps
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(logprobs, "packed_sequence_logps", lambda *a, **k: forwards.append(1) or real(*a, **k))
    ok(["train", env / "scored.parquet", *config(env), "--epochs", 1, "--batch-size", 6, "--out", out, *flags])
    monkeypatch.undo()
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    budget = int(flags[flags.index("--micro-batch-tokens") + 1]) if "--micro-batch-tokens" in flags else 0
    assert record["micro_batch_tokens"] == budget  # (0 on a CPU: batch_size groups a forward)
    return grads[0], len(forwards), record["loss"]


def test_a_steps_gradient_is_the_same_however_it_is_cut(env, tmp_path, monkeypatch):
    whole, one_forward, loss = first_step(env, tmp_path / "whole", monkeypatch, "--micro-batch-tokens", 10**6)
    assert one_forward == 1
    for budget in (1, 150):  # a group a forward; a few groups a forward
        cut, forwards, cut_loss = first_step(env, tmp_path / f"cut-{budget}", monkeypatch,
                                             "--micro-batch-tokens", budget)
        assert forwards == 6 if budget == 1 else 1 < forwards < 6
        assert cut_loss == pytest.approx(loss, rel=1e-5)
        for a, b in zip(cut, whole):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    default, forwards, _ = first_step(env, tmp_path / "default", monkeypatch)  # CPU: batch_size groups a forward
    assert forwards == 1 and all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(default, whole))


@pytest.mark.slow  # torch.compile of two decoder layers on the CPU: about a minute
def test_compiled_training_has_the_same_losses(env, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from modpo_pipe import models

    def losses(out: Path, *flags) -> list[float]:
        ok(["train", env / "scored.parquet", *config(env), "--epochs", 2, "--batch-size", 3, "--out", out, *flags])
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    eager = losses(tmp_path / "eager")
    compiled_layers = []
    real = models.compile_layers
    monkeypatch.setattr(models, "compile_layers", lambda model: compiled_layers.append(real(model)))
    frames_before = counters["stats"]["unique_graphs"]
    compiled = losses(tmp_path / "compiled", "--compile")
    assert compiled_layers == [2] and counters["stats"]["unique_graphs"] > frames_before  # dynamo traced them
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)


def test_flex_attention_is_refused_on_a_cpu(env, tmp_path):
    fails(["train", env / "scored.parquet", *config(env), "--attention", "flex", "--out", tmp_path / "x"],
          "[model].attention = flex needs a CUDA device")


def test_score_refuses_flex_attention_on_a_cpu_before_any_work(env, tmp_path):
    fails(["score", env / "pairs.parquet", *config(env), "--attention", "flex", "--out", tmp_path / "s.parquet"],
          "[model].attention = flex needs a CUDA device")
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / "s.parquet.parts").exists()


@pytest.mark.slow  # two processes under accelerate launch (gloo on the CPU): about a minute
def test_two_processes_cut_by_tokens_train_like_one(env, tmp_path):
    """Each process cuts its share of a step by the budget and runs as many forwards as the busiest (empty ones
    are zero-weight passes): the same losses and gradient norms as one process with the same global batch."""
    import subprocess
    import sys

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--epochs", "2", "--micro-batch-tokens", "90"]
    ok(["train", env / "scored.parquet", *config(env), "--batch-size", 6, *common, "--out", one])
    result = subprocess.run(
        [sys.executable, "-m", "modpo_pipe", "train", str(env / "scored.parquet"), *map(str, config(env)),
         "--batch-size", "3", *common, "--num-processes", "2", "--out", str(two)],
        cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in (one, two)]
    assert len(lines[0]) == len(lines[1]) == 2
    for a, b in zip(*lines):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_a_state_resumes_under_another_token_budget_or_compile_setting():
    """Neither changes what a step computes, so neither enters the resumable state's fingerprint (as batch_size
    does not): a run killed for memory continues with a smaller budget."""
    from types import SimpleNamespace

    from modpo_pipe.config import TrainSettings
    from modpo_pipe.train import run_fingerprint

    data = SimpleNamespace(fingerprints=["scored"], stats=None)
    base = run_fingerprint(data, TrainSettings(), "policy")
    assert run_fingerprint(data, TrainSettings(micro_batch_tokens=4096, compile=True), "policy") == base
    assert run_fingerprint(data, TrainSettings(beta=0.2), "policy") != base
