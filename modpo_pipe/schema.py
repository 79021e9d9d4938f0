"""The Parquet contract between stages: columns, version, metadata, atomic writes, validation on read.

Version 2: one row per prompt, a "group" of its N >= 2 sampled responses.

pairs.parquet (stage "pairs"): GROUP_COLUMNS below, one row per prompt; the per-response fields are list
columns of N entries, in the order the responses were sampled. Plain Arrow list columns: pyarrow, pandas,
datasets and DuckDB read them as they are.
scored.parquet (stage "scored"): the group columns, then `reward_<name>` (list<float32>, one score per
response) for every reward model, then `ref_logps` (list<float32>). Every response is scored once, whatever
the number of pairs train forms from it (train pairs the responses of a group; see [train].pairs).
Both may hold `prompt_columns` after the group columns (PROMPT_COLUMNS below: optional, in the same version).

Version 1 (one row per disjoint pair: `response_1`, `response_2`, `reward_<name>_1` ...) is still read:
read_table and read_columns convert it on read, each pair row becoming a group of 2 whose group_id is the
pair_id (the pair train formed from it before is the only pair of that group).

File metadata is one JSON object under the key `modpo_pipe`: schema_version, stage, policy identity
(path and content fingerprint), tokenizer fingerprint, sampling settings, seed, package version,
created time; scored files add each reward's spec and mean/std, and the reference identity.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from modpo_pipe import __version__, storage
from modpo_pipe.errors import ModpoError
from modpo_pipe.storage import atomic_path

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 is converted on read
METADATA_KEY = b"modpo_pipe"
FINISH_REASONS = ("stop", "length")
STAGES = ("pairs", "scored")  # the stage files; each file's metadata names its stage
REWARD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Every page carries a CRC, checked on every read: a file damaged on disk (same size, other bytes) is refused
# instead of trained on. Files written without CRCs (before this) still read.
PARQUET_WRITE = {"write_page_checksum": True}
PARQUET_READ = {"page_checksum_verification": True}

GROUP_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("group_id", pa.string()),
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    # The un-rendered conversation (JSON list of {role, content}): reward models render it with their
    # own chat template, which may differ from the policy's.
    ("prompt_messages", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("responses", pa.list_(pa.string())),
    ("response_ids", pa.list_(pa.list_(pa.int32()))),
    ("finish_reasons", pa.list_(pa.string())),
    ("round", pa.int32()),
    # The sampler's own summed log-prob of each response (items null when the sampler does not report it).
    ("gen_logps", pa.list_(pa.float32())),
]
# Optional, after the group columns: the prompt row's other fields (a reference answer, a task label ...) as one
# JSON object per row, with every key any row has (null where a row lacks it), for TRL-style reward functions.
# Written only when the prompts have other fields, so files of prompts without them are what they were, and files
# without it read as before.
PROMPT_COLUMNS = ("prompt_columns", pa.string())
REF_COLUMN = ("ref_logps", pa.list_(pa.float32()))
# Per-response list columns: each holds N entries in every row. Items may be null only in these:
NULLABLE_ITEMS = {"gen_logps"}
PER_RESPONSE = ("responses", "response_ids", "finish_reasons", "gen_logps")

# --- version 1, read only (converted to version 2 on read) ---
V1_PAIR_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("pair_id", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("prompt_messages", pa.string()), ("prompt_ids", pa.list_(pa.int32())),
    ("response_1", pa.string()), ("response_2", pa.string()),
    ("response_ids_1", pa.list_(pa.int32())), ("response_ids_2", pa.list_(pa.int32())),
    ("finish_reason_1", pa.string()), ("finish_reason_2", pa.string()),
    ("round", pa.int32()), ("gen_logp_1", pa.float32()), ("gen_logp_2", pa.float32()),
]
V1_NULLABLE = {"gen_logp_1", "gen_logp_2"}


def reward_column(name: str) -> str:
    return f"reward_{name}"


# Files are named after rewards (score's OUT.parts/reward-NAME-00012.parquet, and its temporary name beside it),
# and a file name holds at most 255 bytes.
MAX_REWARD_NAME = 100


def check_reward_name(name: str) -> str:
    if not REWARD_NAME.match(name):
        raise ModpoError(f"reward name {name!r} must start with a letter and hold only letters, digits and _")
    if len(name) > MAX_REWARD_NAME:
        raise ModpoError(f"reward name {name[:20]!r}... is {len(name)} characters long; a reward name is at most "
                         f"{MAX_REWARD_NAME} characters (files are named after it)")
    return name


def pairs_schema(prompt_columns: bool = False) -> pa.Schema:
    """The schema of a "pairs" stage file: one group of responses per prompt (and with `prompt_columns`, the
    prompts' other fields)."""
    columns = GROUP_COLUMNS + ([PROMPT_COLUMNS] if prompt_columns else [])
    return pa.schema([pa.field(n, t, nullable=False) for n, t in columns])


def has_prompt_columns(schema: pa.Schema) -> bool:
    return PROMPT_COLUMNS[0] in schema.names


def scored_schema(reward_names: Iterable[str], prompt_columns: bool = False) -> pa.Schema:
    fields = list(pairs_schema(prompt_columns))
    fields += [pa.field(reward_column(name), pa.list_(pa.float32()), nullable=False) for name in reward_names]
    fields += [pa.field(REF_COLUMN[0], REF_COLUMN[1], nullable=False)]
    return pa.schema(fields)


def v1_pairs_schema() -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable=n in V1_NULLABLE) for n, t in V1_PAIR_COLUMNS])


