"""PCKh@0.5 and PCKh@0.1 on MPII-style annotations, per joint and mean, as PNFS Table V reports.

A predicted joint is correct when its distance to the ground truth is at most
``threshold x head size``, the head size being 0.6 x the diagonal of the
annotated head box (the MPII protocol, ``SC_BIAS = 0.6`` in the MPII toolkit).
Only annotated joints count. The table follows the MPII toolkit as HRNet
reports it: Head is the head top; Shoulder .. Ankle average the left and right
joints' PCKh; Mean (@0.5) and Mean@0.1 average 14 joints (all but pelvis and
thorax) weighted by how many of each are annotated. Values are percentages.
(HRNet's code reads its "Mean@0.1" at threshold 0.11, an off-by-one in its
threshold array; here it is 0.1.)

Annotation file: a JSON list, one object per person, in MPII joint order
(:data:`MPII_JOINT_NAMES`, the order of the MPII release and of HRNet's
``mpii/annot/*.json``)::

    {"image": "015601864.jpg",                # image file name (informational)
     "joints": [[x, y], ... 16],              # pixels
     "joints_vis": [1, 0, ... 16],            # 1 = annotated (counted), 0 = not
     "headbox": [[x1, y1], [x2, y2]],         # head rectangle corners, pixels: the MPII
                                              # .mat annorect x1, y1, x2, y2 (gt_valid.mat's
                                              # headboxes_src); [x1, y1, x2, y2] works too
     "center": [x, y], "scale": s}            # optional; not used by PCKh

Predictions file: a JSON list with one entry per annotation (same order), each
16 x [x, y] or 16 x [x, y, score] (the score is ignored), in the same pixel
convention as ``joints``.

Usage::

    python -m threempose.pnfs.pckh --annotations valid.json --predictions preds.json [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from threempose.util.cli import entry_point
from threempose.util.errors import UserError

MPII_JOINT_NAMES = (
    "right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
    "pelvis", "thorax", "upper_neck", "head_top",
    "right_wrist", "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist",
)
NUM_MPII_JOINTS = len(MPII_JOINT_NAMES)
MPII_FLIP_INDEX = tuple(MPII_JOINT_NAMES.index(n.replace("left", "@").replace("right", "left").replace("@", "right"))
                        for n in MPII_JOINT_NAMES)
"""``MPII_FLIP_INDEX[j]``: the joint that ``j`` becomes after a horizontal flip (left <-> right)."""
HEAD_SIZE_FACTOR = 0.6
_J = {name: i for i, name in enumerate(MPII_JOINT_NAMES)}

# Table V columns: (name, joints averaged with equal weight).
TABLE_GROUPS = (
    ("Head", ("head_top",)),
    ("Shoulder", ("left_shoulder", "right_shoulder")),
    ("Elbow", ("left_elbow", "right_elbow")),
    ("Wrist", ("left_wrist", "right_wrist")),
    ("Hip", ("left_hip", "right_hip")),
    ("Knee", ("left_knee", "right_knee")),
    ("Ankle", ("left_ankle", "right_ankle")),
)
_NOT_IN_MEAN = (_J["pelvis"], _J["thorax"])


class PCKhInputError(UserError, ValueError):
    """An annotation or predictions file is missing or malformed."""


def _read_json_list(path: str | Path, what: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise PCKhInputError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PCKhInputError(f"{path}: {what} file is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise PCKhInputError(f"{path}: {what} file must be a non-empty JSON list")
    return data


def _array(value: Any, shapes: tuple[tuple[int, ...], ...], where: str, key: str) -> np.ndarray:
    """``value`` as finite float64 of one of ``shapes``, or PCKhInputError naming ``where`` and ``key``."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape not in shapes or not np.isfinite(array).all():
        got = list(array.shape) if array is not None else "non-numeric values"
        wanted = " or ".join(str(list(s)) for s in shapes)
        raise PCKhInputError(f"{where}: '{key}' must be finite numbers of shape {wanted}, got {got}")
    return array


