"""A run's finished work items, written as they are produced, resumable after a kill.

A :class:`Journal` is a JSON-lines file: one line per finished item, flushed at once, so a
long run holds none of them in memory and a killed run loses at most the item in flight.
Resuming (``open(resume=True)``) keeps the complete lines of the previous run (a torn last
line is dropped) and fills ``done`` with their keys, so the caller skips those items.

A journal made with a ``header`` (what the items depend on: model, settings, input set)
starts with the line ``{"journal": header}``; resuming a journal whose header differs is a
:class:`JournalMismatch` naming the first field that differs, never a silent mix of two
runs' items. ``infer``'s :class:`threempose.inference.result_journal.ResultJournal` and
``calibrate``'s per-image exit records are journals.
"""
from __future__ import annotations

import json
import os
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import IO, Any, Callable, Optional

from threempose.util.errors import UserError


class JournalMismatch(UserError, ValueError):
    """A journal to resume was written by a run with other inputs or settings."""


def first_difference(old: Any, new: Any, prefix: str = "") -> Optional[str]:
    """``"name: old vs new"`` for the first differing field of two JSON values (nested
    objects are compared field by field, names joined with dots); None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            diff = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if diff is not None:
                return diff
        return None
    if old == new:
        return None
    return f"{prefix[:-1] or 'header'}: {json.dumps(old)} vs {json.dumps(new)}"


def journal_path(out: str | os.PathLike) -> Path:
    """Where a command keeps the journal of its output file ``out`` while it runs: ``OUT.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class Journal:
    """The JSON-lines journal at ``path``; ``key(entry)`` names an entry's item (its keys make
    ``done``); ``header``: see the module docstring. Open it with :meth:`open`."""

    def __init__(self, path: str | os.PathLike, key: Callable[[dict[str, Any]], Hashable],
                 header: Optional[dict[str, Any]] = None):
        self.path = Path(path)
        self.key = key
        self.header = header
        self.done: set = set()
        self._file: IO[str] | None = None

    def _lines(self) -> Iterator[dict[str, Any]]:
        """Every complete line (the header's included), in order; a torn last line is skipped."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return
                yield json.loads(line)

    def entries(self) -> Iterator[dict[str, Any]]:
        """The journal's complete entries, in order (the header line left out)."""
        lines = self._lines()
        if self.header is not None:
            next(lines, None)
        yield from lines

    def _check_header(self) -> bool:
        """Whether the file holds a complete header line; raise if it is another run's."""
        first = next(self._lines(), None)
        if first is None:
            return False
        written = first.get("journal") if isinstance(first, dict) else None
        if written is None:
            diff = "it has no header line"
        else:
            diff = first_difference(written, self.header)
        if diff is not None:
            raise JournalMismatch(f"{self.path} holds another run's results ({diff}); resuming would mix "
                                  "them: delete it or start over without --resume")
        return True

    def open(self, resume: bool) -> None:
        """Start appending: after the complete lines of a previous run's journal with ``resume``
        (its header must match), else to a new, empty journal."""
        resume = resume and self.path.is_file()
        if resume and self.header is not None and not self._check_header():
            resume = False                       # killed before its header was complete
        if resume:
            keep = self.path.with_name(self.path.name + ".tmp")
            with open(keep, "w", encoding="utf-8") as f:      # drop a torn last line
                for i, line in enumerate(self._lines()):
                    if i or self.header is None:
                        self._count(line)
                    f.write(json.dumps(line) + "\n")
            os.replace(keep, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 (held open)
        if not resume and self.header is not None:
            self._write({"journal": self.header})

    def add(self, entry: dict[str, Any]) -> None:
        """One finished item, on disk when this returns."""
        assert self._file is not None, "open() the journal first"
        self._write(entry)
        self._count(entry)

    def _write(self, line: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def _count(self, entry: dict[str, Any]) -> None:
        """Note a finished entry (subclasses keep running totals here too)."""
        self.done.add(self.key(entry))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Close and remove the journal."""
        self.close()
        self.path.unlink(missing_ok=True)
