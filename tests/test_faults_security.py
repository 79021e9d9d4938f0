"""Safe loading in every stage: trust_remote_code only with the flag, safetensors only (never pickle), and a py:
reward documented as code the user runs.

Each case goes through the commands as a user runs them (test_faults_*.py, one a stage; conftest.py says more).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import config, fails, ok


@pytest.fixture(scope="module")
def env(faults_env: Path) -> Path:
    """The fault suites' one shared directory (conftest.faults_env): modpo.toml, prompts, pairs and scored."""
    return faults_env


def _spy_loaders(monkeypatch) -> list[tuple[str, dict]]:
    import transformers

    calls: list[tuple[str, dict]] = []
    for cls_name in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls_name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("modpo_pipe"):  # our calls only
                calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("flag", [None, "--trust-remote-code"])
def test_trust_remote_code_only_with_the_flag_and_safetensors_only(env, tiny, tmp_path, monkeypatch, flag):
    calls = _spy_loaders(monkeypatch)
    extra = [flag] if flag else []
    ok(["generate", env / "prompts.jsonl", *config(env), "--out", tmp_path / "p.parquet", *extra])
    ok(["score", tmp_path / "p.parquet", *config(env), "--out", tmp_path / "s.parquet", "--reward",
        f"rm={tiny.reward}", *extra])
    ok(["train", tmp_path / "s.parquet", *config(env), "--out", tmp_path / "ckpt", "--epochs", 1, *extra])
    loaded = {name for name, _ in calls}
    assert loaded == {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    for name, kwargs in calls:
        assert kwargs.get("trust_remote_code") is (flag is not None), (name, kwargs)
        if name.startswith("AutoModel"):
            assert kwargs.get("use_safetensors") is True, (name, kwargs)


def test_pickle_weights_are_never_loaded(env, tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    policy = tmp_path / "policy"
    shutil.copytree(tiny.policy, policy)
    (policy / "model.safetensors").unlink()
    torch.save(load_file(str(tiny.policy / "model.safetensors")), policy / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    fails(["generate", env / "prompts.jsonl", *config(env), "--policy", policy, "--out", tmp_path / "p.parquet"],
          f"[generate].policy: {policy} holds only pickle weights (pytorch_model.bin), which can run code when "
          "loaded; modpo-pipe loads safetensors only")
    fails(["train", env / "scored.parquet", *config(env), "--policy", policy, "--out", tmp_path / "ckpt"],
          "holds only pickle weights")


def test_py_reward_is_documented_as_code_the_user_runs():
    from modpo_pipe import config, rewards

    assert "runs code the user chose" in rewards.__doc__
    assert "A py: callable is code you chose to run" in config.render_template()
