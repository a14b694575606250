"""Files the project writes and reads: atomic writes, and the one JSON reader.

Atomic file writes: write to a temporary file beside the target, then rename.

A crash or an exception mid-write never leaves a half-written output file. The file gets the
permissions a plain ``open(path, "w")`` would give it (an existing target's mode, else
``0o666`` minus the umask), not the temporary file's private ``0o600``. A process killed
mid-write leaves its temporary file (``.<name>.<random>.tmp``, see :data:`TEMP_GLOB`);
:func:`remove_stale_temporaries` deletes those.

:func:`read_json_file` reads a JSON file a user names (a genotype, an architecture, a latency
table, an annotation file), with one clear error for a missing file, a file of another kind
(binary, a zip such as a ``model.pt``, empty) or invalid JSON.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Optional

from threempose.util.errors import write_failure

TEMP_GLOB = ".*.tmp"      # names of atomic_open's temporary files (and of staged folders)
_ZIP_MAGIC = b"PK\x03\x04"     # torch.save's format (and any zip archive)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """Permission bits a new file (``0o666``) or folder (``0o777``) gets under the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed atomic writes left directly in ``folder``;
    returns their paths. Only call this where no other process is writing."""
    removed = []
    for tmp in Path(folder).glob(TEMP_GLOB):
        if tmp.is_file():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Create the missing folders above ``path`` (modes under the umask); returns the ones
    created, outermost first, for :func:`remove_if_empty` to undo."""
    created = []
    parent = Path(path).absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    created.reverse()
    for folder in created:
        with contextlib.suppress(FileExistsError):       # another process made it meanwhile
            folder.mkdir()
    return created


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders of :func:`make_parents` again, innermost first, while they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:                     # not empty (another writer) or gone: leave the rest
            return


def make_temp_dir(final: str | os.PathLike) -> Path:
    """A new private-named temporary folder beside ``final`` (``.<name>.<random>.tmp``) with the
    mode a plain ``mkdir`` would give it under the umask (``tempfile.mkdtemp`` makes it 0o700):
    for outputs written as a folder and renamed onto ``final`` when complete."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def named_write_error(exc: BaseException, path: str | os.PathLike) -> BaseException:
    """``exc`` itself, or when it is (or was caused by) a failed write of
    :data:`~threempose.util.errors.WRITE_ERRNOS` (disk full, quota, read-only, I/O error), an
    ``OSError`` of the same errno naming ``path`` (a ``write()`` error names no file, and
    ``torch.save`` wraps it in a RuntimeError)."""
    failure = write_failure(exc)
    if failure is None or failure.filename == str(path):
        return exc
    named = OSError(failure.errno, failure.strerror, str(path))
    named.__cause__ = exc
    return named


def in_final_place(exc: BaseException, tmp: Path, final: Path) -> BaseException:
    """``exc``, or for a failed write of a file under the temporary folder ``tmp`` (see
    :func:`staged_dir`), the same error naming that file's place under ``final``."""
    failure = write_failure(exc)
    if failure is None or failure.filename is None:
        return exc
    try:
        inside = Path(failure.filename).relative_to(tmp)
    except ValueError:
        return exc
    return named_write_error(exc, final / inside)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """A folder output that appears complete or not at all: yields a temporary folder beside
    ``final`` (:func:`make_temp_dir`), renamed onto ``final`` (absent or empty; with ``replace``
    an earlier ``final`` is moved aside and deleted) on success. On an exception it is deleted
    with the folders made for it, and a failed write names its file under ``final``, not the
    temporary folder."""
    final = Path(final)
    created = make_parents(final)
    tmp = None
    try:
        tmp = make_temp_dir(final)
        yield tmp
        old = None
        if replace and final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(created)
        named = in_final_place(e, tmp, final) if tmp is not None else e
        if named is e:
            raise
        raise named from e


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed, ``path`` is untouched (a previous file
    stays whole) and the folders made for it are removed again; a failed write (disk full,
    quota, read-only, I/O error) is raised as an ``OSError`` naming ``path``.
    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    created = []
    tmp = None
    try:
        created = make_parents(path)
        try:
            final_mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            final_mode = default_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), final_mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        remove_if_empty(created)
        named = named_write_error(e, path)
        if named is e:
            raise
        raise named from e


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Serialise ``obj`` as JSON into ``path`` atomically."""
    text = json.dumps(obj, indent=indent)
    with atomic_open(path, "w") as f:
        f.write(text)
        f.write("\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj, path)`` atomically (checkpoints are never half-written)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def not_json_reason(head: bytes, complete: bool) -> Optional[str]:
    """Why a file that starts with ``head`` (all of it when ``complete``) cannot be JSON text, in
    words (a zip archive such as a ``model.pt``, binary, empty); None when it may be."""
    if head.startswith(_ZIP_MAGIC):
        return "a zip archive, e.g. a PyTorch checkpoint such as model.pt"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError as e:
        return f"binary: byte {e.start} is not UTF-8 text"
    if "\x00" in text:
        return "binary: it holds NUL bytes"
    if complete and not text.strip():
        return "it is empty"
    return None


def read_json_file(path: str | Path, error: type[Exception], what: str, hint: str = "") -> Any:
    """The parsed content of ``path``; ``error`` with one line when it is missing (``"<what> not
    found: <path>"`` plus ``hint``), a folder, not UTF-8 text (a binary file such as a
    ``model.pt``: ``"<path>: not a JSON file ..."``), empty, or not valid JSON."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a JSON file")
    if not path.is_file():
        raise error(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    data = path.read_bytes()
    reason = not_json_reason(data, complete=True)
    if reason is not None:
        raise error(f"{path}: not a JSON file ({reason}); expected a JSON {what}")
    text = data.decode("utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e}") from None
