"""Reading prompt files (JSONL, Parquet, saved datasets) and rendering prompts for the policy."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modpo_pipe.errors import ModpoError
from modpo_pipe.prompts import PromptFields, PromptRecord, read_prompts, render

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def write_jsonl(path: Path, lines: list[str | dict]) -> Path:
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def prompt_error(path: Path, skip_invalid: bool = False) -> str:
    with pytest.raises(ModpoError) as excinfo:
        read_prompts(path, skip_invalid=skip_invalid)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------- formats


def test_jsonl_with_prompts_chats_and_optional_ids(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "What is 2+2?"},
        "",  # blank lines are skipped
        {"messages": [{**CHAT[0], "name": "ignored"}, CHAT[1]]},
        {"id": 7, "prompt": "Seven", "extra": "ignored"},
        {"prompt": "No id", "messages": None},
    ])
    records, stats = read_prompts(path)
    assert [r.id for r in records] == ["a", "row-000001", "7", "row-000003"]
    assert records[0] == PromptRecord("a", prompt="What is 2+2?")
    assert records[1].messages == CHAT and records[1].prompt is None
    assert records[2].prompt == "Seven"
    assert records[3].prompt == "No id"
    assert stats.read == 4 and stats.skipped_invalid == 0


def test_parquet_input(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": "x", "prompt": "Plain", "messages": None},
        {"id": "y", "prompt": None, "messages": CHAT},
    ]), path)
    records, stats = read_prompts(path)
    assert records == [PromptRecord("x", prompt="Plain"), PromptRecord("y", messages=CHAT)]
    assert stats.read == 2


def test_parquet_error_names_the_row(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["ok", "", "fine"]}), path)
    assert f"{path}: row 1: field 'prompt' is empty" in prompt_error(path)


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 definitely not parquet")
    assert f"{path}: not a readable Parquet file" in prompt_error(path)


def test_saved_datasets_directory(tmp_path):
    import datasets

    directory = tmp_path / "ds"
    datasets.Dataset.from_list([{"id": "d0", "prompt": "First"}, {"id": "d1", "prompt": "Second"}]).save_to_disk(
        str(directory))
    records, stats = read_prompts(directory)
    assert records == [PromptRecord("d0", prompt="First"), PromptRecord("d1", prompt="Second")]
    assert stats.read == 2


def test_saved_dataset_dict_with_one_split_and_with_several(tmp_path):
    import datasets

    one = datasets.Dataset.from_list([{"prompt": "Only"}])
    datasets.DatasetDict({"train": one}).save_to_disk(str(tmp_path / "single"))
    records, _ = read_prompts(tmp_path / "single")
    assert records == [PromptRecord("row-000000", prompt="Only")]

    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "multi"))
    message = prompt_error(tmp_path / "multi")
    assert "holds splits" in message and "'train'" in message and "'test'" in message and "--split" in message
    # --split chooses one (it was ignored, and the message said to save the split on its own)
    other = datasets.Dataset.from_list([{"prompt": "Held out"}])
    datasets.DatasetDict({"train": one, "test": other}).save_to_disk(str(tmp_path / "chosen"))
    records, _ = read_prompts(tmp_path / "chosen", fields=PromptFields(split="test"))
    assert records == [PromptRecord("row-000000", prompt="Held out")]
    with pytest.raises(ModpoError, match=r"no split 'dev'; it holds \['train', 'test'\]"):
        read_prompts(tmp_path / "chosen", fields=PromptFields(split="dev"))


def test_trailing_assistant_turns_are_dropped_from_every_source(tmp_path):
    """They were dropped from Hub datasets only: the same chats as JSONL, Parquet or a saved dataset kept the
    reference reply in the prompt, and the policy wrote a second reply after it."""
    import datasets

    chat = [*CHAT, {"role": "assistant", "content": "REFERENCE REPLY"}]
    rows = [{"id": "c0", "chosen": chat}]
    write_jsonl(tmp_path / "chats.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    fields = PromptFields(messages="chosen")
    for source in ("chats.jsonl", "chats.parquet", "saved"):
        records, _ = read_prompts(tmp_path / source, fields=fields)
        assert records == [PromptRecord("c0", messages=CHAT)], source
    write_jsonl(tmp_path / "only-replies.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    assert "'messages' holds assistant turns only" in prompt_error(tmp_path / "only-replies.jsonl")


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    assert f"{tmp_path / 'junk'}: not a saved datasets directory" in prompt_error(tmp_path / "junk")


def test_missing_file(tmp_path):
    assert "no such file" in prompt_error(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------- bad rows


def test_invalid_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, "", '{"prompt": "unterminated'])
    message = prompt_error(path)
    assert message.startswith(f"{path}:3: invalid JSON")  # line 3: blank lines still count


def test_skip_invalid_skips_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "good"},
        "{not json",
        {"id": "b", "text": "no prompt field"},
        {"id": "c", "prompt": 42},
        {"id": "a", "prompt": "duplicate id"},
        {"id": "d", "prompt": "   "},
        "[1, 2]",
        {"id": "e", "messages": []},
        {"id": "f", "prompt": "also good"},
    ])
    records, stats = read_prompts(path, skip_invalid=True)
    assert [r.id for r in records] == ["a", "f"]
    assert records[0].prompt == "good"
    assert stats.read == 2 and stats.skipped_invalid == 7


def test_all_rows_invalid_with_skip(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["{bad", {"prompt": ""}])
    assert f"{path}: no prompts (2 invalid rows skipped)" in prompt_error(path, skip_invalid=True)


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"id": "x", "text": "hi"}, "missing field 'prompt' (or 'messages')"),
        ({"prompt": ""}, "field 'prompt' is empty"),
        ({"prompt": " \n\t"}, "field 'prompt' is empty"),
        ({"prompt": 12}, "field 'prompt' must be a string, got int"),
        ({"prompt": ["a", "b"]}, "field 'prompt' must be a string, got list"),
        ({"prompt": None}, "field 'prompt' must be a string, got NoneType"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, "'messages' must be a non-empty list"),
        ({"messages": "hello"}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": " "}]}, "'messages' has no text besides a system message"),
        ({"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": ""}]},
         "'messages' has no text besides a system message"),
        ({"id": "", "prompt": "fine"}, "field 'id' is empty"),
        ({"id": "  ", "messages": [{"role": "user", "content": "hi"}]}, "field 'id' is empty"),
        ("[1, 2]", "expected an object with 'prompt' or 'messages'"),
        ('"just a string"', "expected an object"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, row, fragment):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    message = prompt_error(path)
    assert message.startswith(f"{path}:2: ")
    assert fragment in message


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "1"}, {"id": "b", "prompt": "2"},
                                              {"id": "a", "prompt": "3"}])
    assert f"{path}:3: duplicate id 'a' (first at {path}:1)" in prompt_error(path)


def test_default_ids_do_not_collide_with_each_other(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": str(i)} for i in range(3)])
    records, _ = read_prompts(path)
    assert len({r.id for r in records}) == 3


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    message = prompt_error(path)
    assert message == f"{path}: no prompts"


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "caf\xe9"}\n')
    assert prompt_error(path) == f"{path}:3: not valid UTF-8"


def test_unicode_line_separator_inside_a_json_string(tmp_path):
    # U+2028/U+2029 are legal unescaped inside JSON strings (json.dumps(..., ensure_ascii=False) writes them
    # raw), but str.splitlines() also breaks lines there: JSONL must be split on "\n" only.
    path = tmp_path / "p.jsonl"
    lines = [{"id": "a", "prompt": "first\u2028second"}, {"id": "b", "prompt": "third"}]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    records, _ = read_prompts(path)
    assert [r.prompt for r in records] == ["first\u2028second", "third"]


def test_windows_line_endings(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "one"}\r\n{"prompt": "two"}\r\n')
    records, _ = read_prompts(path)
    assert [r.prompt for r in records] == ["one", "two"]


# -------------------------------------------------------------------------------------------- render


@pytest.fixture
def bos_tokenizer(tiny):
    """The tiny policy's tokenizer, changed to add BOS itself and to have a template that writes BOS too,
    as Llama-style tokenizers do: the case where a second BOS could slip in."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.policy)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    return tok


