"""Reading a JSON file a user names (a genotype, an architecture, a latency table, an annotation
file), with one clear error for a missing file, a file of another kind or invalid JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_ZIP_MAGIC = b"PK\x03\x04"     # torch.save's format (and any zip archive)


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
    if data.startswith(_ZIP_MAGIC):
        raise error(f"{path}: not a JSON file (a zip archive, e.g. a PyTorch checkpoint such as "
                    f"model.pt); expected a JSON {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a JSON file (binary: byte {e.start} is not UTF-8 text); "
                    f"expected a JSON {what}") from None
    if "\x00" in text:
        raise error(f"{path}: not a JSON file (binary: it holds NUL bytes); expected a JSON {what}")
    if not text.strip():
        raise error(f"{path}: not a JSON file (it is empty); expected a JSON {what}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e}") from None
