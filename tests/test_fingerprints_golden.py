"""Every fingerprint a run directory, a training state or a stage's work directory recorded must come out the same
after any refactoring: a changed byte means a finished round is redone, a killed stage starts afresh, or a training
state is refused. The digests below were computed by the code before the settings' roles were declared in one place
(config.setting); they are literal on purpose. A test that fails here is a change users pay for: keep the recorded
fields and their values, do not update the digests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import two_reward_run_settings

from modpo_pipe import config as cfg
from modpo_pipe import rounds, storage
from modpo_pipe.reward_stats import RewardStats


def _settings(variant: str) -> cfg.Settings:
    """Three settings: the defaults, and two that move most settings that enter a fingerprint off them."""
    settings = two_reward_run_settings()
    if variant == "moved":
        settings = dataclasses.replace(
            settings,
            model=cfg.ModelSettings(dtype="bfloat16", device="cpu", trust_remote_code=True),
            generate=dataclasses.replace(settings.generate, temperature=0.7, top_p=0.9, samples_per_prompt=4,
                                         long_prompts="truncate", chunk_size=7, batch_size=3, chat_template=False,
                                         vllm_max_model_len=2048, max_prompt_tokens=300, skip_invalid=True),
            score=dataclasses.replace(settings.score, chunk_size=5, on_invalid_reward="drop", http_timeout=5.0,
                                      http_retries=1, http_concurrency=2, batch_tokens=99, ref="/models/ref"),
            train=dataclasses.replace(settings.train, loss="rebel", lr_schedule="constant", lora_r=8, lora_layers=1,
                                      pairs="disjoint", batch_size=2, grad_accum=3, normalize="none", lr=3e-4,
                                      epochs=2, merge=True, save_every=5, report_to="tensorboard"),
            run=dataclasses.replace(settings.run, reference="fixed", replay=-1, shards=2, keep_train_state=True),
        )
    elif variant == "previous":
        settings = dataclasses.replace(
            settings,
            generate=dataclasses.replace(settings.generate, backend="transformers", messages_field="chat",
                                         vllm_enforce_eager=True),
            score=dataclasses.replace(settings.score, reward_batch_size=3),
            train=dataclasses.replace(settings.train, beta=0.5, warmup_ratio=0.0, max_grad_norm=0.0,
                                      lora_targets=["q_proj"], gradient_checkpointing=True, weight_decay=0.1),
            run=dataclasses.replace(settings.run, reference="previous", prompts_per_round=0, max_failures=0),
        )
    return settings


def _digests(variant: str) -> dict[str, str]:
    run = rounds.Run(Path("run"), _settings(variant))
    inputs = {"round-000/pairs.parquet": "x"}
    out: dict[str, str] = {}
    for k in (0, 1):
        for stage in rounds.STAGES:
            out[f"{k} {stage} settings"] = storage.json_fingerprint(run.stage_settings(k, stage))
            out[f"{k} {stage} resume"] = run.resume_key(k, stage, inputs)
            out[f"{k} {stage} legacy"] = run.legacy_resume_key(k, stage, inputs)
    return out


ROUNDS_GOLDEN = {
    "default": "adee47878e720d0d85c62b715ac9a66e",
    "moved": "7df6ec23d21f347e5e682f2c1c68a0f4",
    "previous": "6961b1ada6f8b1bb61d3e7ce3224c459",
}


@pytest.mark.parametrize("variant", sorted(ROUNDS_GOLDEN))
def test_rounds_stage_settings_and_resume_keys_are_unchanged(variant, tmp_path, monkeypatch):
    """state.json's recorded settings (compared at every survey), the resume key a killed stage continues
    under (and names its shard directory by), and the legacy key of runs recorded before it."""
    monkeypatch.chdir(tmp_path)  # relative paths: the settings, and so the digests, do not name tmp_path
    Path("prompts.jsonl").write_text('{"id": "p0", "prompt": "Hello"}\n{"id": "p1", "prompt": "Bye"}\n'
                                     '{"id": "p2", "prompt": "Again"}\n')
    assert storage.json_fingerprint(_digests(variant)) == ROUNDS_GOLDEN[variant], json.dumps(_digests(variant),
                                                                                               indent=1)


def test_rounds_recorded_settings_name_the_same_keys(tmp_path, monkeypatch):
    """The manifest shows these keys in `status` and in the 'settings changed' message: the names are part of
    what was recorded (a renamed key reads as a changed setting)."""
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text('{"id": "p0", "prompt": "Hello"}\n')
    run = rounds.Run(Path("run"), _settings("default"))
    assert list(run.stage_settings(0, "generate")) == [
        "generate.backend", "generate.batch_size", "generate.chat_template", "generate.long_prompts",
        "generate.max_new_tokens", "generate.max_prompt_tokens", "generate.policy (initial policy)",
        "generate.samples_per_prompt", "generate.seed", "generate.shard_size", "generate.skip_invalid",
        "generate.temperature", "generate.top_p", "model.dtype", "run.prompts (this round's prompts)"]
    assert list(run.stage_settings(1, "score")) == ["model.dtype", "run.reference", "score.on_invalid_reward",
                                                     "score.rewards"]
    assert list(run.stage_settings(1, "train")) == [
        "model.dtype", "run.replay (rounds replayed)", "run.reward_stats (z-score statistics)", "train.batch_size",
        "train.beta", "train.epochs", "train.grad_accum", "train.gradient_checkpointing", "train.lora_alpha",
        "train.lora_dropout", "train.lora_layers", "train.lora_r", "train.lora_targets", "train.loss", "train.lr",
        "train.max_grad_norm", "train.normalize", "train.pairs", "train.seed", "train.warmup_ratio",
        "train.weight_decay", "train.weights"]


RUN_FINGERPRINT_GOLDEN = {
    ("default", 1, False): "9ddff5622b15ecb132c77f78d0ff5287",
    ("default", 2, True): "078399a12deee4ab44365e7ae3a3d9ef",
    ("moved", 1, True): "e41a170393a15f216c1e08529b5e5755",
    ("previous", 4, False): "2adc98bf8feabb0dba327c1b91d097dc",
}


@pytest.mark.parametrize("variant, processes, stats", sorted(RUN_FINGERPRINT_GOLDEN))
def test_train_run_fingerprint_is_unchanged(variant, processes, stats):
    """What a saved training state (OUT/state/state.json) and a finished OUT/final (modpo_pipe.json) are
    checked against: a different digest throws a resumable state away, or retrains a finished policy."""
    from modpo_pipe.train import run_fingerprint

    reward_stats = RewardStats("round-000/scored.parquet", {"a": 0.5, "b": -1.0}, {"a": 2.0, "b": 0.25}, {})
    data = SimpleNamespace(fingerprints=["2026-01-01T00:00:00:12:abc", "2026-01-02T00:00:00:7:def"],
                           stats=reward_stats if stats else None)
    digest = run_fingerprint(data, _settings(variant).train, "policy-fingerprint", processes)
    assert digest == RUN_FINGERPRINT_GOLDEN[(variant, processes, stats)]


# Parts manifests: what a finished chunk in OUT.parts/ was made with. Model, tokenizer, prompt and input-file
# fingerprints depend on the tiny models' files (and so on the library versions that wrote them): masked below,
# every value that comes from the settings kept.
_MASKED = "<masked>"


def _masked(manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = json.loads(json.dumps(manifest))
    if manifest["stage"] == "pairs":
        for key in ("prompts", "policy", "tokenizer"):
            manifest[key] = _MASKED
    else:
        manifest["pairs"] = _MASKED
        manifest["ref"].update(path=_MASKED, fingerprint=_MASKED)
        for reward in manifest["rewards"].values():
            reward.update(spec=_MASKED, fingerprint=_MASKED)
    return manifest


class _Captured(Exception):
    pass


@pytest.fixture
def capture_parts(monkeypatch) -> list[tuple[dict[str, Any], str, str]]:
    """(manifest, Parts key, the output's run key) of each stage run while it is in use; the stage stops at the
    check for a finished output, before any model samples or scores."""
    from modpo_pipe import parts

    manifests: list[dict[str, Any]] = []
    captured: list[tuple[dict[str, Any], str, str]] = []
    original = parts.Parts.__init__

    def init(self, out, manifest):
        original(self, out, manifest)
        manifests.append(self.manifest)

    def finished_output(out, stage, key):
        captured.append((manifests[-1], parts.Parts(out, manifests[-1]).key, key))
        raise _Captured

    monkeypatch.setattr(parts.Parts, "__init__", init)
    monkeypatch.setattr(parts, "finished_output", finished_output)
    return captured


PARTS_GOLDEN = {
    "default": ("2a9d593dec805b1904b71ed7a60d4836", "3c0313bdbcad8f4f2ec33dffa26d2b96"),
    "moved": ("8d3ee9195b0447cd60d78511f1b5f5b3", "4f92e242c663be054ec9aee85f128f96"),
}


def _stage_settings(tiny, variant: str) -> cfg.Settings:
    settings = _settings(variant)
    generate = dataclasses.replace(settings.generate, policy=str(tiny.policy), backend="transformers",
                                   split="", prompt_field="prompt", vllm_max_model_len=0)
    score = dataclasses.replace(settings.score, rewards={"r": str(tiny.reward), "f": tiny.reward_fn},
                                ref=str(tiny.policy))
    model = dataclasses.replace(settings.model, trust_remote_code=False)
    return dataclasses.replace(settings, model=model, generate=generate, score=score)


@pytest.mark.parametrize("variant", sorted(PARTS_GOLDEN))
def test_generate_and_score_parts_manifests_are_unchanged(variant, tiny, faults_env, tmp_path, capture_parts):
    """A killed generate or score reuses its finished chunks only under the same manifest; a finished output is
    left alone on a rerun only under the same run key."""
    from modpo_pipe.generate import run_generate
    from modpo_pipe.score import run_score

    settings = _stage_settings(tiny, variant)
    with pytest.raises(_Captured):
        run_generate(settings, tiny.prompts, tmp_path / "pairs.parquet")
    with pytest.raises(_Captured):
        run_score(settings, faults_env / "pairs.parquet", tmp_path / "scored.parquet")
    (generate_manifest, generate_key, generate_run_key), (score_manifest, score_key, score_run_key) = capture_parts
    assert generate_run_key == generate_key  # generate's output is keyed by its parts alone
    # score's output by its parts and by which responses the merge drops
    assert score_run_key == storage.json_fingerprint({"parts": score_key,
                                                      "on_invalid_reward": settings.score.on_invalid_reward})
    masked = [_masked(generate_manifest), _masked(score_manifest)]
    assert [storage.json_fingerprint(m) for m in masked] == list(PARTS_GOLDEN[variant]), json.dumps(masked, indent=1)
