"""Durable files: the one place that writes, replaces and fingerprints what the stages leave on disk.

Every output is written under a temporary sibling name (same directory, so same filesystem), fsynced,
and renamed over its final name; the directory is fsynced after the rename. A reader, or a process
killed at any instant, sees the old file or the new one, never half of one. Temporary names start
with the final name (`.NAME.tmp...`), so whoever owns NAME can find and remove what a killed writer
left behind.

Fingerprints are sha256 of the content (a file, a directory tree, a JSON-able value); model
directories with weights of hundreds of GB use a sampled digest (`sampled_sha256`).

Standard library only: the run lock's fast path (a second cron invocation) imports this.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modpo_pipe.errors import ModpoError

# Files up to this size are re-hashed in full at every check; larger ones (model weights) only when their
# size or modification time changed since their info was recorded (file_problem).
FULL_HASH_LIMIT = 64 << 20
# Files above this size are fingerprinted by sampling (sampled_sha256): size, head, tail and 16 blocks.
SAMPLED_HASH_LIMIT = 64 << 20
_BLOCK = 1 << 20


# ------------------------------------------------------------------------------------------ atomic files


def refuse_overwriting_input(out: Path, source: Path) -> None:
    """An output that is the command's own input would replace it (the user's prompts gone for good): refused
    before any work."""
    # realpath, not resolve: a symbolic link loop is left as it is (resolve raised RuntimeError on one)
    if os.path.realpath(out) == os.path.realpath(source):
        raise ModpoError(f"--out {out} is the input file {source}: writing it would replace the input; choose "
                         "another output path")


def refuse_unwritable_output(out: Path, kind: str) -> None:
    """An output a command could never write (a file output that is a directory, a directory output that is a
    file, a parent that is a file): refused before the work, not at its end, when a rerun would fail the same."""
    out = Path(out)
    if kind == "file" and out.is_dir():
        raise ModpoError(f"--out {out} is a directory; give the output file's path (e.g. {out / 'out.parquet'})")
    if kind == "directory" and out.exists() and not out.is_dir():
        raise ModpoError(f"--out {out} is a file; give a directory for the outputs")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ModpoError(f"--out {out}: {parent} is a file, not a directory")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of a model or checkpoint directory (config.json, modpo_pipe.json), or one line naming it:
    a truncated or hand-edited one was a JSONDecodeError traceback."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModpoError(f"{path}: not valid JSON ({str(e).splitlines()[0]}): truncated or damaged") from None
    if not isinstance(value, dict):
        raise ModpoError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_path(path: Path) -> Path:
    """The temporary sibling a stage writes before renaming: same filesystem, so the rename is atomic. The pid
    in the name lets remove_stale_temps tell a killed writer's file from a running one's."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def unique_temp_path(path: Path) -> Path:
    """A temporary sibling no other process or thread picks (a directory several processes may build at once)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_replace(tmp: Path, path: Path) -> None:
    """fsync the finished `tmp`, rename it over `path`, fsync the directory."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path) -> Iterator[None]:
    """A write that fails half way (a full disk) leaves no temporary file behind; the error goes on."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary sibling, fsync, rename over `path`: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with _removed_on_failure(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy `src` over `dst` in one rename."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with _removed_on_failure(tmp):
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    fsync_dir(dst.parent)


def symlink_atomic(target: str, link: Path) -> None:
    """Point `link` at `target` (relative to the link's directory) in one rename."""
    tmp = link.with_name(f".{link.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with _removed_on_failure(tmp):
        os.symlink(target, tmp)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        os.replace(tmp, link)
    fsync_dir(link.parent)


def replace_dir(tmp: Path, final: Path, old: Path | None = None) -> None:
    """Swap a finished temporary directory into place; a crash leaves either the old or the new one (the old one
    under `old`, FINAL.old unless given, for the instant between the two renames)."""
    old = final.with_name(final.name + ".old") if old is None else old
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def fsync_files(directory: Path, only: str | None = None) -> None:
    """fsync every file in ``directory`` (or just ``only``; ``"."`` syncs the directory entry)."""
    paths = [directory / only] if only else [p for p in directory.iterdir() if p.is_file()]
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # e.g. directories cannot be opened on Windows
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ stale temps


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path, name: str) -> None:
    """Delete `.NAME.tmp-PID` files (see atomic_path) whose writer is no longer running."""
    for tmp in directory.glob(f".{name}.tmp-*"):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def remove_temps(directory: Path, name: str) -> None:
    """Delete every `.NAME.tmp*` file or directory, whoever wrote it: for a caller holding a lock that no other
    writer of NAME can be running without."""
    for tmp in directory.glob(f".{name}.tmp*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ fingerprints


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file's content, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_fingerprint(value: Any) -> str:
    """Fingerprint of a JSON-able value (keys sorted; anything else as its str)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def sampled_sha256(path: Path) -> str:
    """sha256 of the size and the content; above SAMPLED_HASH_LIMIT of the size, head, tail and 16 blocks
    between: hashing hundreds of GB of weights on every stage would cost minutes, and a changed checkpoint
    changes them."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLED_HASH_LIMIT:
            for block in iter(lambda: f.read(_BLOCK * 4), b""):
                h.update(block)
        else:
            offsets = [0, size - 4 * _BLOCK] + [size * i // 17 for i in range(1, 17)]
            for offset in offsets:
                f.seek(offset)
                h.update(f.read(4 * _BLOCK if offset in (0, size - 4 * _BLOCK) else _BLOCK))
    return h.hexdigest()


def dir_fingerprint(path: Path, suffixes: tuple[str, ...]) -> str:
    """Sampled fingerprint of the files directly in a directory with one of `suffixes` (dot files left out):
    their names and sampled_sha256 digests, in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes):
        if f.name.startswith("."):
            continue
        h.update(f.name.encode())
        h.update(sampled_sha256(f).encode())
    return h.hexdigest()[:32]


def file_info(path: Path) -> dict[str, Any]:
    """What file_problem later checks a file against: content fingerprint, size, modification time."""
    st = path.stat()
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def file_problem(path: Path, info: dict[str, Any]) -> str | None:
    """Why `path` no longer is the file `info` recorded, or None when it is."""
    if not path.is_file():
        return "is missing"
    st = path.stat()
    if st.st_size != info["size"]:
        return f"has {st.st_size} bytes, the manifest recorded {info['size']} (truncated or replaced)"
    if st.st_size > FULL_HASH_LIMIT and st.st_mtime_ns == info.get("mtime_ns"):
        return None
    if sha256_file(path) != info["sha256"]:
        return "changed or corrupted (content fingerprint differs)"
    return None


def tree_info(root: Path) -> dict[str, dict[str, Any]]:
    """file_info of every file under a directory (links followed), by relative path."""
    return {str(p.relative_to(root)): file_info(p) for p in sorted(root.rglob("*")) if p.is_file()}


def tree_fingerprint(infos: dict[str, dict[str, Any]]) -> str:
    """One fingerprint of a tree_info: its relative paths and their contents."""
    return hashlib.sha256(json.dumps({n: i["sha256"] for n, i in infos.items()}, sort_keys=True).encode()
                          ).hexdigest()


def tree_problem(root: Path, infos: dict[str, dict[str, Any]]) -> str | None:
    """Why the tree under `root` no longer is the one `infos` (tree_info) recorded, or None when it is."""
    if not root.is_dir():
        return "is missing"
    names = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    if names != set(infos):
        changed = sorted(names ^ set(infos))
        return f"holds other files than the manifest recorded ({', '.join(changed[:3])})"
    for name, info in infos.items():
        problem = file_problem(root / name, info)
        if problem:
            return f"{name} {problem}"
    return None
