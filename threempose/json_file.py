"""Reading a JSON file a user names (a genotype, an architecture, a latency table), with one
clear error for a missing file or invalid JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
