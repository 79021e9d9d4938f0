"""Reading prompts (JSONL, Parquet, a saved `datasets` directory) and rendering them for the policy."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modpo_pipe.errors import ModpoError


@dataclass
class PromptRecord:
    id: str
    prompt: str | None = None  # plain text ...
    messages: list[dict[str, str]] | None = None  # ... or a chat
    # The row's other fields (a reference answer, a task label ...): TRL-style reward functions get them as
    # keyword arguments, as TRL passes a dataset's columns. JSON values; the prompt, messages and id are not here.
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptFields:
    """Which split and columns hold the prompts (`generate --split --prompt-field --messages-field --id-field`);
    the defaults read the fields of modpo-pipe's own prompt files."""

    split: str = ""
    prompt: str = "prompt"
    messages: str = "messages"
    id: str = "id"

    def remap(self, obj: Any) -> Any:
        """A row with its fields under modpo-pipe's names (a row that is no object is left for _record); its other
        fields under `columns`."""
        if not isinstance(obj, dict):
            return obj
        ours = {mine: obj[theirs] for mine, theirs in (("id", self.id), ("prompt", self.prompt),
                                                       ("messages", self.messages)) if theirs in obj}
        return {**ours, "columns": self.others(obj)}

    def others(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The fields of a row that are not its prompt, chat or id (nor named prompt, messages or id, which a round's
        prompts.jsonl spells with modpo-pipe's own names)."""
        taken = {self.id, self.prompt, self.messages, "id", "prompt", "messages"}
        return {key: value for key, value in obj.items() if key not in taken}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Data files by suffix, and the format `datasets` reads each as (one format per folder).
_DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
                 ".arrow": "arrow"}
_FILE_SUFFIXES = tuple(_DATA_FORMATS)


def is_hub_id(text: str | None) -> bool:
    """`name` or `owner/name` as the Hub spells repositories; paths (absolute, ./, ~, a file suffix) are not."""
    return bool(text) and bool(_HUB_ID.match(str(text))) and not str(text).endswith(_FILE_SUFFIXES)


def is_dataset_source(path: Path) -> bool:
    """Read through `datasets.load_dataset`: a Hub dataset id that is no local path, or a local folder of data
    files laid out as on the Hub (data/train-00000-of-00001.parquet ...) that `save_to_disk` did not write."""
    if not path.exists():
        return is_hub_id(str(path))
    saved = any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))
    return path.is_dir() and not saved and any(
        f.suffix in _FILE_SUFFIXES for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))


def dataset_rows(source: str, fields: PromptFields) -> list[tuple[str, Any]]:
    """(location, row) per row of one split of a dataset, by `datasets.load_dataset` (Hub id, cache, or local
    folder). A dataset that is neither cached nor downloadable is one line, saying so."""
    from datasets import load_dataset

    if Path(source).is_dir():
        _refuse_mixed_formats(Path(source))
    try:
        ds = load_dataset(source, split=fields.split or None)
    except (ConnectionError, FileNotFoundError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModpoError(f"{source}: no such file, and no dataset of that name in the Hugging Face cache that "
                         f"could be loaded, nor downloaded ({first})") from None
    except ValueError as e:  # an unknown split, a bad config
        raise ModpoError(f"{source}: {str(e).strip().splitlines()[0]}") from None
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModpoError(f"{source}: cannot load the dataset: {type(e).__name__}: {message}") from None
    if hasattr(ds, "keys"):  # no --split: take the only split, or refuse to guess
        splits = list(ds.keys())
        if len(splits) != 1:
            raise ModpoError(f"{source}: holds splits {splits}; choose one with --split")
        fields = PromptFields(splits[0], fields.prompt, fields.messages, fields.id)
        ds = ds[splits[0]]
    columns = set(ds.column_names)
    wanted = [c for c in (fields.prompt, fields.messages) if c in columns]
    if not wanted:
        raise ModpoError(f"{source} [{fields.split}]: no column {fields.prompt!r} or {fields.messages!r}; it has "
                         f"{sorted(columns)} (choose with --prompt-field or --messages-field)")
    # Every column is read (the others go to reward functions), but images, audio and video (features that decode)
    # hold no JSON: they are left out rather than decoded for nothing.
    media = [c for c, feature in ds.features.items() if hasattr(feature, "decode") and c not in wanted]
    if media:
        _note_left_out(source, media, "images, audio or video")
        ds = ds.remove_columns(media)
    return [(f"{source} [{fields.split}]: row {i}", _without_trailing_reply(row, fields.messages))
            for i, row in enumerate(ds)]


def _refuse_mixed_formats(folder: Path) -> None:
    """load_dataset reads a folder's files of one format and drops the others without a word (prompts lost)."""
    by_kind: dict[str, list[str]] = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.name.startswith(".") and f.suffix in _DATA_FORMATS:
            by_kind.setdefault(_DATA_FORMATS[f.suffix], []).append(str(f.relative_to(folder)))
    if len(by_kind) > 1:
        listing = "; ".join(f"{kind}: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3
                                                                   else "") for kind, names in by_kind.items())
        raise ModpoError(f"{folder}: holds data files of {len(by_kind)} formats ({listing}), and a dataset folder is "
                         "read in one format, the others dropped: keep one format in the folder")