def v1_scored_schema(reward_names: Iterable[str]) -> pa.Schema:
    fields = list(v1_pairs_schema())
    for name in reward_names:
        fields += [pa.field(f"reward_{name}_{j}", pa.float32(), nullable=False) for j in (1, 2)]
    fields += [pa.field(f"ref_logp_{j}", pa.float32(), nullable=False) for j in (1, 2)]
    return pa.schema(fields)


def is_v1(schema: pa.Schema) -> bool:
    return "pair_id" in schema.names


def reward_names_of(schema: pa.Schema) -> list[str]:
    """The reward names of a scored schema (either version), in column order."""
    if is_v1(schema):
        return [n[len("reward_"): -len("_1")] for n in schema.names if n.startswith("reward_") and n.endswith("_1")]
    return [n[len("reward_"):] for n in schema.names if n.startswith("reward_")]


def is_per_response(name: str) -> bool:
    """Whether a version-2 column holds one entry per response of its group."""
    return name in PER_RESPONSE or name.startswith("reward_") or name == REF_COLUMN[0]


def select_responses(table: pa.Table, keep: list[list[bool]]) -> pa.Table:
    """`table` (version 2) with, in every row, only the responses `keep` marks, in every per-response column;
    a row left with fewer than 2 responses is removed, as a group needs 2 to form a pair."""
    if [len(row) for row in keep] != group_sizes(table):  # else responses would shift between groups
        raise ValueError(f"keep marks {[len(row) for row in keep]} responses per row, the table holds "
                         f"{group_sizes(table)}")
    kept_flat = pa.array([k for row in keep for k in row], pa.bool_())
    offsets = pa.array([0, *itertools.accumulate(sum(row) for row in keep)], pa.int32())
    columns = []
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if is_per_response(name):
            column = pa.ListArray.from_arrays(offsets, pc.list_flatten(column).filter(kept_flat), type=column.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=table.schema).filter(pa.array([sum(row) >= 2 for row in keep]))


def group_sizes(table: pa.Table) -> list[int]:
    """N, the number of responses, of every row."""
    return pc.list_value_length(table.column("response_ids")).to_pylist()


def make_metadata(stage: str, **fields: Any) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }


