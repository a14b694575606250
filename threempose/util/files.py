"""Files the project writes and reads: atomic writes, and the one JSON reader.

Atomic file writes: write to a temporary file beside the target, then rename.

A crash or an exception mid-write never leaves a half-written output file. The file gets the
permissions a plain ``open(path, "w")`` would give it (an existing target's mode, else
``0o666`` minus the umask), not the temporary file's private ``0o600``. A process killed
mid-write leaves its temporary file (``.<name>.<random>.tmp``, see :data:`TEMP_GLOB`);
:func:`remove_stale_temporaries` deletes those.

:func:`read_json_file` reads a JSON file a user names (a genotype, an architecture, a latency
table), with one clear error for a missing file or invalid JSON.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

TEMP_GLOB = ".*.tmp"      # names of atomic_open's temporary files (and of staged folders)


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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        final_mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        final_mode = default_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), final_mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def read_json_file(path: str | Path, error: type[Exception], what: str, hint: str = "") -> Any:
    """The parsed content of ``path``; ``error`` when it is missing (``"<what> not found:
    <path>"`` plus ``hint``) or is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e}") from None