def load_annotations(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an MPII-style annotation file (layout in the module docstring).

    Returns:
        ``joints`` float64 ``[N, 16, 2]``; ``visible`` bool ``[N, 16]``;
        ``headboxes`` float64 ``[N, 2, 2]`` (two corners).
    """
    entries = _read_json_list(path, "annotation")
    joints, visible, headboxes = [], [], []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise PCKhInputError(f"{where} is not a JSON object")
        missing = [k for k in ("joints", "joints_vis", "headbox") if k not in entry]
        if missing:
            raise PCKhInputError(f"{where} lacks {', '.join(missing)} (expected keys: image, joints, "
                                 "joints_vis, headbox)")
        joints.append(_array(entry["joints"], ((NUM_MPII_JOINTS, 2),), where, "joints"))
        visible.append(_array(entry["joints_vis"], ((NUM_MPII_JOINTS,),), where, "joints_vis") > 0)
        box = _array(entry["headbox"], ((2, 2), (4,)), where, "headbox").reshape(2, 2)
        if np.linalg.norm(box[1] - box[0]) <= 0:
            raise PCKhInputError(f"{where}: 'headbox' {box.tolist()} has zero size")
        headboxes.append(box)
    return np.stack(joints), np.stack(visible), np.stack(headboxes)


def load_predictions(path: str | Path, count: int) -> np.ndarray:
    """Read ``count`` predictions, each 16 x [x, y] or [x, y, score]; returns float64 ``[count, 16, 2]``."""
    entries = _read_json_list(path, "predictions")
    if len(entries) != count:
        raise PCKhInputError(f"{path}: {len(entries)} predictions for {count} annotated people; "
                             "give one 16-joint prediction per annotation entry, in the same order")
    shapes = tuple((NUM_MPII_JOINTS, columns) for columns in (2, 3))
    return np.stack([_array(entry, shapes, f"{path}: prediction {i}", "joints")[:, :2]
                     for i, entry in enumerate(entries)])


def pckh_per_joint(predictions: np.ndarray, joints: np.ndarray, visible: np.ndarray,
                   headboxes: np.ndarray, threshold: float) -> np.ndarray:
    """PCKh of each joint at ``threshold`` (a fraction of the head size).

    Args:
        predictions, joints: ``[N, 16, 2]`` pixels; visible: bool ``[N, 16]``;
        headboxes: ``[N, 2, 2]``.
    Returns:
        float64 ``[16]``, percent of annotated joints within ``threshold x head size``
        (NaN for a joint annotated nowhere).
    """
    head_size = HEAD_SIZE_FACTOR * np.linalg.norm(headboxes[:, 1] - headboxes[:, 0], axis=-1)   # [N]
    error = np.linalg.norm(predictions - joints, axis=-1) / head_size[:, None]                  # [N, 16]
    correct = ((error <= threshold) & visible).sum(axis=0)
    count = visible.sum(axis=0)
    return np.divide(100.0 * correct, count, out=np.full(NUM_MPII_JOINTS, np.nan), where=count > 0)


def pckh_table(predictions: np.ndarray, joints: np.ndarray, visible: np.ndarray,
               headboxes: np.ndarray) -> dict[str, Any]:
    """PNFS Table V's numbers.

    Returns:
        ``{"Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1":
        float percent, "per_joint": {joint name: PCKh@0.5}, "per_joint@0.1": {...}}``.
    """
    at_05 = pckh_per_joint(predictions, joints, visible, headboxes, 0.5)
    at_01 = pckh_per_joint(predictions, joints, visible, headboxes, 0.1)
    counts = visible.sum(axis=0).astype(np.float64)
    counts[list(_NOT_IN_MEAN)] = 0.0
    if counts.sum() == 0:
        raise PCKhInputError("no annotated joint (joints_vis) outside pelvis and thorax; PCKh is undefined")
    ratio = counts / counts.sum()
    table: dict[str, Any] = {name: float(np.mean([at_05[_J[j]] for j in members]))
                             for name, members in TABLE_GROUPS}
    table["Mean"] = float(np.nansum(at_05 * ratio))
    table["Mean@0.1"] = float(np.nansum(at_01 * ratio))
    table["per_joint"] = {name: float(v) for name, v in zip(MPII_JOINT_NAMES, at_05)}
    table["per_joint@0.1"] = {name: float(v) for name, v in zip(MPII_JOINT_NAMES, at_01)}
    return table


def evaluate_pckh(annotations: str | Path, predictions: str | Path) -> dict[str, Any]:
    """:func:`pckh_table` of a predictions file against an annotation file."""
    joints, visible, headboxes = load_annotations(annotations)
    return pckh_table(load_predictions(predictions, len(joints)), joints, visible, headboxes)


def format_table(table: dict[str, Any]) -> str:
    """Table V's row (Head .. Mean@0.1) as text."""
    names = [name for name, _ in TABLE_GROUPS] + ["Mean", "Mean@0.1"]
    return "  ".join(f"{n:>8}" for n in names) + "\n" + "  ".join(f"{table[n]:8.1f}" for n in names)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m threempose.pnfs.pckh",
                                     description="PCKh@0.5 / PCKh@0.1 on MPII-style annotations")
    parser.add_argument("--annotations", required=True, help="MPII-style annotation JSON (see module doc)")
    parser.add_argument("--predictions", required=True, help="JSON list of 16 x [x, y] per annotation")
    parser.add_argument("--json", action="store_true", help="print all numbers as one JSON object")
    args = parser.parse_args(argv)
    table = evaluate_pckh(args.annotations, args.predictions)
    print(json.dumps(table) if args.json else format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
