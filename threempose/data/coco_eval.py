"""COCO keypoint evaluation with pycocotools' COCOeval: AP/AR of a results file (or list) against
ground-truth annotations, with the inputs checked first (one clear error, not a COCOeval
traceback). The library behind ``python -m threempose.evaluate``."""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

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


class ImageMatches(NamedTuple):
    """What COCOeval's ``accumulate`` reads of one image's evaluation in one category (D detections
    kept, best score first, at most ``maxDets``; A area ranges; T OKS thresholds).

    scores: ``[D]`` float64; matched: ``[A, T, D]`` bool (matched to a ground-truth person);
    ignored: ``[A, T, D]`` bool; gt_ignored: ``[A, G]`` bool (crowd, no keypoints, outside the area range).
    """

    scores: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    gt_ignored: np.ndarray


class PerImageKeypointEval:
    """COCOeval's keypoint evaluation split at its per-image seam, for scoring many mixes of
    per-image results without holding them: :meth:`match` evaluates one image's detections
    (pycocotools' own ``loadRes`` and ``evaluate`` on that image alone) and keeps only the
    small arrays ``accumulate`` reads (:class:`ImageMatches`: tens of bytes per detection);
    :meth:`stats` accumulates one such match per image into the ten numbers.

    COCOeval evaluates every image on its own (OKS, greedy matching, ignore flags) and only
    ``accumulate`` pools them (images in sorted id order, stable sorts), so ``stats`` over
    ``match(i, detections_i)`` equals :func:`evaluate_keypoints` of all the detections, to the
    bit (``tests/test_coco_eval.py``). Detection ids restart at 1 per image; COCOeval only
    tests them for > 0.
    """

    def __init__(self, annotations: str | Path | COCO) -> None:
        self.gt, self.gt_name = _ground_truth(annotations, verbose=False)
        self._image_ids = set(self.gt.getImgIds())
        self._category_ids = set(self.gt.getCatIds())
        with _quiet(False):
            self._eval = COCOeval(self.gt, iouType="keypoints")
        self._eval.params.catIds = list(np.unique(self._eval.params.catIds))    # as evaluate() sorts them

    def match(self, image_id: int, detections: list[dict]) -> tuple[Optional[ImageMatches], ...]:
        """Evaluate ``detections`` (COCO results entries, all of image ``image_id``); one
        :class:`ImageMatches` per category (sorted ids), None where the image has neither
        ground truth nor detections of it."""
        if image_id not in self._image_ids:
            raise EvaluationInputError(f"image id {image_id!r} is not an image of {self.gt_name}")
        for i, det in enumerate(detections):
            if isinstance(det, dict) and det.get("image_id") != image_id:
                raise EvaluationInputError(f"detection {i} of image {image_id} has image_id {det.get('image_id')!r}")
        checked = [_checked_detection(det, f"detection {i} of image {image_id}", self._image_ids, self._category_ids,
                                      self.gt_name) for i, det in enumerate(detections)]
        with _quiet(False):
            one = COCO()          # a results set over this one image (loadRes is linear in the images)
            one.dataset = {"images": [self.gt.imgs[image_id]], "categories": self.gt.dataset["categories"],
                           "annotations": []}
            one.createIndex()
            self._eval.cocoDt = one.loadRes(checked) if checked else one
            self._eval.params.imgIds = [image_id]
            self._eval.evaluate()
        areas = len(self._eval.params.areaRng)
        evaluated = self._eval.evalImgs
        return tuple(self._pack(evaluated[k * areas:(k + 1) * areas]) for k in range(len(evaluated) // areas))

    @staticmethod
    def _pack(per_area: list[Optional[dict]]) -> Optional[ImageMatches]:
        if per_area[0] is None:          # no ground truth and no detection: None in every area range
            return None
        return ImageMatches(np.asarray(per_area[0]["dtScores"], dtype=np.float64),
                            np.stack([e["dtMatches"] != 0 for e in per_area]),
                            np.stack([np.asarray(e["dtIgnore"], dtype=bool) for e in per_area]),
                            np.stack([np.asarray(e["gtIgnore"], dtype=bool) for e in per_area]))

    def stats(self, matches: dict[int, tuple[Optional[ImageMatches], ...]]) -> dict[str, float]:
        """The ten numbers of :data:`METRIC_NAMES` over the images of ``matches`` (``{image id:
        match(...) of that image}``), as :func:`evaluate_keypoints` with ``image_ids`` = those images."""
        ids = sorted(matches)
        if not ids:
            raise EvaluationInputError("no image to evaluate")
        p = self._eval.params
        p.imgIds = ids
        evaluated = []
        for k in range(len(p.catIds)):
            for a, area in enumerate(p.areaRng):
                for i in ids:
                    m = matches[i][k]
                    evaluated.append(None if m is None else {
                        "dtScores": m.scores, "dtMatches": m.matched[a], "dtIgnore": m.ignored[a],
                        "gtIgnore": m.gt_ignored[a], "aRng": area, "maxDet": p.maxDets[-1]})
        self._eval.evalImgs = evaluated
        self._eval._paramsEval = copy.deepcopy(p)
        with _quiet(False):
            self._eval.accumulate()
            self._eval.summarize()
        self._eval.evalImgs = []
        return {name: float(value) for name, value in zip(METRIC_NAMES, self._eval.stats)}


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
    detections = [_checked_detection(det, f"{name}: results entry {i}", image_ids, category_ids, gt_name)
                  for i, det in enumerate(entries)]
    return detections, name


def _checked_detection(det: Any, where: str, image_ids: set[int], category_ids: set[int], gt_name: str) -> dict:
    """A checked copy of one detection (only the keys COCOeval needs), or EvaluationInputError."""
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
    return {"image_id": int(det["image_id"]), "category_id": int(det["category_id"]), "keypoints": keypoints,
            "score": float(det["score"])}


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
