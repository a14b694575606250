"""COCO keypoint evaluation with pycocotools' COCOeval: AP/AR of a results file (or list) against
ground-truth annotations, with the inputs checked first (one clear error, not a COCOeval
traceback). The library behind ``python -m threempose.evaluate``."""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from threempose.data.coco_schema import check_keypoint_annotations, is_int, is_number
from threempose.data.keypoints import NUM_JOINTS
from threempose.util.errors import UserError
from threempose.util.files import read_json_file

METRIC_NAMES = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")


# (IoU threshold, area range) of each metric, in COCOeval's stats order; maxDets is 20.
_METRIC_RANGES = (
    ("0.50:0.95", "all"), ("0.50", "all"), ("0.75", "all"), ("0.50:0.95", "medium"),
    ("0.50:0.95", "large"),
) * 2


_KEYPOINT_VALUES = 3 * NUM_JOINTS  # 51: x, y, score/visibility per joint


class EvaluationInputError(UserError, ValueError):
    """An annotation or results file (or list) is missing or malformed."""


def evaluate_keypoints(
    annotations: str | Path | COCO,
    results: str | Path | list[dict],
    image_ids: Sequence[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """COCO keypoint AP/AR of ``results`` against ``annotations``.

    ``annotations``: a COCO person-keypoints JSON file or a loaded ``COCO``.
    ``results``: a COCO results JSON file or list of detections
    ``{"image_id", "category_id", "keypoints": 51 numbers (x, y, score per joint, pixels),
    "score"}``. ``image_ids`` restricts evaluation to those images (detections
    on other images are ignored). ``verbose`` lets pycocotools print its progress.
    Returns the ten numbers of :data:`METRIC_NAMES` as floats. The caller's
    results list is not modified.
    """
    gt, gt_name = _ground_truth(annotations, verbose)
    detections, results_name = _results(results, gt, gt_name)
    selected = _selected_images(image_ids, gt, gt_name)
    if not detections:
        warnings.warn(f"{results_name}: no detections; scored as nothing found "
                      "(AP and AR are 0 wherever there are people)", stacklevel=2)
    with _quiet(verbose):
        dt = gt.loadRes(detections) if detections else _no_detections(gt)
        coco_eval = COCOeval(gt, dt, iouType="keypoints")
        if selected is not None:
            coco_eval.params.imgIds = selected
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}


def format_table(stats: dict[str, float]) -> str:
    """The ten metrics as a plain-text table, one metric a line."""
    lines = ["metric  OKS        area    value   (maxDets=20)"]
    for name, (iou, area) in zip(METRIC_NAMES, _METRIC_RANGES):
        lines.append(f"{name:<7} {iou:<10} {area:<7} {stats[name]:6.3f}")
    return "\n".join(lines)


def _quiet(verbose: bool) -> contextlib.AbstractContextManager:
    """A context that keeps pycocotools' prints off stdout unless ``verbose``."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _ground_truth(annotations: str | Path | COCO, verbose: bool) -> tuple[COCO, str]:
    """A checked ``COCO`` object and a name for it in error messages."""
    if isinstance(annotations, COCO):
        name = "annotations (COCO object)"
        _check_ground_truth(annotations.dataset, name)
        return annotations, name
    if not isinstance(annotations, (str, Path)):
        raise TypeError(f"annotations must be a path or a COCO object, not {type(annotations).__name__}")
    dataset = read_json_file(annotations, EvaluationInputError, "annotation file")
    name = str(annotations)
    _check_ground_truth(dataset, name)
    gt = COCO()
    gt.dataset = dataset
    with _quiet(verbose):
        gt.createIndex()
    return gt, name


def _check_ground_truth(dataset: Any, name: str) -> None:
    """Raise unless ``dataset`` is a COCO person-keypoints annotation set with the fields COCOeval
    reads (:func:`threempose.data.coco_schema.check_keypoint_annotations`, the check training
    data gets too: duplicate ids, unknown image ids, non-positive areas ... are one line)."""
    check_keypoint_annotations(dataset, name, NUM_JOINTS, evaluation_fields=True,
                               every_category_keypoints=True, image_files=False, error=EvaluationInputError)


def _results(results: str | Path | list[dict], gt: COCO, gt_name: str) -> tuple[list[dict], str]:
    """Checked copies of the detections (only the keys COCOeval needs) and a name for them."""
    if isinstance(results, (str, Path)):
        name = str(results)
        entries = read_json_file(results, EvaluationInputError, "results file")
        if not isinstance(entries, list):
            raise EvaluationInputError(f"{name}: results must be a JSON array of detections, "
                                       f"got a JSON {type(entries).__name__}")
    elif isinstance(results, list):
        name, entries = "results list", results
    else:
        raise TypeError(f"results must be a path or a list of dicts, not {type(results).__name__}")
    image_ids = set(gt.getImgIds())
    category_ids = set(gt.getCatIds())
    detections = []
    for i, det in enumerate(entries):
        where = f"{name}: results entry {i}"
        if not isinstance(det, dict):
            raise EvaluationInputError(f"{where} is not an object, got {type(det).__name__}")
        missing = [k for k in ("image_id", "category_id", "keypoints", "score") if k not in det]
        if missing:
            raise EvaluationInputError(f"{where} lacks {', '.join(missing)}")
        if not (is_int(det["image_id"]) and int(det["image_id"]) in image_ids):
            raise EvaluationInputError(f"{where}: image_id {det['image_id']!r} is not an image of {gt_name}")
        if not (is_int(det["category_id"]) and int(det["category_id"]) in category_ids):
            raise EvaluationInputError(f"{where}: category_id {det['category_id']!r} is not a "
                                       f"category of {gt_name} ({sorted(category_ids)})")
        keypoints = _checked_keypoints(det["keypoints"], where)
        if not is_number(det["score"]):
            raise EvaluationInputError(f"{where}: 'score' must be a finite number, got {det['score']!r}")
        detections.append({
            "image_id": int(det["image_id"]),
            "category_id": int(det["category_id"]),
            "keypoints": keypoints,
            "score": float(det["score"]),
        })
    return detections, name


def _selected_images(image_ids: Sequence[int] | None, gt: COCO, gt_name: str) -> list[int] | None:
    """Sorted unique ``image_ids``, all of which must be images of the ground truth."""
    if image_ids is None:
        return None
    if not all(is_int(i) for i in image_ids):
        raise EvaluationInputError(f"image_ids must be integers, got {list(image_ids)[:10]}")
    selected = sorted({int(i) for i in image_ids})
    if not selected:
        raise EvaluationInputError("image_ids is empty; pass None to evaluate every image")
    unknown = [i for i in selected if i not in gt.imgs]
    if unknown:
        raise EvaluationInputError(f"image_ids {unknown[:10]} are not images of {gt_name}")
    return selected


def _no_detections(gt: COCO) -> COCO:
    """An empty results set (``COCO.loadRes`` cannot take an empty list)."""
    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    dt.createIndex()
    return dt


def _checked_keypoints(values: Any, where: str) -> list[float]:
    """``values`` as 51 floats, or EvaluationInputError saying what is wrong."""
    array = _numbers(values, _KEYPOINT_VALUES)
    if array is None:
        size = np.size(values) if isinstance(values, (list, tuple, np.ndarray)) else None
        got = f", got {size} values" if size is not None else f", got {type(values).__name__}"
        raise EvaluationInputError(f"{where}: 'keypoints' must be a flat list of {_KEYPOINT_VALUES} "
                                   f"numbers (17 x [x, y, score]){got}")
    if not np.isfinite(array).all():
        raise EvaluationInputError(f"{where}: 'keypoints' holds a NaN or infinite value")
    return array.tolist()


def _numbers(values: Any, length: int) -> np.ndarray | None:
    """``values`` as a float array when it is a flat sequence of ``length`` numbers, else None."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        return None
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nesting
        return None
    if array.shape != (length,) or array.dtype.kind not in "iuf":
        return None
    return array.astype(np.float64)
