"""The Python API (modpo_pipe.api): the same files as the commands, from keyword settings, a Settings object or a
config file, with prompts as a path, a list of dicts or a datasets.Dataset; examples/python_api.py runs as a user
would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import ok, rows_of, same_rows

from modpo_pipe import api
from modpo_pipe.errors import ModpoError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "python_api.py"
MAX_NEW_TOKENS = 6


def metadata(path: Path, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """A stage file's metadata but the time it was written and the keys `leave_out`."""
    from modpo_pipe.schema import METADATA_KEY

    meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    return {key: value for key, value in meta.items() if key not in ("created", *leave_out)}


def same_files(ours: Path, theirs: Path, leave_out: tuple[str, ...] = ()) -> None:
    """The same rows, and the same metadata but for the keys `leave_out` (the paths of inputs that differ)."""
    same_rows(ours, theirs)
    assert metadata(ours, leave_out) == metadata(theirs, leave_out)


def same_weights(ours: Path, theirs: Path) -> None:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def example_and_cli(tiny, tmp_path_factory) -> dict[str, Path]:
    """examples/python_api.py run as a script on the tiny policy, and the three commands given its settings as
    flags and the prompts file it wrote."""
    ex, cli = tmp_path_factory.mktemp("example"), tmp_path_factory.mktemp("cli")
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tiny.policy), "--out", str(ex), "--prompts", "5",
                           "--max-new-tokens", str(MAX_NEW_TOKENS)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=ex)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train: 1 steps" in done.stdout, done.stdout
    ok(["generate", ex / "pairs.prompts.jsonl", "--policy", tiny.policy, "--samples-per-prompt", 2,
        "--max-new-tokens", MAX_NEW_TOKENS, "--out", cli / "pairs.parquet"], cli)
    ok(["score", cli / "pairs.parquet", "--reward", f"length=py:{EXAMPLE}:reward_len",
        "--reward", "concise=py:modpo_pipe.builtin_rewards:concision", "--out", cli / "scored.parquet"], cli)
    ok(["train", cli / "scored.parquet", "--weights", "length=0.5,concise=0.5", "--beta", 0.1,
        "--out", cli / "checkpoints"], cli)
    return {"example": ex, "cli": cli}


def test_the_example_writes_the_files_the_commands_write(example_and_cli):
    ex, cli = example_and_cli["example"], example_and_cli["cli"]
    written = [json.loads(line) for line in (ex / "pairs.prompts.jsonl").read_text().splitlines()]
    first_five = [json.loads(line) for line in (REPO / "examples" / "prompts.jsonl").read_text().splitlines()[:5]]
    assert written == first_five  # the list of dicts, as the prompts file the pairs metadata names
    assert metadata(ex / "pairs.parquet")["prompts_file"] == str(ex / "pairs.prompts.jsonl")
    same_files(ex / "pairs.parquet", cli / "pairs.parquet")
    # Score's resume key hashes its pairs file, whose bytes hold the time it was written.
    same_files(ex / "scored.parquet", cli / "scored.parquet", leave_out=("pairs_file", "run_key"))
    same_weights(ex / "checkpoints" / "final", cli / "checkpoints" / "final")
    # The same target and record, but for the paths of the files and what hashes their bytes.
    ours, theirs = (json.loads((d / "checkpoints" / "final" / "modpo_pipe.json").read_text()) for d in (ex, cli))
    assert ours.pop("scored_files") == [str(ex / "scored.parquet")]
    assert theirs.pop("scored_files") == [str(cli / "scored.parquet")]
    for record in (ours, theirs):
        record.pop("run_fingerprint")
        record["target"]["reward_stats"].pop("from")
        record["settings"]["train"].pop("out")
    assert ours == theirs


def test_a_settings_object_a_config_file_and_keywords_score_as_the_command(example_and_cli, tmp_path, monkeypatch):
    cli = example_and_cli["cli"]
    monkeypatch.chdir(tmp_path)  # no ./modpo.toml: keywords alone
    rewards = {"length": f"py:{EXAMPLE}:reward_len", "concise": "py:modpo_pipe.builtin_rewards:concision"}
    toml = tmp_path / "settings.toml"
    toml.write_text(f'[score]\nreward_batch_size = 3\n[score.rewards]\nlength = "py:{EXAMPLE}:reward_len"\n'
                    'concise = "py:modpo_pipe.builtin_rewards:concision"\n')
    from_keywords = api.score(cli / "pairs.parquet", tmp_path / "keywords.parquet", rewards=rewards)
    from_file = api.score(cli / "pairs.parquet", tmp_path / "file.parquet", config=toml)
    # A Settings, with a keyword on top (its reward_batch_size is the file's 3; a batch size changes no score).
    chosen = api.settings(toml)
    assert chosen.score.reward_batch_size == 3 and chosen.score.rewards == rewards
    from_object = api.score(cli / "pairs.parquet", settings=chosen, out=tmp_path / "object.parquet",
                            reward_batch_size=5)
    assert chosen.score.reward_batch_size == 3  # the object given is left as it was
    for report in (from_keywords, from_file, from_object):
        assert not report.up_to_date and report.groups == 5
        same_files(Path(report.out), cli / "scored.parquet")


