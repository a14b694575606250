"""Top-down inference for PNFS: score maps -> image keypoints -> OKS-NMS -> COCO results.

* :func:`decode_heatmaps` takes, per joint, the pixel of the highest score (the
  longest vector: ``f_S`` is increasing in ``||v||``) and moves it a quarter
  pixel toward the higher of its two neighbours on each axis (PNFS §IV-A "one
  quarter offset from the peak to the secondary peak", as HRNet's decoder).
* :func:`crop_to_image` maps heatmap coordinates back through the crop affine of
  :mod:`threempose.pnfs.topdown_data`.
* :func:`flip_back` turns the score maps of a mirrored crop into maps of the
  original crop (flip test: average the two).
* :func:`coco_results` rescores each person (box score x mean score of its joints
  above ``keypoint_threshold``, as HRNet does), runs OKS-NMS per image
  (:func:`oks_nms`, G-RMI/HRNet) and writes COCO keypoint results entries that
  :func:`threempose.data.coco_eval.evaluate_keypoints` scores.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from threempose.data.keypoints import NUM_JOINTS, OKS_SIGMAS, flip_index
from threempose.pnfs.topdown_data import heatmap_to_crop, invert_matrix, transform_points
from threempose.pnfs.pckh import MPII_FLIP_INDEX, NUM_MPII_JOINTS


def decode_heatmaps(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Peak of each score map with the quarter-pixel offset toward the second peak.

    Args:
        scores: ``[N, K, h, w]`` score maps (merged part scores).
    Returns:
        ``coords`` float64 ``[N, K, 2]`` (x, y) in heatmap pixels; ``maxvals``
        ``[N, K]`` (the peak scores). On each axis the peak moves by ``+-0.25``
        toward the larger neighbour where both neighbours exist (not on the map
        border, not on a tie).
    """
    if scores.dim() != 4:
        raise ValueError(f"score maps must be [N, K, h, w], got shape {list(scores.shape)}")
    n, k, h, w = scores.shape
    maps = scores.detach().to(torch.float64)
    maxvals, flat_index = maps.reshape(n, k, h * w).max(dim=-1)
    x, y = flat_index % w, torch.div(flat_index, w, rounding_mode="floor")

    def at(dx: int, dy: int) -> Tensor:
        xx, yy = (x + dx).clamp(0, w - 1), (y + dy).clamp(0, h - 1)
        return maps.reshape(n, k, h * w).gather(-1, (yy * w + xx)[..., None])[..., 0]

    interior_x = (x > 0) & (x < w - 1)
    interior_y = (y > 0) & (y < h - 1)
    offset_x = torch.sign(at(1, 0) - at(-1, 0)) * 0.25 * interior_x
    offset_y = torch.sign(at(0, 1) - at(0, -1)) * 0.25 * interior_y
    coords = torch.stack([x + offset_x, y + offset_y], dim=-1)
    return coords, maxvals.to(scores.dtype)


def crop_to_image(coords: Any, matrices: Any, stride: int) -> np.ndarray:
    """Heatmap coordinates of each crop -> image pixels.

    Args:
        coords: ``[N, K, 2]`` heatmap (x, y).
        matrices: ``[N, 2, 3]`` image -> crop affines (as in the data samples' ``matrix``).
        stride: crop pixels per heatmap pixel.
    Returns:
        float64 ``[N, K, 2]`` image pixels.
    """
    coords = heatmap_to_crop(np.asarray(coords, dtype=np.float64), stride)
    matrices = np.asarray(matrices, dtype=np.float64)
    return np.stack([transform_points(c, invert_matrix(m)) for c, m in zip(coords, matrices)])


def decode_crops(scores: Tensor, matrices: Any, stride: int) -> np.ndarray:
    """Score maps of ``N`` (unflipped) crops -> keypoints ``[N, K, 3]`` (x, y in image pixels, score)."""
    coords, maxvals = decode_heatmaps(scores)
    xy = crop_to_image(coords.cpu().numpy(), matrices, stride)
    return np.concatenate([xy, maxvals.detach().cpu().double().numpy()[..., None]], axis=-1)


def flip_back(scores: Tensor) -> Tensor:
    """Score maps of a horizontally mirrored crop, as maps of the original crop.

    Mirrors the width and swaps left/right joints (COCO flip pairs for 17 maps, MPII's for 16).
    Exact for the
    pixel-centre convention of :mod:`threempose.pnfs.topdown_data` (no shift). Flip
    test: ``scores = (net(crops) + flip_back(net(crops.flip(-1)))) / 2``, decoded with
    the unflipped crops' matrices.

    Args:
        scores: ``[N, J, h, w]``, J = 17 (COCO joints) or 16 (MPII joints, release order).
    Returns:
        ``[N, J, h, w]``.
    """
    if scores.dim() != 4 or scores.shape[1] not in (NUM_JOINTS, NUM_MPII_JOINTS):
        raise ValueError(f"flip_back needs [N, {NUM_JOINTS} or {NUM_MPII_JOINTS}, h, w] score maps, got "
                         f"{list(scores.shape)}")
    return scores.flip(-1)[:, list(MPII_FLIP_INDEX) if scores.shape[1] == NUM_MPII_JOINTS else flip_index()]


