"""The Parquet contract between stages: columns, version, metadata, atomic writes, validation on read.

Version 1.

pairs.parquet (stage "pairs"): PAIR_COLUMNS below, one row per pair of responses to one prompt.
scored.parquet (stage "scored"): the pair columns, then `reward_<name>_1`, `reward_<name>_2` for every
reward model, then `ref_logp_1`, `ref_logp_2`.

File metadata is one JSON object under the key `modpo_pipe`: schema_version, stage, policy identity
(path and content fingerprint), tokenizer fingerprint, sampling settings, seed, package version,
created time; scored files add each reward's spec and mean/std, and the reference identity.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from modpo_pipe import __version__
from modpo_pipe.errors import ModpoError

SCHEMA_VERSION = 1
METADATA_KEY = b"modpo_pipe"
FINISH_REASONS = ("stop", "length")
REWARD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

PAIR_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("pair_id", pa.string()),
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    # The un-rendered conversation (JSON list of {role, content}): reward models render it with their
    # own chat template, which may differ from the policy's.
    ("prompt_messages", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_1", pa.string()),
    ("response_2", pa.string()),
    ("response_ids_1", pa.list_(pa.int32())),
    ("response_ids_2", pa.list_(pa.int32())),
    ("finish_reason_1", pa.string()),
    ("finish_reason_2", pa.string()),
    ("round", pa.int32()),
    # The sampler's own summed log-prob of each response (nullable: not every sampler reports it).
    ("gen_logp_1", pa.float32()),
    ("gen_logp_2", pa.float32()),
]
REF_COLUMNS: list[tuple[str, pa.DataType]] = [("ref_logp_1", pa.float32()), ("ref_logp_2", pa.float32())]
NULLABLE = {"gen_logp_1", "gen_logp_2"}


def reward_columns(name: str) -> tuple[str, str]:
    return f"reward_{name}_1", f"reward_{name}_2"


def check_reward_name(name: str) -> str:
    if not REWARD_NAME.match(name):
        raise ModpoError(f"reward name {name!r} must start with a letter and hold only letters, digits and _")
    return name


def pairs_schema() -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable=n in NULLABLE) for n, t in PAIR_COLUMNS])


def scored_schema(reward_names: Iterable[str]) -> pa.Schema:
    fields = list(pairs_schema())
    for name in reward_names:
        fields += [pa.field(c, pa.float32(), nullable=False) for c in reward_columns(name)]
    fields += [pa.field(n, t, nullable=False) for n, t in REF_COLUMNS]
    return pa.schema(fields)


def reward_names_of(schema: pa.Schema) -> list[str]:
    return [n[len("reward_") : -len("_1")] for n in schema.names if n.startswith("reward_") and n.endswith("_1")]


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


def atomic_path(path: Path) -> Path:
    """The temporary sibling a stage writes before renaming: same filesystem, so the rename is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_table(table: pa.Table, path: Path, metadata: dict[str, Any], row_group_size: int = 4096) -> None:
    """Validate against the contract, write to a temporary name, fsync, rename: never a half file."""
    table = with_metadata(table, metadata)
    validate_table(table, metadata["stage"], str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size)
        fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def expected_schema(stage: str, schema: pa.Schema) -> pa.Schema:
    if stage == "pairs":
        return pairs_schema()
    if stage == "scored":
        return scored_schema(reward_names_of(schema))
    raise ModpoError(f"unknown stage {stage!r}")


def validate_table(table: pa.Table, stage: str, where: str) -> dict[str, Any]:
    """Check metadata, columns, types and row invariants; return the metadata."""
    meta = validate_schema(table.schema, stage, where)
    if table.num_rows == 0:
        if "shard" in meta:  # a shard whose chunks were all dropped, or one with no chunks (N > chunks)
            return meta
        raise ModpoError(f"{where}: has no rows")
    _check_rows(table, where)
    return meta


