"""A folder run's results, written as they are produced, resumable after a kill.

Each finished image appends one JSON line to the journal ``<out>.partial`` (beside the
results file): ``{"record": per-image record, "results": [COCO results of its people]}``,
flushed at once, so memory stays flat however many images a run has and a killed run
loses at most the image in flight. :meth:`ResultJournal.finish` streams the journal into
the final files (the COCO results list and the per-image summary, each written to a
temporary file and renamed) and removes the journal. ``infer --resume`` reads the journal
of a killed run (:meth:`ResultJournal.done_files`; a torn last line is dropped) and
continues after the images it holds.
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from threempose.util.files import atomic_open


class ResultJournal:
    """The journal of one results file ``out``; open it with :meth:`open` (resume or not)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out.with_name(self.out.name + ".partial")
        self._file: IO[str] | None = None

    def done_files(self) -> set[str]:
        """Files (as recorded) whose results the journal holds."""
        return {entry["record"]["file"] for entry in self.entries()}

    def entries(self) -> Iterator[dict[str, Any]]:
        """The journal's complete lines, in order (a torn last line of a killed run is skipped)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    return
                yield json.loads(line)

    def open(self, resume: bool) -> None:
        """Start appending: after the complete lines of a previous run's journal with ``resume``,
        else to a new, empty journal."""
        if resume and self.path.is_file():
            keep = self.path.with_name(self.path.name + ".tmp")
            with open(keep, "w", encoding="utf-8") as f:      # drop a torn last line
                f.writelines(json.dumps(entry) + "\n" for entry in self.entries())
            os.replace(keep, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")

    def append(self, record: dict[str, Any], results: list[dict[str, Any]]) -> None:
        """One finished image: its record and its people's COCO results."""
        assert self._file is not None, "open() the journal first"
        self._file.write(json.dumps({"record": record, "results": results}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Close and remove the journal (a run that produced nothing)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def totals(self) -> dict[str, Any]:
        """Totals over every image in the journal: images, people, exits taken, mean GFLOPs."""
        n = people = 0
        gflops = 0.0
        exits: collections.Counter = collections.Counter()
        for entry in self.entries():
            r = entry["record"]
            n, people, gflops = n + 1, people + r["people"], gflops + r["gflops"]
            exits[r["exit"]] += 1
        return {"images": n, "people": people, "exits": {str(k): exits[k] for k in sorted(exits)},
                "mean_gflops": gflops / n if n else 0.0}

    def finish(self, per_image: Path, header: dict[str, Any], skipped: list[dict[str, str]]) -> int:
        """Write ``out`` (the COCO results list) and ``per_image`` (``header``, then ``images``: the
        records, and ``skipped``) from the journal, streaming, each atomically; remove the journal.
        Returns the number of results (people) written."""
        self.close()
        people = 0
        with atomic_open(self.out) as f:
            f.write("[")
            for entry in self.entries():
                for result in entry["results"]:
                    f.write((", " if people else "") + json.dumps(result))
                    people += 1
            f.write("]\n")
        with atomic_open(per_image) as f:
            f.write(json.dumps(header)[:-1] + ', "images": [')
            for k, entry in enumerate(self.entries()):
                f.write((", " if k else "") + json.dumps(entry["record"]))
            f.write("], \"skipped\": " + json.dumps(skipped) + "}\n")
        self.path.unlink()
        return people