def test_a_settings_object_trains_as_the_command(example_and_cli, tmp_path):
    cli = example_and_cli["cli"]
    chosen = api.settings(train={"weights": {"length": 0.5, "concise": 0.5}, "beta": 0.1})
    report = api.train([cli / "scored.parquet"], tmp_path / "checkpoints", settings=chosen)
    assert report.steps == 1 and report.out == str(tmp_path / "checkpoints")
    same_weights(tmp_path / "checkpoints" / "final", cli / "checkpoints" / "final")
    again = api.train(cli / "scored.parquet", tmp_path / "checkpoints", settings=chosen)  # one path, not a list
    assert again.up_to_date


PROMPT_ROWS = [
    {"id": "capital", "prompt": "What is the capital of France?", "answer": "Paris"},
    {"prompt": "Tell me a story about a robot."},  # no id: row-000001, as in a prompts file
    {"id": "chat", "messages": [{"role": "user", "content": "Why is the sky blue?"}], "answer": "Rayleigh"},
]


@pytest.mark.parametrize("as_dataset", [False, True], ids=["list of dicts", "datasets.Dataset"])
def test_prompts_in_python_give_the_pairs_of_a_prompts_file(tiny, tmp_path, as_dataset):
    import datasets

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in PROMPT_ROWS))
    ok(["generate", "prompts.jsonl", "--policy", tiny.policy, "--max-new-tokens", MAX_NEW_TOKENS,
        "--out", "cli.parquet"], tmp_path)
    # (Dataset.from_list keeps only the first row's keys: the columns are given whole)
    columns = {key: [row.get(key) for row in PROMPT_ROWS] for key in ("id", "prompt", "messages", "answer")}
    prompts = datasets.Dataset.from_dict(columns) if as_dataset else PROMPT_ROWS
    report = api.generate(prompts, tmp_path / "api.parquet", policy=tiny.policy, max_new_tokens=MAX_NEW_TOKENS)
    assert (report.prompts, report.groups) == (3, 3)
    same_rows(tmp_path / "api.parquet", tmp_path / "cli.parquet")
    rows = rows_of(tmp_path / "api.parquet")
    assert [r["prompt_id"] for r in rows] == ["capital", "row-000001", "chat"]
    assert json.loads(rows[0]["prompt_columns"]) == {"answer": "Paris"}  # other fields travel, as from a file
    written = tmp_path / ("api.prompts.parquet" if as_dataset else "api.prompts.jsonl")
    assert metadata(tmp_path / "api.parquet")["prompts_file"] == str(written)
    # The resume key hashes the prompts as read: a column's null (a Dataset row without an answer) is no missing
    # field (a JSON line without one), though both write the same rows.
    leave_out = ("prompts_file", "run_key") if as_dataset else ("prompts_file",)
    assert metadata(tmp_path / "api.parquet", leave_out) == metadata(tmp_path / "cli.parquet", leave_out)
    again = api.generate(prompts, tmp_path / "api.parquet", policy=tiny.policy, max_new_tokens=MAX_NEW_TOKENS)
    assert again.up_to_date  # the same prompts written again are the same prompts