def oks_similarity(reference: np.ndarray, others: np.ndarray, reference_area: float,
                   other_areas: np.ndarray, sigmas: Sequence[float] = OKS_SIGMAS,
                   keypoint_threshold: Optional[float] = None) -> np.ndarray:
    """OKS between one person's keypoints and others' (HRNet's ``oks_iou``).

    ``OKS = mean_j exp(-d_j^2 / (2 * s^2 * (2 sigma_j)^2))`` with ``s^2`` the mean of
    the two areas. With ``keypoint_threshold``, only joints scoring above it in
    both people count (0 when none does).

    Args:
        reference: ``[K, 3]`` (x, y, score); others: ``[M, K, 3]``.
        reference_area: float; other_areas: ``[M]`` (pixels^2).
    Returns:
        float64 ``[M]`` in [0, 1].
    """
    reference, others = np.asarray(reference, np.float64), np.asarray(others, np.float64)
    variances = (2.0 * np.asarray(sigmas, np.float64)) ** 2
    squared = ((others[..., :2] - reference[None, :, :2]) ** 2).sum(-1)                  # [M, K]
    mean_area = (reference_area + np.asarray(other_areas, np.float64)) / 2.0 + np.spacing(1)
    similarity = np.exp(-squared / variances / mean_area[:, None] / 2.0)
    if keypoint_threshold is None:
        return similarity.mean(axis=1)
    counted = (reference[None, :, 2] > keypoint_threshold) & (others[..., 2] > keypoint_threshold)
    total = (similarity * counted).sum(axis=1)
    return np.divide(total, counted.sum(axis=1), out=np.zeros(len(others)), where=counted.any(axis=1))


def oks_nms(keypoints: Any, scores: Any, areas: Any, threshold: float = 0.9,
            sigmas: Sequence[float] = OKS_SIGMAS, keypoint_threshold: Optional[float] = None) -> list[int]:
    """Greedy OKS non-maximum suppression over the people of one image (G-RMI, HRNet).

    Repeatedly keeps the best-scoring remaining person and drops every other whose
    OKS to it (:func:`oks_similarity`) exceeds ``threshold``.

    Args:
        keypoints: ``[N, K, 3]``; scores: ``[N]``; areas: ``[N]`` (box areas, pixels^2).
    Returns:
        Indices of the kept people, best first.
    """
    keypoints = np.asarray(keypoints, np.float64)
    scores, areas = np.asarray(scores, np.float64), np.asarray(areas, np.float64)
    if not len(keypoints) == len(scores) == len(areas):
        raise ValueError(f"oks_nms: {len(keypoints)} people, {len(scores)} scores and {len(areas)} "
                         "areas must match")
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        overlap = oks_similarity(keypoints[best], keypoints[rest], areas[best], areas[rest],
                                 sigmas, keypoint_threshold)
        order = rest[overlap <= threshold]
    return keep


def rescore(keypoints: Any, box_scores: Any, keypoint_threshold: float = 0.2) -> np.ndarray:
    """Person scores: box score x mean score of the joints scoring above ``keypoint_threshold``
    (0 when none does), as HRNet's COCO evaluation does.

    Args:
        keypoints: ``[N, K, 3]``; box_scores: ``[N]``.
    Returns:
        float64 ``[N]``.
    """
    joint_scores = np.asarray(keypoints, np.float64)[..., 2]
    counted = joint_scores > keypoint_threshold
    mean = np.divide((joint_scores * counted).sum(1), counted.sum(1), out=np.zeros(len(joint_scores)),
                     where=counted.any(1))
    return mean * np.asarray(box_scores, np.float64)


def coco_results(image_ids: Sequence[int], keypoints: Any, box_scores: Any, areas: Any,
                 keypoint_threshold: float = 0.2, oks_threshold: float = 0.9,
                 category_id: int = 1) -> list[dict]:
    """COCO keypoint results of top-down predictions, after rescoring and per-image OKS-NMS.

    Args:
        image_ids: ``[N]`` the image of each person crop.
        keypoints: ``[N, 17, 3]`` (x, y, score) in image pixels (:func:`decode_crops`).
        box_scores: ``[N]`` detection scores (1 for ground-truth boxes).
        areas: ``[N]`` padded box areas (the samples' ``area``).
    Returns:
        ``[{"image_id", "category_id", "keypoints": 51 floats, "score"}, ...]``, per image
        best first, images in first-seen order (``[]`` for no crops).
    """
    if len(image_ids) == 0:
        return []
    keypoints = np.asarray(keypoints, np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_JOINTS, 3) or len(keypoints) != len(image_ids):
        raise ValueError(f"coco_results: keypoints must be [N, {NUM_JOINTS}, 3] with N = "
                         f"{len(image_ids)} image ids, got {list(keypoints.shape)}")
    scores = rescore(keypoints, box_scores, keypoint_threshold)
    areas = np.asarray(areas, np.float64)
    by_image: dict[int, list[int]] = defaultdict(list)
    for i, image_id in enumerate(image_ids):
        by_image[int(image_id)].append(i)
    results = []
    for image_id, members in by_image.items():
        members = np.asarray(members)
        for kept in oks_nms(keypoints[members], scores[members], areas[members], oks_threshold):
            person = members[kept]
            results.append({"image_id": image_id, "category_id": category_id,
                            "keypoints": keypoints[person].ravel().tolist(),
                            "score": float(scores[person])})
    return results
