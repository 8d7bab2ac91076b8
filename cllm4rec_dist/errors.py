"""The one error boundary: user mistakes are one line and exit status 2; bugs keep their traceback.

Every known user-facing error type (bad input rows, a broken dataset folder, an
unusable checkpoint, a wrong config value, a run folder held by another run)
derives from ``UserError``. Its message says what is wrong, where (file, line,
field) and how to fix it. ``run_command`` is the boundary every entry point
(`cllm4rec <command>`, the launchers) goes through: a ``UserError``, or an
operating-system error that names a file (missing path, a folder given as a
file, no permission), prints ``error: <message>`` on one line and returns 2.
Anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import sys

USER_ERROR_EXIT = 2
_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class UserError(Exception):
    """A mistake in what the user gave us (file, setting, folder); the message names it and the fix."""


class EvaluateError(UserError, ValueError):
    """A checkpoint or dataset `cllm4rec evaluate` cannot score; the message says what to pass instead."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def describe_os_error(err: OSError) -> str | None:
    """A one-line message for an OS error that names a file, else None (then it is not a user error)."""
    if not isinstance(err, _OS_ERRORS) or not err.filename:
        return None
    fix = {FileNotFoundError: "check the path",
           IsADirectoryError: "a folder was given where a file is expected; pass the file inside it",
           NotADirectoryError: "a file was given where a folder is expected; pass its folder",
           PermissionError: "check the file's permissions"}[type(err)]
    return f"{err.filename}: {err.strerror or type(err).__name__}; {fix}."


def run_command(fn, *args, **kwargs) -> int:
    """Call ``fn`` and turn a user error into one line on stderr and exit status 2."""
    try:
        return int(fn(*args, **kwargs) or 0)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    except OSError as err:
        message = describe_os_error(err)
        if message is None:
            raise
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