def test_run_advances_a_run_directory_as_the_command(tiny, tmp_path):
    from conftest import one_round_run

    run_dir = one_round_run(tmp_path / "cli", tiny, "length", tiny.reward_fn)
    ok(["run", "--workdir", run_dir])
    prompts = [json.loads(line) for line in tiny.prompts.read_text().splitlines()]
    report = api.run(tmp_path / "api", prompts=prompts, rounds=1, device="cpu",
                     generate={"policy": tiny.policy, "backend": "transformers", "max_new_tokens": 4,
                               "samples_per_prompt": 2},
                     score={"rewards": {"length": tiny.reward_fn}})
    assert report.ran == ["round-000 generate", "round-000 score", "round-000 train"] and report.due is None
    for name in ("pairs.parquet", "scored.parquet"):
        same_rows(tmp_path / "api" / "round-000" / name, run_dir / "round-000" / name)
    assert (tmp_path / "api" / "run.prompts.jsonl").is_file()
    assert api.run(tmp_path / "api", prompts=prompts, rounds=1, device="cpu",
                   generate={"policy": tiny.policy, "backend": "transformers", "max_new_tokens": 4,
                             "samples_per_prompt": 2},
                   score={"rewards": {"length": tiny.reward_fn}}).ran == []  # all done: nothing to do
    # Continued by the command once its modpo.toml holds the same settings (docs/python-api.md): nothing to redo.
    from modpo_pipe.config import render_settings

    same = api.settings(model={"device": "cpu"}, run={"rounds": 1, "prompts": tmp_path / "api" / "run.prompts.jsonl"},
                        generate={"policy": tiny.policy, "backend": "transformers", "max_new_tokens": 4,
                                  "samples_per_prompt": 2},
                        score={"rewards": {"length": tiny.reward_fn}})
    (tmp_path / "api" / "modpo.toml").write_text(render_settings(same))
    assert "all 1 rounds done; nothing to do" in ok(["run", "--workdir", tmp_path / "api"])


@pytest.mark.parametrize("call, fragment", [
    (lambda: api.train("s.parquet", betta=0.2), "train(): unknown keyword 'betta' (did you mean 'beta'?)"),
    (lambda: api.score("p.parquet", reward={"a": "py:x.py:f"}), "score(): unknown keyword 'reward' (did you mean "
                                                                 "'rewards'?)"),
    (lambda: api.generate([{"prompt": "hi"}], rewards={}),
     "generate(): unknown keyword 'rewards': it is a key of [score], which generate() does not read"),
    (lambda: api.run("w", beta=0.2),
     "run(): unknown keyword 'beta': it is a key of [train], which run() does not read; give it as "
     "run(train={'beta': ...})"),
    (lambda: api.run("w", train={"betta": 0.2}), "run(): unknown train= key 'betta' (did you mean 'beta'?)"),
    (lambda: api.run("w", train={"out": "x"}), "run(): [train].out is set by the run for each round"),
    (lambda: api.settings(generate={"nope": 1}), "settings(): unknown generate= key 'nope'"),
    (lambda: api.train("s.parquet", beta="high"), "keywords of train(): [train].beta must be float, got str 'high'"),
    (lambda: api.train("s.parquet", settings={"beta": 1}), "train(): settings= must be a modpo_pipe.config.Settings"),
    (lambda: api.train("s.parquet", settings=api.settings(), config="modpo.toml"), "give settings= or config="),
    (lambda: api.generate([{"prompt": "hi"}, "hello"], policy="p"), "prompts[1]: expected a dict"),
    (lambda: api.generate([{"prompt": float("nan")}], policy="p"), "prompts[0]: not JSON"),
    (lambda: api.generate(42, policy="p"), "prompts must be a path, a list of dicts or a datasets.Dataset; got int"),
])
def test_a_bad_keyword_or_value_is_one_line_naming_it(call, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModpoError) as e:
        call()
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_refused_settings_leave_no_prompts_file_behind(tmp_path):
    with pytest.raises(ModpoError, match="unknown keyword 'betta'"):
        api.generate([{"prompt": "hi"}], tmp_path / "pairs.parquet", policy="p", betta=0.2)
    with pytest.raises(ModpoError, match="unknown keyword 'beta'"):
        api.run(tmp_path / "run", prompts=[{"prompt": "hi"}], beta=0.2)
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_dict_is_refused_naming_its_splits(tmp_path):
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "hi"}]),
                                   "test": datasets.Dataset.from_list([{"prompt": "ho"}])})
    with pytest.raises(ModpoError, match=r"a DatasetDict of splits \['train', 'test'\]; give one split"):
        api.generate(splits, tmp_path / "pairs.parquet", policy="p")


def test_the_api_is_the_package_attribute_whatever_was_imported_before():
    import modpo_pipe
    import modpo_pipe.generate
    import modpo_pipe.score
    import modpo_pipe.train  # noqa: F401  (the stage modules: the reason the functions live in api)

    assert modpo_pipe.api is api
    assert callable(api.generate) and callable(api.score) and callable(api.train) and callable(api.run)
