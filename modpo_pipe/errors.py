"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

import errno

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