def with_metadata(table: pa.Table, metadata: dict[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def write_table(table: pa.Table, path: Path, metadata: dict[str, Any], row_group_size: int = 1024) -> None:
    """Validate against the contract, write to a temporary name, fsync, rename: never a half file."""
    table = with_metadata(table, metadata)
    validate_table(table, metadata["stage"], str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size, **PARQUET_WRITE)
        storage.fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def expected_schema(stage: str, schema: pa.Schema, version: int = SCHEMA_VERSION) -> pa.Schema:
    names, extra = reward_names_of(schema), has_prompt_columns(schema)
    if stage == "pairs":
        return pairs_schema(extra) if version == 2 else v1_pairs_schema()
    if stage == "scored":
        return scored_schema(names, extra) if version == 2 else v1_scored_schema(names)
    raise ModpoError(f"unknown stage {stage!r}")


def validate_table(table: pa.Table, stage: str, where: str) -> dict[str, Any]:
    """Check metadata, columns, types and row invariants; return the metadata."""
    meta = validate_schema(table.schema, stage, where)
    if table.num_rows == 0:
        if "shard" in meta:  # a shard whose chunks were all dropped, or one with no chunks (N > chunks)
            return meta
        raise ModpoError(f"{where}: has no rows")
    (_check_rows_v1 if meta["schema_version"] == 1 else _check_rows)(table, where)
    return meta


def validate_schema(schema: pa.Schema, stage: str, where: str) -> dict[str, Any]:
    """Check metadata, columns and types (of either readable version); return the metadata."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ModpoError(f"{where}: not a modpo-pipe file (no '{METADATA_KEY.decode()}' metadata)")
    meta = parse_metadata(raw, where)
    version = meta.get("schema_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:  # (True == 1 in Python)
        raise ModpoError(f"{where}: schema version {version!r} is not supported (this modpo-pipe reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    if meta.get("stage") != stage:
        raise ModpoError(f"{where}: is a {meta.get('stage')!r} file, expected a {stage!r} file")
    want = expected_schema(stage, schema, version)
    for f in want:
        if f.name not in schema.names:
            raise ModpoError(f"{where}: missing column {f.name!r}")
        got = schema.field(f.name).type
        if got != f.type:
            raise ModpoError(f"{where}: column {f.name!r} has type {got}, expected {f.type}")
    extra = [n for n in schema.names if n not in want.names]
    if extra:
        raise ModpoError(f"{where}: unexpected columns {extra}")
    rewards = meta.get("rewards")
    if stage == "scored" and version == SCHEMA_VERSION and isinstance(rewards, dict):
        for name in rewards:  # the metadata names every reward it scored: each needs its column
            if reward_column(name) not in schema.names:
                raise ModpoError(f"{where}: missing column {reward_column(name)!r}")
    return meta


def _first_row(mask: pa.Array | pa.ChunkedArray) -> int:
    return mask.to_pylist().index(True)


def _check_unique(column: pa.ChunkedArray, name: str, where: str) -> None:
    if pc.count_distinct(column).as_py() != len(column):
        seen: set[str] = set()
        for row, value in enumerate(column.to_pylist()):
            if value in seen:
                raise ModpoError(f"{where}: row {row}: duplicate {name} {value!r}")
            seen.add(value)


def _check_ids(column: pa.ChunkedArray, name: str, where: str, rows: pa.Array | None = None) -> None:
    """Every id list non-empty with ids >= 0; `rows` maps each list to its file row (nested lists)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(column)
    empty = pc.equal(lengths, 0)
    if pc.any(empty).as_py():
        i = _first_row(empty)
        raise ModpoError(f"{where}: row {rows[i].as_py() if rows is not None else i}: {name} is empty")
    flat = pc.list_flatten(column)
    if len(flat) and pc.min(flat).as_py() < 0:
        bad = pc.less(flat, 0)
        i = pc.list_parent_indices(column)[_first_row(bad)].as_py()
        raise ModpoError(f"{where}: row {rows[i].as_py() if rows is not None else i}: {name} holds negative "
                         f"token ids")


def _check_rows(table: pa.Table, where: str) -> None:
    for f in table.schema:
        if table.column(f.name).null_count:
            row = table.column(f.name).to_pylist().index(None)
            raise ModpoError(f"{where}: row {row}: column {f.name!r} is null")
    _check_unique(table.column("group_id"), "group_id", where)
    n_responses = None
    lists = [n for n in table.column_names if is_per_response(n)]
    if "response_ids" in table.column_names:
        n_responses = pc.list_value_length(table.column("response_ids"))
        few = pc.less(n_responses, 2)
        if pc.any(few).as_py():
            row = _first_row(few)
            raise ModpoError(f"{where}: row {row}: a group needs at least 2 responses, it holds "
                             f"{n_responses[row].as_py()}")
    for name in lists:
        column = table.column(name)
        lengths = pc.list_value_length(column)
        if n_responses is not None and name != "response_ids":
            differ = pc.not_equal(lengths, n_responses)
            if pc.any(differ).as_py():
                row = _first_row(differ)
                raise ModpoError(f"{where}: row {row}: {name} holds {lengths[row].as_py()} entries but "
                                 f"response_ids {n_responses[row].as_py()}")
        if name not in NULLABLE_ITEMS:
            flat = pc.list_flatten(column)
            if flat.null_count:
                row = pc.list_parent_indices(column)[_first_row(pc.is_null(flat))].as_py()
                raise ModpoError(f"{where}: row {row}: {name} holds a null entry")
    if "finish_reasons" in table.column_names:
        column = table.column("finish_reasons")
        bad = pc.invert(pc.is_in(pc.list_flatten(column), pa.array(FINISH_REASONS)))
        if pc.any(bad).as_py():
            row = pc.list_parent_indices(column)[_first_row(bad)].as_py()
            raise ModpoError(f"{where}: row {row}: finish_reasons must each be one of {FINISH_REASONS}")
    if "prompt_ids" in table.column_names:
        _check_ids(table.column("prompt_ids"), "prompt_ids", where)
    if "response_ids" in table.column_names:
        column = table.column("response_ids").combine_chunks()
        _check_ids(pc.list_flatten(column), "a response's response_ids", where, pc.list_parent_indices(column))


def _check_rows_v1(table: pa.Table, where: str) -> None:
    for f in table.schema:
        if f.name not in V1_NULLABLE and table.column(f.name).null_count:
            row = table.column(f.name).to_pylist().index(None)
            raise ModpoError(f"{where}: row {row}: column {f.name!r} is null")
    _check_unique(table.column("pair_id"), "pair_id", where)
    for col in ("finish_reason_1", "finish_reason_2"):
        bad = pc.invert(pc.is_in(table.column(col), pa.array(FINISH_REASONS)))
        if pc.any(bad).as_py():
            raise ModpoError(f"{where}: row {_first_row(bad)}: {col} must be one of {FINISH_REASONS}")
    for col in ("prompt_ids", "response_ids_1", "response_ids_2"):
        _check_ids(table.column(col), col, where)


def convert_v1(table: pa.Table, meta: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    """A version-1 table (one row per pair) as version 2: each pair a group of 2, group_id = pair_id."""
    n = table.num_rows
    offsets = pa.array(range(0, 2 * n + 1, 2), pa.int32())
    # y1 of row i at 2i, y2 at 2i + 1
    order = pa.array([i // 2 + (i % 2) * n for i in range(2 * n)], pa.int64())

    def two(first: str, second: str, value_type: pa.DataType) -> pa.Array:
        values = pa.concat_arrays([table.column(first).combine_chunks().cast(value_type),
                                   table.column(second).combine_chunks().cast(value_type)]).take(order)
        return pa.ListArray.from_arrays(offsets, values)

    columns: dict[str, Any] = {
        "group_id": table.column("pair_id"), "prompt_id": table.column("prompt_id"),
        "prompt": table.column("prompt"), "prompt_messages": table.column("prompt_messages"),
        "prompt_ids": table.column("prompt_ids"),
        "responses": two("response_1", "response_2", pa.string()),
        "response_ids": two("response_ids_1", "response_ids_2", pa.list_(pa.int32())),
        "finish_reasons": two("finish_reason_1", "finish_reason_2", pa.string()),
        "round": table.column("round"),
        "gen_logps": two("gen_logp_1", "gen_logp_2", pa.float32()),
    }
    names = reward_names_of(table.schema)
    if meta.get("stage") == "scored":
        for name in names:
            columns[reward_column(name)] = two(f"reward_{name}_1", f"reward_{name}_2", pa.float32())
        columns[REF_COLUMN[0]] = two("ref_logp_1", "ref_logp_2", pa.float32())
    target = scored_schema(names) if meta.get("stage") == "scored" else pairs_schema()
    converted = pa.table(columns).cast(target)
    return converted, {**meta, "schema_version": SCHEMA_VERSION, "converted_from_schema_version": 1}


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise ModpoError(f"{path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ModpoError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ModpoError(f"{path}: not a modpo-pipe file (no '{METADATA_KEY.decode()}' metadata)")
    return parse_metadata(raw, str(path))


def parse_metadata(raw: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        meta = None
    if not isinstance(meta, dict):
        raise ModpoError(f"{where}: its '{METADATA_KEY.decode()}' metadata is not a JSON object (corrupt file?)")
    return meta


def read_table(path: Path, stage: str) -> tuple[pa.Table, dict[str, Any]]:
    """Read and validate a stage file (version 1 converted to version 2); every stage reads its input through
    here."""
    path = Path(path)
    if not path.exists():
        raise ModpoError(f"{path}: no such file")
    try:
        table = pq.read_table(path, **PARQUET_READ)
    except (pa.ArrowInvalid, OSError) as e:
        raise ModpoError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
    meta = validate_table(table, stage, str(path))
    if meta["schema_version"] == 1:
        table, meta = convert_v1(table, meta)
        table = table.replace_schema_metadata(None)
    return table, meta


def read_columns(path: Path, stage: str, columns: list[str]) -> tuple[pa.Table, dict[str, Any]]:
    """Read only `columns` (group_id among them) of a stage file: its metadata and whole schema are checked as
    read_table checks them, and the rows of the columns read. A stage that never looks at the text columns
    need not hold them in memory. A version-1 file is read whole and converted."""
    path = Path(path)
    if not path.exists():
        raise ModpoError(f"{path}: no such file")
    try:
        file = pq.ParquetFile(path, **PARQUET_READ)
        meta = validate_schema(file.schema_arrow, stage, str(path))
        if meta["schema_version"] == 1:
            table, meta = read_table(path, stage)
            return table.select(columns), meta
        # Row group by row group: reading the whole file at once needs several times the memory of the result.
        table = pa.concat_tables([file.schema_arrow.empty_table().select(columns)]
                                 + [file.read_row_group(i, columns=columns) for i in range(file.num_row_groups)])
    except (pa.ArrowInvalid, OSError) as e:
        raise ModpoError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
    if table.num_rows == 0 and "shard" not in meta:
        raise ModpoError(f"{path}: has no rows")
    _check_rows(table, str(path))
    return table, meta


def check_token_ids(table: pa.Table, vocab_size: int, where: str) -> None:
    """Ids outside the tokenizer's vocabulary mean the file was made with another tokenizer."""
    for col in ("prompt_ids", "response_ids"):
        column = table.column(col).combine_chunks()
        rows = None
        if col == "response_ids":
            rows, column = pc.list_parent_indices(column), pc.list_flatten(column)
        flat = pc.list_flatten(column)
        top = pc.max(flat).as_py()
        if top is not None and top >= vocab_size:
            at = _first_row(pc.greater_equal(flat, vocab_size))
            i = pc.list_parent_indices(column)[at].as_py()
            row = rows[i].as_py() if rows is not None else i
            raise ModpoError(f"{where}: row {row}: {col} holds id {flat[at].as_py()} >= vocab size {vocab_size}")


def sequence_lengths(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Per response, in file order: its prompt's tokens + its own (what one forward pass reads), and the row of
    its group. Batch by batch, so the token ids are never copied."""
    lengths, rows, offset = [], [], 0
    for batch in table.select(["prompt_ids", "response_ids"]).to_batches():
        responses = batch.column(1)
        parents = pc.list_parent_indices(responses)
        prompts = pc.take(pc.list_value_length(batch.column(0)), parents)
        lengths.append(pc.add(prompts, pc.list_value_length(pc.list_flatten(responses))).cast(pa.int64()))
        rows.append(pc.add(parents, offset).cast(pa.int64()))
        offset += batch.num_rows
    return pa.concat_arrays(lengths or [pa.array([], pa.int64())]), pa.concat_arrays(rows or [pa.array([], pa.int64())])


def check_context(table: pa.Table, context: int | None, where: str, model: str) -> None:
    """Refuse a prompt + response longer than `model`'s context window: its log-probs past the window would be
    computed without a word, and trained on. Names the first group and response that does not fit."""
    if context is None or table.num_rows == 0:
        return
    lengths, rows = sequence_lengths(table)
    if (pc.max(lengths).as_py() or 0) <= context:
        return
    at = _first_row(pc.greater(lengths, context))
    row = rows[at].as_py()
    first = pc.index(rows, row).as_py()  # the group's first response
    response = at - first
    raise ModpoError(f"{where}: group {table.column('group_id')[row].as_py()!r} response {response + 1}: prompt + "
                     f"response are {lengths[at].as_py()} tokens, beyond the {context} of {model}'s context window "
                     "(max_position_embeddings): its log-probs there would mean nothing")


def parse_messages(text: str, where: str) -> list[dict[str, str]]:
    """A row's prompt_messages: the JSON list of {role, content} strings the reward models read."""
    try:
        messages = json.loads(text)
    except (TypeError, ValueError):
        messages = None
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise ModpoError(f"{where}: prompt_messages must be a JSON list of {{role, content}} strings; got "
                         f"{str(text)[:80]!r}")
    return messages


def parse_prompt_columns(text: str, where: str) -> dict[str, Any]:
    """A row's prompt_columns: the JSON object of the prompt's other fields."""
    try:
        columns = json.loads(text)
    except (TypeError, ValueError):
        columns = None
    if not isinstance(columns, dict):
        raise ModpoError(f"{where}: prompt_columns must be a JSON object; got {str(text)[:80]!r}")
    return columns


def metadata_key(meta: dict[str, Any], key: str, path: Path) -> Any:
    """meta[key], or a one-line error naming the file when a file's metadata lacks it."""
    if key not in meta:
        raise ModpoError(f"{path}: metadata has no '{key}': corrupt or not written by modpo-pipe")
    return meta[key]
