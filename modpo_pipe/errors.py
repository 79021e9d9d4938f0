"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator

# What the machine refused: the user's to fix, not a bug of ours, so one line instead of a traceback, with what
# to do. Outputs are written atomically: earlier ones are intact.
_FULL = "free space, then rerun"
_FORBIDDEN = "fix the permissions or choose another path"
_WHAT_TO_DO = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EROFS: _FORBIDDEN,
    errno.EACCES: _FORBIDDEN,
    errno.EPERM: _FORBIDDEN,
    errno.EEXIST: "a file is where a directory goes, or the reverse: choose another path",
    errno.EISDIR: "a directory is where a file goes: choose another path",
    errno.ENOTDIR: "a file is where a directory goes: choose another path",
}


class ModpoError(Exception):
    """A problem with the user's input, config or files; the message names the file, row or key."""


def environment_error(e: OSError) -> ModpoError | None:
    """The one-line error for an OSError the machine caused (an errno of _WHAT_TO_DO); None for any other."""
    if e.errno not in _WHAT_TO_DO:
        return None
    where = f"cannot write or read {e.filename}" if e.filename else "a write failed"
    return ModpoError(f"{where}: {e.strerror or e}; {_WHAT_TO_DO[e.errno]} (finished outputs are intact)")


@contextlib.contextmanager
def out_of_memory(stage: str, what_to_lower: str) -> Iterator[None]:
    """A device out of memory in `stage` (torch.OutOfMemoryError: CUDA, MPS, XPU): one line naming the settings
    to lower, instead of a traceback that names none. Usable as a decorator. Finished parts and saved training
    state are kept, so the rerun goes on from them."""
    try:
        yield
    except Exception as e:
        torch = sys.modules.get("torch")  # an OutOfMemoryError means torch is loaded; this module never loads it
        if torch is None or not isinstance(e, torch.OutOfMemoryError):
            raise
        first = next(iter(str(e).strip().splitlines()), "")
        if len(first) > 200:  # CUDA's message runs on for a paragraph: keep its whole first sentences
            first = first[:200].rsplit(". ", 1)[0] + "."
        raise ModpoError(f"{stage}: out of device memory ({first}); lower {what_to_lower}, then rerun: "
                         "finished work is kept") from None