def validate_schema(schema: pa.Schema, stage: str, where: str) -> dict[str, Any]:
    """Check metadata, columns and types; return the metadata."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ModpoError(f"{where}: not a modpo-pipe file (no '{METADATA_KEY.decode()}' metadata)")
    meta = parse_metadata(raw, where)
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ModpoError(f"{where}: schema version {version} is not supported (this modpo-pipe reads {SCHEMA_VERSION})")
    if meta.get("stage") != stage:
        raise ModpoError(f"{where}: is a {meta.get('stage')!r} file, expected a {stage!r} file")
    want = expected_schema(stage, schema)
    for f in want:
        if f.name not in schema.names:
            raise ModpoError(f"{where}: missing column {f.name!r}")
        got = schema.field(f.name).type
        if got != f.type:
            raise ModpoError(f"{where}: column {f.name!r} has type {got}, expected {f.type}")
    extra = [n for n in schema.names if n not in want.names]
    if extra:
        raise ModpoError(f"{where}: unexpected columns {extra}")
    return meta


def _check_rows(table: pa.Table, where: str) -> None:
    import pyarrow.compute as pc

    for f in table.schema:
        if f.name not in NULLABLE and table.column(f.name).null_count:
            row = table.column(f.name).to_pylist().index(None)
            raise ModpoError(f"{where}: row {row}: column {f.name!r} is null")
    pair_ids = table.column("pair_id")
    if pc.count_distinct(pair_ids).as_py() != table.num_rows:
        seen: set[str] = set()
        for row, pid in enumerate(pair_ids.to_pylist()):
            if pid in seen:
                raise ModpoError(f"{where}: row {row}: duplicate pair_id {pid!r}")
            seen.add(pid)
    for col in ("finish_reason_1", "finish_reason_2"):
        if col not in table.column_names:  # read_columns: not read
            continue
        bad = pc.invert(pc.is_in(table.column(col), pa.array(FINISH_REASONS)))
        if pc.any(bad).as_py():
            row = bad.to_pylist().index(True)
            raise ModpoError(f"{where}: row {row}: {col} must be one of {FINISH_REASONS}")
    for col in ("prompt_ids", "response_ids_1", "response_ids_2"):
        if col not in table.column_names:
            continue
        lengths = pc.list_value_length(table.column(col))
        if pc.any(pc.equal(lengths, 0)).as_py():
            row = pc.equal(lengths, 0).to_pylist().index(True)
            raise ModpoError(f"{where}: row {row}: {col} is empty")
        if pc.min(pc.list_flatten(table.column(col))).as_py() < 0:
            row = next(i for i, ids in enumerate(table.column(col).to_pylist()) if min(ids) < 0)
            raise ModpoError(f"{where}: row {row}: {col} holds negative token ids")


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
    """Read and validate a stage file; every stage reads its input through here."""
    path = Path(path)
    if not path.exists():
        raise ModpoError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ModpoError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
    meta = validate_table(table, stage, str(path))
    return table, meta


def read_columns(path: Path, stage: str, columns: list[str]) -> tuple[pa.Table, dict[str, Any]]:
    """Read only `columns` (pair_id among them) of a stage file: its metadata and whole schema are checked as
    read_table checks them, and the rows of the columns read. A stage that never looks at the text columns
    need not hold them in memory."""
    path = Path(path)
    if not path.exists():
        raise ModpoError(f"{path}: no such file")
    try:
        file = pq.ParquetFile(path)
        meta = validate_schema(file.schema_arrow, stage, str(path))
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
    import pyarrow.compute as pc

    for col in ("prompt_ids", "response_ids_1", "response_ids_2"):
        flat_max = pc.max(pc.list_flatten(table.column(col))).as_py()
        if flat_max is not None and flat_max >= vocab_size:
            for row, ids in enumerate(table.column(col).to_pylist()):
                if max(ids) >= vocab_size:
                    raise ModpoError(f"{where}: row {row}: {col} holds id {max(ids)} >= vocab size {vocab_size}")
