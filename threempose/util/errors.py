"""The user's errors: what a command reports as one line (``error: ...``) and exit status 2.

:class:`UserError` is the base of every error a user can fix from its message alone
(``ConfigError``, ``GenotypeError``, ``CheckpointError``, ``RunDirError``, ``AnnotationError``,
``ImageReadError`` ...); :func:`user_error_message` decides whether an exception is one.
:func:`threempose.util.cli.entry_point` turns them into the one line. So does a write the disk
refused (:data:`WRITE_ERRNOS`: disk full, over quota, read-only file system, I/O error):
``error: cannot write <path>: No space left on device``.
"""
from __future__ import annotations

import errno
from typing import Optional

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130     # 128 + SIGINT, as a shell reports Ctrl-C

# errnos of a write the disk refused: full, over quota, read-only, failing (one line, not a bug)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG})

# OS errors that name a path the user gave (not a failing disk or a bug).
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class UserError(Exception):
    """An error the user can fix from its message alone: commands print it as one line and
    exit 2. The project's input errors subclass it (``ConfigError``, ``GenotypeError``,
    ``CheckpointError``, ``RunDirError``, ``AnnotationError``, ``ImageReadError`` ...)."""


class OutputPathError(UserError):
    """An output path that cannot be written (a directory, a parent that is a file ...)."""


def user_error_message(exc: BaseException, also: tuple[type[BaseException], ...] = ()) -> Optional[str]:
    """The one-line report of ``exc`` when it is a user's error (or one of the types ``also``),
    else None."""
    if isinstance(exc, (UserError, *also)):
        return str(exc)
    failure = write_failure(exc)
    if failure is not None:
        where = f" {failure.filename}" if failure.filename is not None else ""
        return f"cannot write{where}: {failure.strerror or failure}"
    if isinstance(exc, _PATH_ERRORS):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return str(exc)
    return None


def write_failure(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` of :data:`WRITE_ERRNOS` that ``exc`` is or was raised from (its
    ``__cause__`` / ``__context__`` chain: ``torch.save`` wraps a failed write in a
    RuntimeError), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