def _without_trailing_reply(row: Any, messages_field: str) -> Any:
    """A chat column often holds the whole conversation, its reference reply last: the policy writes its own
    reply, so trailing assistant turns are dropped (from every source: a Hub dataset, a saved one, Parquet,
    JSONL). A row that is no object is left for _record to refuse."""
    if not isinstance(row, dict):
        return row
    messages = row.get(messages_field)
    if isinstance(messages, list):
        while messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if messages:  # assistant turns only: left whole, for _record to refuse in words that fit
            row = {**row, messages_field: messages}
    return row


@dataclass
class PromptStats:
    read: int = 0
    skipped_invalid: int = 0


def _check_unicode(obj: Any, where: str) -> None:
    """JSON can spell a lone surrogate (\\ud800), which no UTF-8 text holds: tokenizers and Parquet refuse it."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise ModpoError(f"{where}: not valid Unicode (a lone surrogate such as \\ud800)") from None
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_unicode(key, where)
            _check_unicode(value, where)
    elif isinstance(obj, list):
        for value in obj:
            _check_unicode(value, where)


def _record(obj: Any, where: str, index: int, fields: PromptFields | None = None) -> PromptRecord:
    """A row (its fields under our names, PromptFields.remap) as a record; errors name the fields as the file
    spells them."""
    f = fields or PromptFields()
    if not isinstance(obj, dict):
        raise ModpoError(f"{where}: expected an object with {f.prompt!r} or {f.messages!r}")
    columns = obj.get("columns") or {}
    _check_unicode([obj.get("id"), obj.get("prompt"), obj.get("messages"), columns], where)  # what a record keeps
    pid = obj.get("id")
    pid = f"row-{index:06d}" if pid is None else str(pid)
    if not pid.strip():  # an empty id names nothing in the Parquet files and their errors
        raise ModpoError(f"{where}: field {f.id!r} is empty; give the row an id or leave the field out")
    if "messages" in obj and obj["messages"] is not None:
        messages = obj["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages)
        ):
            raise ModpoError(f"{where}: {f.messages!r} must be a non-empty list of {{role, content}} strings")
        if messages[-1]["role"] == "assistant":  # _without_trailing_reply left it: assistant turns only
            raise ModpoError(f"{where}: {f.messages!r} holds assistant turns only; the policy writes the reply, so a "
                             "chat needs a turn before it")
        if not any(m["content"].strip() for m in messages if m["role"] != "system"):
            # The policy would answer a system message alone: not a prompt anyone wrote.
            raise ModpoError(f"{where}: {f.messages!r} has no text besides a system message")
        return PromptRecord(pid, messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                            columns=columns)
    if "prompt" not in obj:
        raise ModpoError(f"{where}: missing field {f.prompt!r} (or {f.messages!r})")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise ModpoError(f"{where}: field {f.prompt!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ModpoError(f"{where}: field {f.prompt!r} is empty")
    return PromptRecord(pid, prompt=prompt, columns=columns)


def _split_does_not_apply(path: Path, what: str, split: str) -> None:
    print(f"note: {path} is {what}, with no splits: [generate].split {split!r} does not apply; every row is read",
          file=sys.stderr)


def _rows(path: Path, split: str = "") -> list[tuple[str, Any]]:
    """(location, raw object) per row, the location naming file and line or row for errors; `split` chooses
    among the splits of a saved DatasetDict."""
    if path.is_dir():
        try:
            from datasets import load_from_disk

            ds = load_from_disk(str(path))
        except Exception as e:
            raise ModpoError(f"{path}: not a saved datasets directory: {e}") from None
        if hasattr(ds, "keys"):  # a DatasetDict: the split asked for, else its only one; never a guess
            splits = list(ds.keys())
            if split and split not in splits:
                raise ModpoError(f"{path}: no split {split!r}; it holds {splits}")
            if not split and len(splits) != 1:
                raise ModpoError(f"{path}: holds splits {splits}; choose one with --split")
            ds = ds[split or splits[0]]
        elif split:
            _split_does_not_apply(path, "one saved dataset", split)
        return [(f"{path}: row {i}", row) for i, row in enumerate(ds)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise ModpoError(f"{path}: not a readable Parquet file: {e}") from None
        from modpo_pipe.schema import METADATA_KEY

        try:
            stage = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}")).get("stage")
        except (ValueError, AttributeError):  # another writer's metadata under our key: read as plain Parquet
            stage = None
        if stage:  # its prompts are rendered with the chat template already, its ids in prompt_id
            raise ModpoError(f"{path}: a {stage!r} file written by modpo-pipe, not a prompts file; give the prompts "
                             f"it was made from (its metadata names them: modpo-pipe inspect {path})")
        return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist())]
    # JSONL: split on "\n" only (U+2028 and friends are legal inside JSON strings), decode line by line so
    # a bad line is an error of that line (skippable with skip_invalid) rather than of the whole file.
    rows: list[tuple[str, Any]] = []
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            rows.append((where, ModpoError(f"{where}: not valid UTF-8")))
            continue
        if not line.strip():
            continue
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((where, ModpoError(f"{where}: invalid JSON: {e.msg}")))
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting deeper than Python's stack
            rows.append((where, ModpoError(f"{where}: JSON this reader refuses ({type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:120]})")))
    return rows


def read_prompts(path: Path, skip_invalid: bool = False,
                 fields: PromptFields | None = None) -> tuple[list[PromptRecord], PromptStats]:
    """All prompts of a file, a dataset folder or a Hub dataset id, validated; with skip_invalid, bad rows are
    counted instead of fatal. `fields`: the split and the columns holding the prompts."""
    path = Path(path)
    fields = fields or PromptFields()
    if is_dataset_source(path):
        rows = dataset_rows(str(path), fields)
    elif not path.exists():
        if path.is_symlink():
            raise ModpoError(f"{path}: a symbolic link that leads nowhere (a loop, or to a file that is not there)")
        raise ModpoError(f"{path}: no such file")
    else:
        if fields.split and path.is_file():  # a config's split for its Hub dataset, given a file too: say so
            _split_does_not_apply(path, "one file", fields.split)
        rows = _rows(path, fields.split)
    stats = PromptStats()
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for index, (where, obj) in enumerate(rows):
        try:
            if isinstance(obj, ModpoError):
                raise obj
            record = _record(_without_trailing_reply(fields.remap(obj), "messages"), where, index, fields)
            if record.id in seen:
                raise ModpoError(f"{where}: duplicate id {record.id!r} (first at {seen[record.id]})")
        except ModpoError:
            if not skip_invalid:
                raise
            stats.skipped_invalid += 1
            continue
        seen[record.id] = where
        records.append(record)
    if not records:
        raise ModpoError(f"{path}: no prompts" + (f" ({stats.skipped_invalid} invalid rows skipped)"
                                                  if stats.skipped_invalid else ""))
    _keep_json_columns(records, str(path))
    stats.read = len(records)
    return records, stats


def _keep_json_columns(records: list[PromptRecord], source: str) -> None:
    """Leave out (in place, with a note) the other columns whose values are no JSON (a Parquet timestamp, bytes):
    the pairs file stores the columns as JSON."""
    bad: set[str] = set()
    for record in records:
        for name, value in record.columns.items():
            if name not in bad:
                try:
                    json.dumps(value)
                except (TypeError, ValueError, RecursionError):
                    bad.add(name)
    if bad:
        _note_left_out(source, sorted(bad), "values that are no JSON")
        for record in records:
            record.columns = {k: v for k, v in record.columns.items() if k not in bad}


def _note_left_out(source: str, names: list[str], why: str) -> None:
    print(f"note: {source}: left out of the columns passed to reward functions, as they hold {why}: "
          f"{', '.join(map(repr, names))}", file=sys.stderr)


def render(record: PromptRecord, tokenizer: Any, use_chat_template: bool,
           max_tokens: int | None = None) -> tuple[str, list[int]]:
    """Prompt text as the policy sees it, and its token ids (what generation continues from).

    With `max_tokens`, a text with more characters than max_tokens tokens can possibly hold (twice over) is
    cut to its end before it is tokenised, and comes back still longer than max_tokens, for the caller to
    drop or truncate: tokenising a 50 MB line whole costs minutes and gigabytes just to drop it."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if record.messages is not None and not has_template:
        raise ModpoError(f"prompt {record.id!r} is a chat but the policy's tokenizer has no chat template")
    if record.messages is not None or (use_chat_template and has_template):
        from jinja2.exceptions import TemplateError

        messages = record.messages or [{"role": "user", "content": record.prompt}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # real templates refuse roles that do not alternate, or a system message
            raise ModpoError(f"prompt {record.id!r}: the policy's chat template refuses it: {e}") from None
        # The template writes its own special tokens (BOS included); adding them again would double them.
        special = False
    else:
        text = record.prompt or ""
        special = True
    if max_tokens is not None and len(text) > 2 * max_tokens:  # (every token holds at least one character)
        limit = 2 * max_tokens * max_token_chars(tokenizer)
        if len(text) > limit:
            ids = tokenizer(text[-limit:], add_special_tokens=special)["input_ids"]
            if len(ids) > max_tokens:  # always, unless a normalizer deletes most characters: then tokenise all
                return text[-limit:], list(ids)
    return text, list(tokenizer(text, add_special_tokens=special)["input_ids"])


_MAX_TOKEN_CHARS: dict[int, tuple[Any, int]] = {}  # id(tokenizer) -> (the tokenizer, kept alive; its value)


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token stands for: its longest vocabulary entry (byte-level entries spell each
    byte as a character, so they count bytes, never fewer than characters)."""
    if id(tokenizer) not in _MAX_TOKEN_CHARS:
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        _MAX_TOKEN_CHARS[id(tokenizer)] = (tokenizer, max(longest, 1))
    return _MAX_TOKEN_CHARS[id(tokenizer)][1]


def cut_start(text: str, tokens: int, tokenizer: Any) -> str:
    """`text` without its first `tokens` tokens (as `tokenizer` splits it alone), cut between characters."""
    if tokens <= 0:
        return text
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer: no offsets
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[tokens:]) if tokens < len(ids) else ""
    return text[offsets[tokens][0]:] if tokens < len(offsets) else ""


def fit_messages(messages: list[dict[str, str]], length: Callable[[list[dict[str, str]]], int], limit: int,
                 tokenizer: Any) -> list[dict[str, str]] | None:
    """The conversation shortened from the start of its content (earliest message first; roles and the template
    stay whole) until `length(messages)`, the rendered length in tokens, is at most `limit`; None when emptying
    every message is not enough. Cutting the text and not the rendered ids keeps the BOS, the template's headers
    and the generation prompt, and gives every model that renders the conversation the same shortened prompt."""
    messages = [dict(m) for m in messages]
    if length(messages) <= limit:
        return messages

    def emptied(k: int) -> list[dict[str, str]]:
        return [{**m, "content": ""} if i < k else m for i, m in enumerate(messages)]

    # Emptying messages from the start only shortens the rendering, so the first k whose emptying fits is found by
    # bisection: a render of the whole conversation per emptied message made a 2000-turn chat cost minutes.
    if length(emptied(len(messages))) > limit:
        return None
    low, high = 0, len(messages)  # emptying `high` messages fits, emptying `low` does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if length(emptied(middle)) <= limit else (middle, high)
    # The earlier ones whole gone, as cutting them one by one would leave them; then cut into the next.
    return cut_earliest(emptied(high - 1), length, limit, tokenizer)


def cut_earliest(messages: list[dict[str, str]], length: Callable[[list[dict[str, str]]], int], limit: int,
                 tokenizer: Any) -> list[dict[str, str]] | None:
    """Cut the earliest content left, by the tokens over `limit`, and measure again, until the conversation fits
    (in place; None when every message is empty and it still does not). One render per cut: fit_messages finds
    where to start first."""
    while (excess := length(messages) - limit) > 0:
        first = next((m for m in messages if m["content"]), None)
        if first is None:
            return None
        # Tokens of the content alone and inside the template differ a little at the edges: cut, measure again.
        first["content"] = cut_start(first["content"], excess, tokenizer)
    return messages
