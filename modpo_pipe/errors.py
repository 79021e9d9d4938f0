"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class ModpoError(Exception):
    """A problem with the user's input, config or files; the message names the file, row or key."""
