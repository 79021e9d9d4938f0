"""Resumable stage outputs: the input is cut into fixed chunks, each finished chunk is written atomically
as a part file in a work directory beside the output, and the parts are merged into the output in one
atomic write at the end, after which the work directory goes.

    pairs.parquet.parts/manifest.json          what this run is: input fingerprint, settings that change rows
    pairs.parquet.parts/part-00012.parquet     chunk 12, written to a temporary name, fsynced, renamed

A killed run loses at most the chunks it was working on. Its rerun compares the work directory's manifest
with its own and refuses one from another run (other input or settings) naming what differs; it keeps
every part that reads back whole and carries this run's key, and redoes the rest. Chunks are numbered
from the start of the input and each chunk's randomness derives from its number, so a resumed run writes
exactly the rows an uninterrupted one would.

Chunks are independent of each other: `--shard I/N` computes the disjoint, deterministic subset
`select_chunks(n, (I, N))` (chunks I, I+N, ...) into a shard file, and `modpo-pipe merge` joins the N shard
files (shards.py).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from modpo_pipe import schema, storage
from modpo_pipe.errors import ModpoError

MANIFEST = "manifest.json"
PART_KEY = b"modpo_pipe_part"
# A whole output's metadata: the key of what decided its rows (the parts' key, and what the merge applies).
RUN_KEY = "run_key"


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def chunk_ranges(n: int, size: int) -> list[range]:
    """Rows [0, n) cut into consecutive chunks of `size` (the last one shorter)."""
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def select_chunks(n_chunks: int, shard: tuple[int, int] | None = None) -> list[int]:
    """The chunks one worker computes: all of them, or for shard (i, N) every N-th chunk from i."""
    if shard is None:
        return list(range(n_chunks))
    index, count = shard
    return list(range(index, n_chunks, count))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def finished_output(out: Path, stage: str, key: str) -> tuple[dict[str, Any], int] | None:
    """`out`'s metadata and rows when it is a whole `stage` file written under this very `key` (the input, models
    and settings of this run): a rerun has nothing to do. None when it is missing, not whole, or another run's,
    which is computed again and replaced."""
    if not out.is_file():
        return None
    try:
        meta = schema.validate_schema(pq.read_schema(out), stage, str(out))
        rows = pq.read_metadata(out).num_rows
    except (ModpoError, pa.ArrowException, OSError):
        return None
    return (meta, rows) if meta.get(RUN_KEY) == key else None


def write_error(path: Path, e: OSError, keep: str) -> Exception:
    """A failed write of a part or the output, as the user sees it: with `keep`, how a rerun continues from the
    parts kept (a full disk, once freed). A path this process may not write at all (permissions, a read-only
    filesystem) is the OSError itself: a rerun would fail the same, and the caller words what to do (the commands:
    fix the permissions or choose another path; `run`: make the run directory writable)."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        e.filename = e.filename or str(path)
        return e
    return ModpoError(f"cannot write {path}: {e.strerror or e}; {keep}")


class Parts:
    """The work directory of one resumable run of a stage writing `out`."""

    def __init__(self, out: Path, manifest: dict[str, Any]):
        self.out = Path(out)
        self.dir = work_dir(self.out)
        self.manifest = json.loads(json.dumps(manifest))  # as it reads back from JSON
        self.key = storage.json_fingerprint(self.manifest)
        self.reused = 0  # parts found finished by this run
        self._manifest_written = False

    def open(self) -> Parts:
        """Check that a work directory already there belongs to this run. Nothing is created before the
        first part is written, so a run that fails before finishing a chunk leaves nothing behind."""
        trash = self._trash()
        if trash.exists():  # a run killed while removing its finished work directory
            shutil.rmtree(trash, ignore_errors=True)
        path = self.dir / MANIFEST
        has_parts = self.dir.is_dir() and any(self.dir.glob("*.parquet"))
        if path.is_file() and has_parts:
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise ModpoError(f"{path}: unreadable; delete {self.dir} to start over") from None
            if existing != self.manifest:
                keys = sorted(set(existing) | set(self.manifest))
                differ = [k for k in keys if existing.get(k) != self.manifest.get(k)]
                raise ModpoError(
                    f"{self.dir} holds the unfinished parts of another run of this stage (it differs in: "
                    f"{', '.join(differ)}). Rerun with that run's input and settings to finish it, or delete "
                    f"{self.dir} to start over."
                )
        elif has_parts:
            raise ModpoError(f"{self.dir} holds parts but no {MANIFEST}; delete {self.dir} to start over")
        if self.dir.is_dir():
            storage.remove_stale_temps(self.dir, "*")
        return self

    def _write_manifest(self) -> None:
        """Before the first part: this run's manifest (replacing one of a run that finished no part)."""
        if self._manifest_written:
            return
        path = self.dir / MANIFEST
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = storage.atomic_path(path)
        try:
            tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True), encoding="utf-8")
            storage.fsync_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._manifest_written = True

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.parquet"

    def read(self, name: str, rows: int) -> pa.Table | None:
        """A finished part (its rows, no metadata), or None when it is missing or not whole: then it is redone."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            table = pq.read_table(path, **schema.PARQUET_READ)
            info = json.loads((table.schema.metadata or {})[PART_KEY])
        except (pa.ArrowException, OSError, KeyError, ValueError) as e:
            warn(f"{path}: unreadable ({type(e).__name__}); computing it again")
            path.unlink(missing_ok=True)
            return None
        if info.get("run") != self.key or info.get("name") != name or table.num_rows != rows:
            warn(f"{path}: not a finished part of this run ({table.num_rows} rows, {rows} expected); "
                 "computing it again")
            path.unlink(missing_ok=True)
            return None
        self.reused += 1
        return table.replace_schema_metadata(None)

    def write(self, name: str, table: pa.Table) -> pa.Table:
        """Write one finished chunk: a temporary name, fsync, rename. Returns the table as stored."""
        table = table.replace_schema_metadata({PART_KEY: json.dumps({"run": self.key, "name": name}).encode()})
        path = self.path(name)
        tmp = storage.atomic_path(path)
        try:
            self._write_manifest()
            pq.write_table(table, tmp, **schema.PARQUET_WRITE)
            storage.fsync_replace(tmp, path)
        except OSError as e:
            raise write_error(path, e, f"the finished parts in {self.dir} are kept: rerun the same command to "
                                       "continue from them") from None
        finally:
            tmp.unlink(missing_ok=True)
        return table.replace_schema_metadata(None)

    def write_output(self, table: pa.Table, metadata: dict[str, Any]) -> None:
        """The merged output, atomically (schema.write_table); then the work directory is removed."""
        storage.remove_stale_temps(self.out.parent, self.out.name)
        try:
            schema.write_table(table, self.out, metadata)
        except OSError as e:
            raise write_error(self.out, e, f"the parts in {self.dir} are kept: rerun the same command to merge "
                                           "them") from None
        self.remove()

    def remove(self) -> None:
        """Rename first, then delete: a kill during the deletion never leaves a half work directory behind."""
        if not self.dir.exists():
            return
        trash = self._trash()
        shutil.rmtree(trash, ignore_errors=True)
        self.dir.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _trash(self) -> Path:
        return self.dir.with_name(f".{self.dir.name}.done")
