"""COCO keypoint evaluation: OKS-based AP/AR from pycocotools' COCOeval.

Usage::

    python -m threempose.evaluate --annotations person_keypoints_val2017.json \\
        --results results.json [--json]

    stats = evaluate_keypoints("person_keypoints_val2017.json", "results.json")
    stats["AP"], stats["AR"]

Both inputs are checked before COCOeval sees them; bad input raises
:class:`EvaluationInputError` naming the file and the offending entry.
Values follow COCOeval: in [0, 1], or -1 where the evaluated images hold no
ground-truth person in that area range (e.g. APM with no medium person).
An empty results list means "nothing detected": it is scored as such (AP and
AR are 0 wherever there are people) with a warning, not rejected, so that a
search epoch whose model finds nobody still gets a score.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from threempose.data.coco_eval import evaluate_keypoints, format_table
from threempose.util.cli import entry_point


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m threempose.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", required=True, help="COCO person-keypoints annotation JSON")
    parser.add_argument("--results", required=True, help="COCO keypoint results JSON (a list of detections)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.add_argument("--verbose", action="store_true", help="show pycocotools' progress output")
    args = parser.parse_args(argv)
    stats = evaluate_keypoints(args.annotations, args.results, verbose=args.verbose)
    print(json.dumps(stats) if args.json else format_table(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
