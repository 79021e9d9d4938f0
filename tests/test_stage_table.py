"""The one table of a round's stages (rounds.STAGE_TABLE): what a stage writes is what a fresh attempt clears and a
resumed one keeps, and `run` and `status` speak of the stages the table lists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modpo_pipe import config as cfg
from modpo_pipe import roles, rounds
from modpo_pipe.cli import app
from modpo_pipe.rounds.stages import clear_stage


@pytest.fixture
def layout(tmp_path, monkeypatch) -> rounds.RoundLayout:
    monkeypatch.chdir(tmp_path)
    Path("prompts.jsonl").write_text('{"id": "p0", "prompt": "Hello"}\n')
    settings = cfg.Settings(model=cfg.ModelSettings(), generate=cfg.GenerateSettings(policy="/models/policy"),
                            score=cfg.ScoreSettings(rewards={"a": "/models/ra"}), train=cfg.TrainSettings(),
                            run=cfg.RunSettings(prompts="prompts.jsonl"))
    return rounds.RoundLayout(Path("run"), settings)


def _fill(round_dir: Path) -> None:
    """Every stage's outputs and work directories, and leftovers of killed attempts."""
    round_dir.mkdir(parents=True)
    for name in ("prompts.jsonl", "pairs.parquet", "scored.parquet", "metrics.jsonl"):
        (round_dir / name).write_text("x")
        (round_dir / f".{name}.tmp-123").write_text("half")
    for name in ("pairs.parquet.parts", "scored.parquet.parts", "train/final"):
        (round_dir / name).mkdir(parents=True)
    (round_dir / "policy").symlink_to("train/final")


def test_a_fresh_attempt_clears_what_the_table_says_its_stage_writes_and_nothing_else(layout):
    round_dir = layout.round_dir(0)
    _fill(round_dir)
    clear_stage(layout, 0, "score", fresh=True)
    left = {p.name for p in round_dir.iterdir()}
    assert "scored.parquet" not in left and "scored.parquet.parts" not in left
    assert not [name for name in left if name.startswith(".scored.parquet")]  # its temporary files too
    assert {"prompts.jsonl", "pairs.parquet", "pairs.parquet.parts", "train", "policy", "metrics.jsonl"} <= left

    clear_stage(layout, 0, "train", fresh=True)
    left = {p.name for p in round_dir.iterdir()}
    assert not {"train", "policy", "metrics.jsonl"} & left
    assert {"prompts.jsonl", "pairs.parquet", "pairs.parquet.parts"} <= left


def test_a_resumed_attempt_keeps_its_work_and_drops_half_written_files(layout):
    round_dir = layout.round_dir(0)
    _fill(round_dir)
    clear_stage(layout, 0, "generate", fresh=False)
    clear_stage(layout, 0, "train", fresh=False)
    left = {p.name for p in round_dir.iterdir()}
    assert {"pairs.parquet.parts", "train", "pairs.parquet", "policy"} <= left
    assert not [name for name in left if name.startswith((".pairs.parquet.tmp", ".prompts.jsonl.tmp"))]


def test_headlines_read_every_stage_summary_and_older_train_records():
    assert rounds.headline("generate", {"rows": 4, "prompts": 2}) == "4 groups from 2 prompts"
    assert rounds.STAGE_TABLE["generate"].status_text({"rows": 4, "prompts": 2}) == "2 prompts"
    assert rounds.headline("score", {"reward_mean": {"a": 0.5}, "shards": 2, "shard_seconds": 3.0}) == (
        "a mean 0.5; merged from 2 shards, 3.0s of work in them")
    older = {"rows": 6, "steps": 3, "loss_first_epoch": 0.7, "loss": 0.6}  # no loss_start, no kl_k2
    assert rounds.headline("train", older) == "6 pairs, 3 steps, loss 0.7 -> 0.6 (epoch means)"
    assert all(rounds.headline(stage, {}) == "" for stage in rounds.STAGES)


def test_run_names_the_stages_of_the_table_and_takes_their_sections_flags():
    help_text = CliRunner().invoke(app, ["run", "--help"], terminal_width=400, env={"COLUMNS": "400"}).output
    assert ", ".join(rounds.STAGES) in " ".join(help_text.split())
    for stage in rounds.STAGE_TABLE.values():
        fields = [f for f in dataclasses.fields(cfg.SECTIONS[stage.section]) if not roles.role(f).run_sets]
        assert all(f"--{stage.section}-{cfg.flag_name(f)[2:]}" in help_text for f in fields), stage.section
