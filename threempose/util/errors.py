"""The user's errors: what a command reports as one line (``error: ...``) and exit status 2.

:class:`UserError` is the base of every error a user can fix from its message alone
(``ConfigError``, ``GenotypeError``, ``CheckpointError``, ``RunDirError``, ``AnnotationError``,
``ImageReadError`` ...); :func:`user_error_message` decides whether an exception is one.
:func:`threempose.util.cli.entry_point` turns them into the one line.
"""
from __future__ import annotations

from typing import Optional

EXIT_USER_ERROR = 2

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
    if isinstance(exc, _PATH_ERRORS):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return str(exc)
    return None
