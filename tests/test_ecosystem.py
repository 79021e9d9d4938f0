"""Fitting the ecosystem: experiment trackers (TensorBoard offline), prompts from a Hub-style dataset, model cards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli, generate_and_score, ok, settings_toml, tiny_generate

from modpo_pipe import tracking
from modpo_pipe.config import ModelSettings, RunSettings, ScoreSettings, TrainSettings
from modpo_pipe.errors import ModpoError
from modpo_pipe.prompts import PromptFields, PromptRecord, read_prompts


@pytest.fixture(scope="module")
def scored(tiny, tmp_path_factory) -> Path:
    """A work directory with modpo.toml, pairs.parquet and scored.parquet (6 prompts, a group of 4 responses each;
    3 groups a step, 2 epochs: 4 steps)."""
    work = tmp_path_factory.mktemp("ecosystem")
    ok(["init", "--policy", tiny.policy, "--reward", f"rm={tiny.reward}", "--reward", f"length={tiny.reward_fn}"],
       work)
    toml = (work / "modpo.toml").read_text()
    for old, new in (('backend = "auto"', 'backend = "transformers"'), ("max_new_tokens = 256", "max_new_tokens = 8"),
                     ("samples_per_prompt = 2", "samples_per_prompt = 4"), ("batch_size = 8", "batch_size = 3"),
                     ("lr = 1e-05", "lr = 0.0005"), ('device = "auto"', 'device = "cpu"'),
                     ("epochs = 1", "epochs = 2")):
        toml = toml.replace(old, new)
    (work / "modpo.toml").write_text(toml)
    return generate_and_score(work, tiny.prompts)


def event_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `logdir` (one directory: one run), by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ trackers


def test_tensorboard_holds_the_loss_at_every_logged_step(scored):
    out = scored / "tb"
    ok(["train", "scored.parquet", "--out", out, "--report-to", "tensorboard", "--log-every", "1"], scored)
    lines = metrics_lines(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    events = list((out / "runs" / tracking.PROJECT).glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    scalars = event_scalars(out / "runs" / tracking.PROJECT)
    assert [s for s, _ in scalars["loss"]] == [m["step"] for m in lines]
    assert [v for _, v in scalars["loss"]] == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert [v for _, v in scalars["kl_k2"]] == pytest.approx([m["kl_k2"] for m in lines], rel=1e-5, abs=1e-7)
    hparams = next((out / "runs" / tracking.PROJECT).glob("*/hparams.yml")).read_text()
    assert "train.beta: 0.1" in hparams and "weights.rm: 0.5" in hparams  # the normalised weights used


def test_no_tracker_files_by_default(scored):
    out = scored / "plain"
    ok(["train", "scored.parquet", "--out", out], scored)
    assert (out / "metrics.jsonl").is_file() and not (out / "runs").exists()


def test_an_uninstalled_or_unknown_tracker_is_one_line(monkeypatch):
    monkeypatch.setattr(tracking, "is_installed", lambda name: name == "tensorboard")
    with pytest.raises(ModpoError, match=r"^--report-to wandb: the wandb package is not installed"):
        tracking.parse_report_to("wandb")
    with pytest.raises(ModpoError, match="unknown tracker 'comet'"):
        tracking.parse_report_to("comet")
    assert tracking.parse_report_to("all") == ["tensorboard"]
    assert tracking.parse_report_to("none") == []
    assert tracking.parse_report_to("tensorboard,tensorboard") == ["tensorboard"]


def test_bad_report_to_is_refused_by_the_config(scored):
    result = cli(["train", "scored.parquet", "--out", scored / "x", "--report-to", "tensorbored"], scored)
    assert result.exit_code == 1 and "[train].report_to must be one of" in result.output


def test_tracker_kwargs_reopen_the_same_run():
    kwargs = tracking.tracker_kwargs(["tensorboard", "wandb", "mlflow", "trackio"], "run-1", Path("/w"), "abc123",
                                     purge_step=5, mlflow_run_id="m1")
    assert kwargs["tensorboard"] == {"purge_step": 5}
    assert kwargs["wandb"]["id"] == "abc123" and kwargs["wandb"]["resume"] == "allow"
    assert kwargs["mlflow"]["run_id"] == "m1" and kwargs["trackio"]["resume"] == "allow"
    assert tracking.resume_id("a", "b") == tracking.resume_id("a", "b") != tracking.resume_id("a", "c")


def test_report_to_does_not_change_what_a_state_resumes(scored):
    import dataclasses

    from modpo_pipe.config import TrainSettings
    from modpo_pipe.train import load_training_groups, run_fingerprint

    data = load_training_groups([scored / "scored.parquet"], {}, "zscore")
    t = TrainSettings()
    assert run_fingerprint(data, t, "p") == run_fingerprint(data, dataclasses.replace(t, report_to="tensorboard"), "p")
    # A changed lr schedule is another run: a state saved under one is not resumed under the other.
    assert run_fingerprint(data, t, "p") != run_fingerprint(data, dataclasses.replace(t, lr_schedule="constant"), "p")


@pytest.mark.slow
def test_run_logs_every_round_to_one_tensorboard_run(tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tiny.prompts, tmp_path / "prompts.jsonl")
    (run_dir / "modpo.toml").write_text(settings_toml(
        model=ModelSettings(device="cpu", dtype="float32"), generate=tiny_generate(tiny, max_new_tokens=6),
        score=ScoreSettings(rewards={"length": tiny.reward_fn}),
        train=TrainSettings(batch_size=2, lr=0.0005, report_to="tensorboard"),
        run=RunSettings(rounds=2, prompts=str(tmp_path / "prompts.jsonl"), prompts_per_round=4)))
    # Two invocations (as cron would start them): the second reopens the same tracker run.
    ok(["run", "--workdir", run_dir, "--until", "round"])
    ok(["run", "--workdir", run_dir])
    scalars = event_scalars(run_dir / "runs" / tracking.PROJECT)
    per_round = [metrics_lines(run_dir / f"round-00{k}" / "metrics.jsonl") for k in range(2)]
    steps_0 = len(per_round[0])
    assert [s for s, _ in scalars["train/loss"]] == [m["step"] for m in per_round[0]] + [
        steps_0 + m["step"] for m in per_round[1]]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for r in per_round for m in r])
    state = json.loads((run_dir / "state.json").read_text())
    means = [state["rounds"][str(k)]["score"]["summary"]["reward_mean"]["length"] for k in range(2)]
    rewards = scalars["round/reward_mean/length"]
    assert [s for s, _ in rewards] == [0, steps_0] and [v for _, v in rewards] == pytest.approx(means)
    assert not (run_dir / "round-000" / "train" / "runs").exists()  # no tracker run per round
    files = sorted((run_dir / "runs").rglob("*"))
    ok(["run", "--workdir", run_dir])  # nothing due: a cron firing writes no tracker files
    assert sorted((run_dir / "runs").rglob("*")) == files


# ------------------------------------------------------------------------------------------ Hub prompt sets


def hub_layout(root: Path) -> Path:
    """A dataset folder laid out as the Hub lays out parquet files: data/SPLIT-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True)
    chat = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "text": ["First", "Second"], "chat": [chat, chat[:1]]}),
                   root / "data" / "train_prefs-00000-of-00001.parquet")
    pq.write_table(pa.table({"prompt_id": ["c"], "text": ["Third"], "chat": [chat]}),
                   root / "data" / "test_prefs-00000-of-00001.parquet")
    return root


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset's cache inside the test's directory, offline: nothing reaches the network."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_dataset_folder_with_split_and_fields(tmp_path, datasets_cache):
    source = hub_layout(tmp_path / "prefs")
    records, stats = read_prompts(source, fields=PromptFields("train_prefs", prompt="text", id="prompt_id"))
    chat = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    # The other columns come along, for TRL-style reward functions.
    assert records == [PromptRecord("a", prompt="First", columns={"chat": chat}),
                       PromptRecord("b", prompt="Second", columns={"chat": chat[:1]})]
    chats, _ = read_prompts(source, fields=PromptFields("test_prefs", messages="chat", id="prompt_id"))
    # The reference reply (the trailing assistant turn) is dropped: the policy writes its own.
    assert chats == [PromptRecord("c", messages=chat[:1], columns={"text": "Third"})]


