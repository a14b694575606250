"""A folder run's results, written as they are produced, resumable after a kill.

Each finished image appends one JSON line to the journal ``<out>.partial`` (beside the
results file, a :class:`threempose.util.journal.Journal`): ``{"record": per-image record,
"results": [COCO results of its people]}``, flushed at once, so memory stays flat however many
images a run has and a killed run loses at most the image in flight.
:meth:`ResultJournal.finish` streams the journal into the final files (the COCO results list
and the per-image summary, each written to a temporary file and renamed) and removes the
journal. ``infer --resume`` reads the journal
of a killed run (:meth:`ResultJournal.open`, which fills ``done``; a torn last line is dropped) and
continues after the images it holds.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

from threempose.util.files import atomic_open
from threempose.util.journal import Journal, journal_path


class ResultJournal(Journal):
    """The journal of one results file ``out``; open it with :meth:`open` (resume or not).

    ``done``: the files (as recorded) whose results it holds; :meth:`totals` counts them, both kept
    up to date by :meth:`open` and :meth:`append` (the journal is read once when resuming and once
    by :meth:`finish`, never held)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        super().__init__(journal_path(self.out), key=lambda entry: entry["record"]["file"])
        self._images = self._people = 0
        self._gflops = 0.0
        self._exits: collections.Counter = collections.Counter()

    def append(self, record: dict[str, Any], results: list[dict[str, Any]]) -> None:
        """One finished image: its record and its people's COCO results."""
        self.add({"record": record, "results": results})

    def _count(self, entry: dict[str, Any]) -> None:
        super()._count(entry)
        record = entry["record"]
        self._images += 1
        self._people += record["people"]
        self._gflops += record["gflops"]
        self._exits[record["exit"]] += 1

    def totals(self) -> dict[str, Any]:
        """Totals over every image in the journal: images, people, exits taken, mean GFLOPs."""
        n = self._images
        return {"images": n, "people": self._people,
                "exits": {str(k): self._exits[k] for k in sorted(self._exits)},
                "mean_gflops": self._gflops / n if n else 0.0}

    def finish(self, per_image: Path, header: dict[str, Any], skipped: list[dict[str, str]]) -> int:
        """Write ``out`` (the COCO results list) and ``per_image`` (``header``, then ``images``: the
        records, and ``skipped``) from the journal in one streaming pass, each atomically; remove
        the journal. Returns the number of results (people) written."""
        self.close()
        people = images = 0
        with atomic_open(self.out) as results, atomic_open(per_image) as records:
            results.write("[")
            records.write(json.dumps(header)[:-1] + ', "images": [')
            for entry in self.entries():
                if entry["results"]:
                    results.write((", " if people else "") + json.dumps(entry["results"])[1:-1])
                    people += len(entry["results"])
                records.write((", " if images else "") + json.dumps(entry["record"]))
                images += 1
            results.write("]\n")
            records.write('], "skipped": ' + json.dumps(skipped) + "}\n")
        self.path.unlink()
        return people
