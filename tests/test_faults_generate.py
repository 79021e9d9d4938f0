"""Faults of `generate`: bad prompt files, and interrupted, foreign, damaged or disk-full chunked runs.

Each case goes through the commands as a user runs them (test_faults_*.py, one a stage; conftest.py says more).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FAULTS_MAX_NEW_TOKENS, cli, config, enospc, fails, interrupt, no_leftovers, ok, same_rows

from modpo_pipe import parts, schema


@pytest.fixture(scope="module")
def env(faults_env: Path) -> Path:
    """The fault suites' one shared directory (conftest.faults_env): modpo.toml, prompts, pairs and scored."""
    return faults_env


# ----------------------------------------------------------------------------------------------- prompt files

MAX_NEW_TOKENS = FAULTS_MAX_NEW_TOKENS  # the shared env's [generate].max_new_tokens
CONTEXT = 512  # the tiny models' max_position_embeddings
LONG = "Tell me a story about a brave little robot who learns to paint. " * 30


def _jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD = [{"id": "a", "prompt": "Why is the sky blue?"}, {"id": "b", "prompt": "Count from one to five."}]

# (case, file bytes, extra flags, expected: an error fragment, or the counts the summary and metadata show)
PROMPT_CASES = [
    ("invalid-json", _jsonl(GOOD[0], b'{"id": "x", "prompt": "unterminated', GOOD[1]), [],
     "prompts.jsonl:2: invalid JSON"),
    ("invalid-json-skipped", _jsonl(GOOD[0], b'{"id": "x", "prompt": "unterminated', GOOD[1]), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 1}),
    ("missing-prompt", _jsonl(GOOD[0], {"id": "x"}), [], "prompts.jsonl:2: missing field 'prompt'"),
    ("empty-prompt", _jsonl({"id": "x", "prompt": "  "}, GOOD[1]), [], "prompts.jsonl:1: field 'prompt' is empty"),
    ("non-string-prompt", _jsonl(GOOD[0], {"id": "x", "prompt": 42}), [],
     "prompts.jsonl:2: field 'prompt' must be a string, got int"),
    ("bad-rows-skipped", _jsonl({"id": "x"}, {"prompt": ""}, {"prompt": 1}, *GOOD), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 3}),
    ("duplicate-id", _jsonl(GOOD[0], {"id": "a", "prompt": "again"}), [],
     "prompts.jsonl:2: duplicate id 'a' (first at "),
    ("duplicate-id-skipped", _jsonl(GOOD[0], {"id": "a", "prompt": "again"}, GOOD[1]), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 1}),
    ("empty-file", b"", [], "prompts.jsonl: no prompts"),
    ("blank-lines-only", b"\n \n", [], "prompts.jsonl: no prompts"),
    ("all-invalid-skipped", _jsonl(b"nope", b"{"), ["--skip-invalid"], "no prompts (2 invalid rows skipped)"),
    ("non-utf8", _jsonl(GOOD[0], b'{"prompt": "caf\xe9"}'), [], "prompts.jsonl:2: not valid UTF-8"),
    ("non-utf8-skipped", _jsonl(GOOD[0], b'{"prompt": "caf\xe9"}', GOOD[1]), ["--skip-invalid"],
     {"prompts": 2, "skipped_invalid": 1}),
    ("utf16-file", json.dumps(GOOD[0]).encode("utf-16"), [], "prompts.jsonl:1: not valid UTF-8"),
    ("utf8-bom", b"\xef\xbb\xbf" + _jsonl(*GOOD), [], {"prompts": 2, "skipped_invalid": 0}),
    ("long-prompt-dropped", _jsonl(GOOD[0], {"id": "long", "prompt": LONG}, GOOD[1]), [],
     {"prompts": 2, "long_prompts_dropped": 1}),
    ("long-prompt-truncated", _jsonl(GOOD[0], {"id": "long", "prompt": LONG}, GOOD[1]), ["--long-prompts", "truncate"],
     {"prompts": 3, "long_prompts_truncated": 1}),
    ("every-prompt-too-long", _jsonl({"prompt": LONG}), [], "every prompt is longer than 506 tokens"),
    ("no-room-in-context", _jsonl(*GOOD), ["--max-new-tokens", CONTEXT],
     "[generate].max_new_tokens=512 leaves no room for a prompt in the policy's context of 512 tokens"),
]