def test_dataset_split_must_be_chosen_and_exist(tmp_path, datasets_cache):
    source = hub_layout(tmp_path / "prefs")
    with pytest.raises(ModpoError, match=r"holds splits .*choose one with --split"):
        read_prompts(source, fields=PromptFields(prompt="text"))
    with pytest.raises(ModpoError, match="nope"):
        read_prompts(source, fields=PromptFields("nope", prompt="text"))
    with pytest.raises(ModpoError, match=r"no column 'prompt' or 'messages'.*--prompt-field"):
        read_prompts(source, fields=PromptFields("train_prefs"))


def test_uncached_dataset_id_offline_is_one_line(tmp_path, datasets_cache):
    with pytest.raises(ModpoError) as caught:
        read_prompts(Path("nobody-here/no-such-dataset"), fields=PromptFields("train"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("nobody-here/no-such-dataset: no such file, and no dataset of that name in the "
                              "Hugging Face cache")


def test_generate_reads_a_dataset_folder(scored, tmp_path, datasets_cache):
    source = hub_layout(tmp_path / "prefs")
    ok(["generate", source, "--split", "train_prefs", "--prompt-field", "text", "--id-field", "prompt_id",
        "--out", tmp_path / "pairs.parquet"], scored)
    ids = pq.read_table(tmp_path / "pairs.parquet", columns=["prompt_id"]).column(0).to_pylist()
    assert sorted(set(ids)) == ["a", "b"]


def test_run_prompts_may_be_a_hub_id(tmp_path):
    from modpo_pipe.config import load_settings

    (tmp_path / "modpo.toml").write_text('[run]\nprompts = "HuggingFaceH4/ultrafeedback_binarized"\n'
                                         '[generate]\nsplit = "train_prefs"\n')
    settings = load_settings(tmp_path / "modpo.toml")
    assert settings.run.prompts == "HuggingFaceH4/ultrafeedback_binarized"
    (tmp_path / "modpo.toml").write_text('[run]\nprompts = "missing.jsonl"\n')
    assert load_settings(tmp_path / "modpo.toml").run.prompts == str(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------- model cards


def test_model_card_parses_and_says_what_was_trained(scored):
    from huggingface_hub import ModelCard

    out = scored / "card"
    ok(["train", "scored.parquet", "--out", out, "--beta", "0.2", "--weights", "rm=0.25,length=0.75"], scored)
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.library_name == "transformers"
    assert "modpo-pipe" in card.data.tags
    assert card.data.base_model is None  # a local policy is no Hub id
    meta = json.loads((out / "final" / "modpo_pipe.json").read_text())
    text = card.text
    for name in ("rm", "length"):
        assert meta["rewards"][name]["fingerprint"] in text
        assert f"{meta['rewards'][name]['mean']:.4g}" in text and f"{meta['rewards'][name]['std']:.4g}" in text
    assert "| rm | 0.25 |" in text and "| length | 0.75 |" in text and "β = 0.2" in text
    lines = metrics_lines(out / "metrics.jsonl")
    assert f"{lines[0]['loss']:.4g} at step 1 → {lines[-1]['loss']:.4g} at step {lines[-1]['step']}" in text
    assert (f"pairs trained on: {meta['pairs']} from 6 groups (all pairing); dropped (identical responses): "
            f"{meta['dropped_identical']}") in text
    assert meta["pairs"] + meta["dropped_identical"] == 6 * 6  # 4 responses a prompt: 6 pairs each
    assert "modpo-pipe train scored.parquet" in text and "--beta 0.2" in text
    assert "--weights rm=0.25,length=0.75" in text


def test_lora_adapter_and_merged_cards(scored):
    from huggingface_hub import ModelCard

    out = scored / "lora-card"
    ok(["train", "scored.parquet", "--out", out, "--lora-r", "2", "--merge"], scored)
    adapter = ModelCard.load(out / "final" / "README.md")
    merged = ModelCard.load(out / "merged" / "README.md")
    assert adapter.data.library_name == "peft" and "lora" in adapter.data.tags
    assert merged.data.library_name == "transformers"
    assert "--lora-r 2" in merged.text and "--merge" in merged.text


def test_card_front_matter_names_hub_models_and_datasets():
    from huggingface_hub import ModelCard

    from modpo_pipe.modelcard import model_card

    info = {"policy": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "prompts": "HuggingFaceH4/ultrafeedback_binarized", "prompts_on_hub": True, "weights": {"a": 1.0},
            "beta": 0.1, "loss": "rpo"}
    card = ModelCard(model_card(info, []))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert "no metrics lines" in card.text
    # Groups of N replies (all pairs): the card said "two replies y1, y2" whatever N was.
    assert "sampled a group of replies" in card.text and "two replies" not in card.text
