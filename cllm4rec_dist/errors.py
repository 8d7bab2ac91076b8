"""The one error boundary: user mistakes are one line and exit status 2; bugs keep their traceback.

Every known user-facing error type (bad input rows, a broken dataset folder, an
unusable checkpoint, a wrong config value, a run folder held by another run)
derives from ``UserError``. Its message says what is wrong, where (file, line,
field) and how to fix it. ``run_command`` is the boundary every entry point
(`cllm4rec <command>`, the launchers) goes through: a ``UserError``, an
operating-system error that names a file (missing path, a folder given as a
file, no permission), or a full disk (ENOSPC, or a quota: EDQUOT) prints
``error: <message>`` on one line and returns 2. Anything else is a bug and
propagates with its traceback. A user error met ahead of a slow cleanup (the Ray
launcher's checks, while a local Ray is still starting) is printed at once by
``report_now`` and raised again as a ``ReportedError``, for which ``run_command``
only returns 2.
"""

from __future__ import annotations

import errno
import sys

USER_ERROR_EXIT = 2
_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How a full disk reads where the errno was lost on the way (pyarrow filesystems, C++ writers)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded")


class UserError(Exception):
    """A mistake in what the user gave us (file, setting, folder); the message names it and the fix."""


class EvaluateError(UserError, ValueError):
    """A checkpoint or dataset `cllm4rec evaluate` cannot score; the message says what to pass instead."""


class DiskFullError(UserError):
    """No space left (or a quota reached) while writing; the message names the file or folder, how much was being
    written and what was kept. ``path``: what was being written, when known."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def find_cause(err: BaseException | None, match) -> BaseException | None:
    """The first of ``err``, its causes and contexts, and the per-rank failures a wrapper collected
    (torch.distributed.checkpoint's CheckpointException: ``failures`` {rank: (exception, traceback)}) for which
    ``match(exception)`` is true; None if there is none."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if match(e):
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
    return None


def _disk_full_here(err: BaseException) -> bool:
    return isinstance(err, DiskFullError) or (isinstance(err, OSError) and (
        err.errno in DISK_FULL_ERRNOS or any(text in str(err).lower() for text in _DISK_FULL_TEXT)))


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` is, or was caused by, a full disk: an OSError with errno ENOSPC/EDQUOT (or saying so where
    the errno was lost) or a ``DiskFullError``, also behind another exception (``find_cause``: torch.save reports a
    failed write as a RuntimeError whose context is the OSError; DCP collects each rank's failure)."""
    return find_cause(err, _disk_full_here) is not None


def format_bytes(n: int | float) -> str:
    """``n`` bytes for a message: 512 B, 14.2 kB, 3.1 MB, 2.0 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def describe_os_error(err: OSError) -> str | None:
    """A one-line message for an OS error that names a file, or for a full disk, else None (then it is not a user
    error)."""
    if err.errno in DISK_FULL_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        return (f"{where}{err.strerror or 'no space left on device'}; free space on that disk (or write elsewhere) "
                "and run the command again.")
    if not isinstance(err, _OS_ERRORS) or not err.filename:
        return None
    fix = {FileNotFoundError: "check the path",
           IsADirectoryError: "a folder was given where a file is expected; pass the file inside it",
           NotADirectoryError: "a file was given where a folder is expected; pass its folder",
           PermissionError: "check the file's permissions"}[type(err)]
    return f"{err.filename}: {err.strerror or type(err).__name__}; {fix}."


class ReportedError(UserError):
    """A user error whose line is already on stderr (``report_now``): ``run_command`` only returns its status."""


def user_error_line(err: BaseException) -> str | None:
    """The ``error: <message>`` line of a user error (``UserError``, an OS error naming a file, a full disk), or None
    for anything else (a bug)."""
    if isinstance(err, UserError):
        return f"error: {one_line(err)}"
    message = describe_os_error(err) if isinstance(err, OSError) else None
    return None if message is None else f"error: {one_line(message)}"


def report_now(err: BaseException) -> ReportedError | None:
    """Print a user error's line at once, ahead of a slow cleanup on its way out (a local Ray cluster that must
    finish starting before it can be stopped); returns the ``ReportedError`` to raise in its place, or None (then
    ``err`` is a bug and goes on as it is)."""
    line = user_error_line(err)
    if line is None:
        return None
    print(line, file=sys.stderr, flush=True)
    return ReportedError(str(err))


def run_command(fn, *args, **kwargs) -> int:
    """Call ``fn`` and turn a user error into one line on stderr and exit status 2."""
    try:
        return int(fn(*args, **kwargs) or 0)
    except ReportedError:
        return USER_ERROR_EXIT
    except (UserError, OSError) as err:
        line = user_error_line(err)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
