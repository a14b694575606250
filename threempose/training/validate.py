"""Validation AP on a subset of the val split (logged every epoch by search and train).

Val images that cannot be read (fail to decode, or differ from their annotated size) are skipped
as training skips them: one warning per call naming them, and their count in the result's
``skipped``; AP is scored on the images that were read.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from threempose.config import InferConfig
from threempose.data.coco_eval import METRIC_NAMES, evaluate_keypoints
from threempose.data.loader import DataLoaders
from threempose.data.sampler import warn_skipped
from threempose.inference.predictor import ExitFn, predict_people


def val_image_subset(data: DataLoaders, count: int) -> list[int]:
    """The first ``count`` val image ids (all when ``count`` <= 0): the same subset every epoch."""
    ids = data.val_image_ids
    return ids if count <= 0 else ids[:count]


def validation_ap(exit_fn: ExitFn, data: DataLoaders, cfg: InferConfig, count: int) -> dict[str, float]:
    """COCO keypoint AP/AR of ``exit_fn`` on the first ``count`` val images.

    Returns the ten COCOeval numbers (``AP``, ``AP50``, ... ``ARL``; NaN when no image of the
    subset could be read), ``people`` (people found per image read) and ``skipped`` (images
    of the subset that could not be read, warned about once).
    """
    dataset = data.val.dataset
    index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    results, found, scored, skipped = [], 0, [], []
    for image_id in val_image_subset(data, count):
        image = dataset.decode(index_of[image_id])
        if image is None:
            skipped.append(str(dataset.image_path(index_of[image_id])))
            continue
        people = predict_people(exit_fn, np.asarray(image), cfg, device=data.device)
        found += len(people)
        results += [p.to_coco(image_id) for p in people]
        scored.append(image_id)
    if skipped:
        warn_skipped(skipped, "validation image reads failed to decode and were left out of the AP")
    if not scored:
        stats = {name: math.nan for name in METRIC_NAMES}
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "no detections" early in a search is expected
            stats = evaluate_keypoints(dataset.coco, results, image_ids=scored)
    return {**stats, "people": found / max(len(scored), 1), "skipped": float(len(skipped))}