def test_render_plain_prompt_with_and_without_chat_template(tiny_tokenizer):
    record = PromptRecord("a", prompt="Why is the sky blue?")
    chat_text, chat_ids = render(record, tiny_tokenizer, use_chat_template=True)
    plain_text, plain_ids = render(record, tiny_tokenizer, use_chat_template=False)
    assert chat_text == "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    assert plain_text == "Why is the sky blue?"
    assert chat_text != plain_text and chat_ids != plain_ids
    assert chat_ids == tiny_tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    assert plain_ids == tiny_tokenizer(plain_text)["input_ids"]
    assert tiny_tokenizer.decode(chat_ids) == chat_text


def test_chat_template_path_does_not_add_a_second_bos(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert bos_tokenizer("hi")["input_ids"][0] == bos  # the tokenizer adds BOS itself
    for record in (PromptRecord("a", prompt="Hello"), PromptRecord("b", messages=CHAT)):
        text, ids = render(record, bos_tokenizer, use_chat_template=True)
        assert text.startswith(bos_tokenizer.bos_token)
        assert ids == bos_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[0] == bos and ids.count(bos) == 1
    # the plain path keeps the tokenizer's own special tokens
    text, ids = render(PromptRecord("c", prompt="Hello"), bos_tokenizer, use_chat_template=False)
    assert text == "Hello" and ids[0] == bos and ids.count(bos) == 1


def test_chat_records_always_use_the_template(tiny_tokenizer):
    text, ids = render(PromptRecord("c", messages=CHAT), tiny_tokenizer, use_chat_template=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there")
    assert text.endswith("<|im_start|>assistant\n")
    assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_no_chat_template(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.policy)
    tok.chat_template = None
    text, ids = render(PromptRecord("a", prompt="Hello"), tok, use_chat_template=True)
    assert text == "Hello" and ids == tok("Hello")["input_ids"]
    with pytest.raises(ModpoError, match="prompt 'b' is a chat but the policy's tokenizer has no chat template"):
        render(PromptRecord("b", messages=CHAT), tok, use_chat_template=True)


def test_a_folder_of_data_files_in_several_formats_is_refused(tmp_path):
    """load_dataset read the folder's files of one format and dropped the others: 2 of 3 prompts lost, unsaid."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    pq.write_table(pa.table({"id": ["c"], "prompt": ["z"]}), folder / "c.parquet")
    message = prompt_error(folder)
    assert message.startswith(f"{folder}: holds data files of 2 formats (json: a.jsonl; parquet: c.parquet)")
    (folder / "c.parquet").unlink()
    write_jsonl(folder / "b.json", [{"id": "d", "prompt": "w"}])  # .json and .jsonl: both read as json
    assert [r.id for r in read_prompts(folder)[0]] == ["a", "b", "d"]


@pytest.mark.parametrize("stage", ["pairs", "scored"])
def test_a_file_of_the_pipeline_is_no_prompts_file(tmp_path, stage):
    """A pairs file read as prompts: its rendered prompts were rendered again, its ids replaced by row numbers."""
    path = tmp_path / f"{stage}.parquet"
    table = pa.table({"prompt_id": ["p0"], "prompt": ["<|im_start|>user\nHi<|im_end|>\n"]})
    pq.write_table(table.replace_schema_metadata({b"modpo_pipe": json.dumps({"stage": stage}).encode()}), path)
    assert prompt_error(path).startswith(f"{path}: a {stage!r} file written by modpo-pipe, not a prompts file")


@pytest.mark.parametrize(("line", "fragment"), [
    ('{"id": "a", "prompt": "x", "n": ' + "9" * 5000 + "}", "JSON this reader refuses (ValueError: "),
    ('{"id": "a", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON this reader refuses (RecursionError: "),
])
def test_json_python_will_not_read_is_an_error_of_its_line(tmp_path, line, fragment):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "ok", "prompt": "fine"}, line])
    assert prompt_error(path).startswith(f"{path}:2: {fragment}")
    assert [r.id for r in read_prompts(path, skip_invalid=True)[0]] == ["ok"]  # skippable, as any bad line


def test_errors_name_the_fields_as_configured(tmp_path):
    """With --prompt-field text, a row without it was said to miss 'prompt', the field it did have."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}])
    with pytest.raises(ModpoError, match=r":1: missing field 'text' \(or 'chat'\)$"):
        read_prompts(path, fields=PromptFields(prompt="text", messages="chat"))
    path = write_jsonl(tmp_path / "q.jsonl", [{"key": "", "text": "x"}])
    with pytest.raises(ModpoError, match=r":1: field 'key' is empty"):
        read_prompts(path, fields=PromptFields(prompt="text", id="key"))


def test_a_split_given_for_a_file_says_it_does_not_apply(tmp_path, capsys):
    """[generate].split = "test" with a JSONL file read every row, without a word."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    assert len(read_prompts(path, fields=PromptFields(split="test"))[0]) == 2
    assert "is one file, with no splits: [generate].split 'test' does not apply" in capsys.readouterr().err
    read_prompts(path)
    assert capsys.readouterr().err == ""
