"""Errors that the command line turns into one line on stderr and an exit code.

`UsageError` (exit 2) is the user's mistake: a bad flag value, a missing path, an empty data file,
an architecture t2r does not support. `T2RError` (exit 1) is everything else that t2r can explain in
one line: a corrupt weights file, a pickle-only checkpoint, a hub that cannot be reached.
"""


class T2RError(Exception):
    """A failure t2r can explain in one line. Exit code 1."""

    exit_code = 1


class UsageError(T2RError):
    """The user asked for something that cannot work as given. Exit code 2."""

    exit_code = 2


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`: a library's exception, fit to end a one-line error."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
