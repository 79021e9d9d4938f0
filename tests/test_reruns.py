"""Rerunning finished work costs nothing: a finished generate samples nothing, a finished score calls no reward,
a finished train trains nothing; other settings or a damaged output are computed again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import config, ok

from modpo_pipe import schema


@pytest.fixture(scope="module")
def env(failures_env: Path) -> Path:
    """conftest.failures_env: modpo.toml, reward callables (rewards.py), prompts, pairs and scored (one epoch)."""
    return failures_env


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


def test_rerunning_a_finished_score_has_nothing_to_do(faults_env, tmp_path):
    """A rerun of a finished generate said "nothing to do"; one of a finished score computed everything again."""
    calls = tmp_path / "calls.txt"
    module = tmp_path / "counted.py"
    module.write_text(f"def fn(prompts, responses):\n    with open({str(calls)!r}, 'a') as f:\n"
                      "        f.write('call\\n')\n    return [len(r) / 10.0 for r in responses]\n")
    out = tmp_path / "scored.parquet"
    args = ["score", faults_env / "pairs.parquet", *config(faults_env), "--out", out, "--reward", f"r=py:{module}:fn"]
    ok(args)
    before, called = out.read_bytes(), calls.read_text()
    assert "nothing to do" in ok(args)
    assert out.read_bytes() == before and calls.read_text() == called  # no reward called, nothing written
    ok([*args, "--on-invalid-reward", "drop"])  # a setting that decides the rows: scored again
    assert calls.read_text() != called


@pytest.mark.slow
def test_rerunning_a_finished_train_has_nothing_to_do(faults_env, tmp_path):
    out = tmp_path / "ckpt"
    args = ["train", faults_env / "scored.parquet", *config(faults_env), "--epochs", 1, "--out", out]
    ok(args)
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    text = ok(args)
    assert "nothing to do" in text and "already trained" in text
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == final
