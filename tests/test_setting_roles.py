"""A setting's role is declared once, in its `setting(...)`: validation, fingerprints and the flags `run` and `eval`
leave out follow from that declaration alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from modpo_pipe import config as cfg
from modpo_pipe import roles
from modpo_pipe.cli import app
from modpo_pipe.config import setting
from modpo_pipe.errors import ModpoError


@dataclass
class Section:
    """A section as a new feature would add it: only its declarations say what it does to fingerprints."""

    level: int = setting(3, "Changes the result.", bounds=((">= 1", "one at least"), ("<= 9", "")))
    mode: str = setting("a", "Changes the result.", choices=("a", "b"))
    batch: int = setting(4, "May change on resume.", resume_free=True)
    where: str = setting("out", "Set by run.", run_sets=True, result="none")
    model: str = setting("m", "Fingerprinted by content.", result="content")
    chunk: int = setting(8, "Recorded by the work directory.", result="none", work=True, recorded_as="old_chunk")
    added: str = setting("before", "Left out at the value that behaves as before.", unrecorded_at="before")


def test_fingerprints_record_what_a_declaration_says_changes_results():
    s = Section()
    assert roles.recorded_settings(s) == {"level": 3, "mode": "a", "batch": 4}
    assert roles.recorded_settings(s, for_resume=True) == {"level": 3, "mode": "a"}
    assert roles.recorded_settings(dataclasses.replace(s, added="after")) == {
        "level": 3, "mode": "a", "batch": 4, "added": "after"}
    assert roles.resume_free_names(s) == {"batch"}
    assert roles.work_settings(s) == {"chunk": 8}
    assert "old_chunk" in roles.legacy_key_settings(s) and "chunk" not in roles.legacy_key_settings(s)
    assert roles.fields_where(Section, "x", run_sets=True) == {("x", "where")}


def test_a_declared_bound_or_choice_is_checked_with_its_reason():
    fields = {f.name: f for f in dataclasses.fields(Section)}
    assert roles.problem(fields["level"], 0, "[x].level") == "[x].level must be >= 1 (one at least); got 0"
    assert roles.problem(fields["level"], 10, "[x].level") == "[x].level must be at most 9; got 10"
    assert roles.problem(fields["level"], 9, "[x].level") is None
    assert roles.problem(fields["mode"], "c", "[x].mode") == "[x].mode must be one of a, b; got 'c'"
    with pytest.raises(ValueError, match="unknown bound"):
        roles.Role(bounds=(("== 1", ""),))
    with pytest.raises(ValueError, match="result must be one of"):
        roles.Role(result="maybe")


@pytest.mark.parametrize("section, key, value, message", [
    ("run", "rounds", 0, "[run].rounds must be >= 1; got 0"),
    ("run", "replay", -2, "[run].replay must be >= -1 (-1: all, 0: none, N > 0: the last N); got -2"),
    ("run", "reference", "other", "[run].reference must be one of fixed, previous; got 'other'"),
    ("run", "max_failures", -1, "[run].max_failures must be >= 0 (0: retry forever); got -1"),
    ("generate", "samples_per_prompt", 1025, "[generate].samples_per_prompt must be at most 1024"),
])
def test_run_and_generate_bounds_come_from_their_declarations(section, key, value, message):
    values = dataclasses.replace(cfg.SECTIONS[section](), **{key: value})
    with pytest.raises(ModpoError) as e:
        cfg.validate_section(values, section)
    assert message in str(e.value)


def test_every_setting_declares_a_role_fingerprints_can_read():
    for name, cls in cfg.SECTIONS.items():
        for f in dataclasses.fields(cls):
            r = roles.role(f)
            assert r.result in roles.RESULTS, (name, f.name)
            assert not (r.resume_free and r.result != "value"), (name, f.name)  # nothing to be free of otherwise
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert roles.problem(f, default, f"[{name}].{f.name}") is None, (name, f.name)  # defaults are valid


def test_chunk_size_is_also_read_under_the_name_runs_recorded(tmp_path):
    """shard_size in an older modpo.toml, or as a flag, is chunk_size; both at once is refused."""
    path = tmp_path / "modpo.toml"
    path.write_text("[generate]\nshard_size = 5\n[score]\nshard_size = 6\n")
    settings = cfg.load_settings(path)
    assert (settings.generate.chunk_size, settings.score.chunk_size) == (5, 6)
    assert cfg.load_settings(path, {"generate": {"chunk_size": 7}}).generate.chunk_size == 7
    path.write_text("[generate]\nshard_size = 5\nchunk_size = 5\n")
    with pytest.raises(ModpoError, match=r"\[generate\].chunk_size and shard_size .* are both set"):
        cfg.load_settings(path)


def _flags(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.output


def test_flags_follow_the_declared_roles():
    generate = _flags("generate")
    assert "--chunk-size" in generate and "--shard-size" in generate
    run = _flags("run")
    assert "--generate-chunk-size" in run and "--generate-shard-size" in run
    for managed in ("--train-out", "--train-policy", "--train-reward-stats", "--generate-out", "--score-out"):
        assert managed not in run  # run sets them per round
    assert "--generate-policy" in run
    evaluate = _flags("eval")
    for skipped in ("--chunk-size", "--shard-size", "--on-invalid-reward"):
        assert skipped not in evaluate


def test_the_old_chunk_flag_sets_chunk_size(tmp_path, monkeypatch):
    """--shard-size, the name of the flag before, reaches the setting (the stage fails later: no policy)."""
    seen = {}

    def load(config, overrides):
        seen.update(overrides["generate"])
        raise ModpoError("stop here")

    monkeypatch.setattr(cfg, "load_settings", load)
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "p.jsonl"), "--shard-size", "3"])
    assert result.exit_code == 1 and seen["chunk_size"] == 3


def test_the_configuration_reference_says_each_settings_role():
    """docs/configuration.md's 'changes results' column is the declaration in words."""
    fields = cfg.SECTION_FIELDS
    assert roles.described(roles.role(fields["train"]["out"])) == "no; `run` sets it"
    assert roles.described(roles.role(fields["generate"]["policy"])) == "by content"
    assert "resumes under another while batch_size x grad_accum" in roles.described(
        roles.role(fields["train"]["grad_accum"]))
    assert roles.described(roles.role(fields["score"]["chunk_size"])) == "no; a killed run resumes only under the same"
    row = next(line for line in cfg.reference_markdown().splitlines() if line.startswith("| `lr_schedule` |"))
    assert "| yes |" in row