@pytest.mark.parametrize(("case", "content", "flags", "expected"), PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_prompt_file_cases(env, tmp_path, tiny_tokenizer, case, content, flags, expected):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.parquet"
    prompts.write_bytes(content)
    args = ["generate", prompts, *config(env), "--out", out, "--samples-per-prompt", 2, *flags]
    if isinstance(expected, str):
        line = fails(args, expected)
        if case != "no-room-in-context":
            assert str(prompts) in line  # the error names the file
        assert not out.exists() and not parts.work_dir(out).exists()
        return
    output = ok(args)
    table, meta = schema.read_table(out, "pairs")
    for key, value in expected.items():
        assert meta["counts"][key] == value, (key, meta["counts"])
    assert table.num_rows == expected["prompts"]
    labels = {"skipped_invalid": "skipped invalid prompts", "long_prompts_dropped": "long prompts dropped",
              "long_prompts_truncated": "long prompts truncated"}
    for key, label in labels.items():
        assert f"{label}: {meta['counts'][key]}" in output
    if case.startswith("long-prompt"):
        # Longer than the context leaves for a response: max_prompt_tokens (1024) alone would keep it.
        rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": LONG}], tokenize=False,
                                                      add_generation_prompt=True)
        assert CONTEXT - MAX_NEW_TOKENS < len(tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]) < 1024
        assert meta["sampling"]["prompt_token_limit"] == CONTEXT - MAX_NEW_TOKENS
        lengths = {r["prompt_id"]: len(r["prompt_ids"]) for r in table.to_pylist()}
        if case == "long-prompt-truncated":
            assert lengths["long"] == CONTEXT - MAX_NEW_TOKENS
        else:
            assert "long" not in lengths


# ----------------------------------------------------------------------------------------- resumable generate


def _generate(env: Path, out: Path, *flags) -> list:
    return ["generate", env / "prompts.jsonl", *config(env), "--shard-size", 2, "--out", out, *flags]


def test_interrupted_generate_resumes_with_the_same_rows(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    interrupt(monkeypatch, generate, "sample", after=2)
    result = cli(_generate(env, out))
    assert isinstance(result.exception, RuntimeError)
    work = parts.work_dir(out)
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "part-00000.parquet", "part-00001.parquet"]
    assert not out.exists()
    monkeypatch.undo()
    calls = interrupt(monkeypatch, generate, "sample", after=10)
    output = ok(_generate(env, out))
    assert calls["n"] == 1  # only the unfinished chunk is sampled again
    assert f"resuming: 2 of 3 chunks already done in {work}" in output
    assert "chunks (reused from a killed run): 3 (2)" in output
    same_rows(out, chunked["pairs"])
    no_leftovers(out)


@pytest.mark.parametrize(("flags", "differs"), [
    (["--seed", 1], "seed"),
    (["--temperature", 0.7], "sampling"),
    (["--shard-size", 3], "shard_size"),
    (["--samples-per-prompt", 2], "sampling"),
])
def test_parts_of_another_run_are_refused_never_merged(env, chunked, tmp_path, monkeypatch, flags, differs):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    interrupt(monkeypatch, generate, "sample", after=1)
    cli(_generate(env, out))
    monkeypatch.undo()
    work = parts.work_dir(out)
    before = sorted(p.name for p in work.iterdir())
    fails([*_generate(env, out), *flags],
          f"{work} holds the unfinished parts of another run of this stage (it differs in: {differs}")
    assert sorted(p.name for p in work.iterdir()) == before and not out.exists()
    if differs == "seed":
        ok(_generate(env, out))  # the run they belong to finishes them
        same_rows(out, chunked["pairs"])


def test_other_prompts_are_a_different_run(env, tmp_path, monkeypatch):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(env / "prompts.jsonl", prompts)
    interrupt(monkeypatch, generate, "sample", after=1)
    cli(["generate", prompts, *config(env), "--shard-size", 2, "--out", out])
    monkeypatch.undo()
    with open(prompts, "a") as f:
        f.write(json.dumps({"id": "new", "prompt": "One more?"}) + "\n")
    fails(["generate", prompts, *config(env), "--shard-size", 2, "--out", out], "(it differs in: prompts)")


