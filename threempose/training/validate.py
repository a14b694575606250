"""Validation AP on a subset of the val split (logged every epoch by search and train)."""
from __future__ import annotations

import warnings

import numpy as np

from threempose.config import InferConfig
from threempose.data.coco_eval import evaluate_keypoints
from threempose.data.image_io import read_image
from threempose.data.loader import DataLoaders
from threempose.inference.predictor import ExitFn, predict_people


def val_image_subset(data: DataLoaders, count: int) -> list[int]:
    """The first ``count`` val image ids (all when ``count`` <= 0): the same subset every epoch."""
    ids = data.val_image_ids
    return ids if count <= 0 else ids[:count]


def validation_ap(exit_fn: ExitFn, data: DataLoaders, cfg: InferConfig, count: int) -> dict[str, float]:
    """COCO keypoint AP/AR of ``exit_fn`` on the first ``count`` val images.

    Returns the ten COCOeval numbers (``AP``, ``AP50``, ... ``ARL``) and
    ``people`` (people found per image).
    """
    dataset = data.val.dataset
    ids = val_image_subset(data, count)
    results, found = [], 0
    for image_id in ids:
        info = dataset.coco.imgs[image_id]
        image = np.asarray(read_image(data.val_images / info["file_name"]))
        people = predict_people(exit_fn, image, cfg, device=data.device)
        found += len(people)
        results += [p.to_coco(image_id) for p in people]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # "no detections" early in a search is expected
        stats = evaluate_keypoints(dataset.coco, results, image_ids=ids)
    return {**stats, "people": found / max(len(ids), 1)}