@pytest.mark.parametrize("damage", ["truncated", "foreign", "wrong-rows"])
def test_a_damaged_part_is_redone_not_merged(env, chunked, tmp_path, monkeypatch, damage):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    interrupt(monkeypatch, generate, "sample", after=2)
    cli(_generate(env, out))
    monkeypatch.undo()
    part = parts.work_dir(out) / "part-00001.parquet"
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:200])
    elif damage == "foreign":  # a part with another run's key
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({parts.PART_KEY: b'{"run": "other", "name": "part-00001"}'}),
                       part)
    else:
        table = pq.read_table(part)
        pq.write_table(table.slice(0, 1).replace_schema_metadata(table.schema.metadata), part)
    calls = interrupt(monkeypatch, generate, "sample", after=10)
    output = ok(_generate(env, out))
    assert calls["n"] == 2  # the damaged chunk and the unfinished one
    assert f"{part}: " in output and "computing it again" in output
    same_rows(out, chunked["pairs"])
    no_leftovers(out)


def disk_fills_on(matches):
    """pq.write_table that leaves half a file and raises ENOSPC for the paths `matches` accepts."""
    real = pq.write_table

    def write_table(table, where, *args, **kwargs):
        if matches(where):
            Path(where).write_bytes(b"PAR1 half a file")
            enospc()
        return real(table, where, *args, **kwargs)

    return write_table


def test_disk_full_while_writing_a_part(env, chunked, tmp_path, monkeypatch):
    out = tmp_path / "pairs.parquet"
    monkeypatch.setattr(pq, "write_table", disk_fills_on(lambda where: "part-00001" in str(where)))
    work = parts.work_dir(out)
    fails(_generate(env, out), f"cannot write {work / 'part-00001.parquet'}: No space left on device; the "
                               f"finished parts in {work} are kept: rerun the same command to continue from them")
    assert sorted(p.name for p in work.iterdir()) == ["manifest.json", "part-00000.parquet"]  # no half part
    monkeypatch.undo()
    output = ok(_generate(env, out))
    assert "resuming: 1 of 3 chunks" in output
    same_rows(out, chunked["pairs"])


def test_disk_full_while_merging_keeps_every_part(env, chunked, tmp_path, monkeypatch):
    import modpo_pipe.generate as generate

    out = tmp_path / "pairs.parquet"
    monkeypatch.setattr(pq, "write_table",
                        disk_fills_on(lambda where: Path(where).name.startswith(".pairs.parquet.tmp")))
    work = parts.work_dir(out)
    fails(_generate(env, out), f"cannot write {out}: No space left on device; the parts in {work} are kept: "
                               "rerun the same command to merge them")
    assert not out.exists() and not list(tmp_path.glob(".pairs.parquet.tmp*"))
    assert len(list(work.glob("part-*.parquet"))) == 3
    monkeypatch.undo()
    calls = interrupt(monkeypatch, generate, "sample", after=0)
    ok(_generate(env, out))
    assert calls["n"] == 0  # nothing sampled again: only merged
    same_rows(out, chunked["pairs"])
    no_leftovers(out)


def test_one_vllm_engine_length_for_every_chunk(env, tmp_path, monkeypatch):
    """Each chunk sized the vLLM engine by its own prompts, so a chunk with a longer prompt than the ones before
    restarted the engine. Every chunk now asks for the length the longest prompt of the run needs."""
    from modpo_pipe.generate import Sample
    from modpo_pipe.generate import vllm as vllm_backend

    asked: list[int] = []

    def engine(model_path, prompt_ids, n, *, max_model_len, max_new_tokens, **kwargs):  # records, samples nothing
        asked.append(max_model_len)
        return [[Sample(ids=[5], finish_reason="length", logp=None)] * n for _ in prompt_ids]

    monkeypatch.setattr(vllm_backend, "sample_vllm", engine)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "word " * k}) + "\n" for k in (1, 12, 3, 30, 2)))
    ok(["generate", prompts, *config(env), "--backend", "vllm", "--shard-size", 1, "--out", tmp_path / "p.parquet"])
    table = pq.read_table(tmp_path / "p.parquet")
    longest = max(len(ids) for ids in table.column("prompt_ids").to_pylist())
    assert asked == [longest + FAULTS_MAX_NEW_TOKENS] * 5
    fails(["generate", prompts, *config(env), "--backend", "vllm", "--vllm-max-model-len", 100_000,
           "--out", tmp_path / "q.parquet"], "[generate].vllm_max_model_len=100000 is beyond the policy's context")
