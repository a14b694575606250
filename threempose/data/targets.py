"""Training targets at heatmap resolution (HigherHRNet-style), shared by the CPU and GPU paths.

Conventions:

* Pixel centres sit at integer coordinates (COCO keypoints are pixel indices).
* A crop pixel ``x`` sits at heatmap coordinate ``(x + 0.5) / stride - 0.5``: pixel
  centres of the two grids line up as bilinear resampling and strided pooling place
  them (the "unbiased" convention; :func:`crop_to_heatmap`). The decoder maps back
  with the inverse, ``(h + 0.5) * stride - 0.5`` (:mod:`threempose.decode.resize`), and
  a flipped output lines up exactly with the unflipped one.
* A joint is a *target* when its visibility flag is > 0 (labelled, occluded or
  not) and its nearest heatmap cell ``floor(x + 0.5), floor(y + 0.5)`` lies
  inside the map; every other joint is dropped from all targets.

The tensor functions work on any device and batch their inputs, so the
per-sample CPU path (batch of one) and the batched GPU path make identical
targets from identical keypoints.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor


def target_cells(points: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest heatmap cell of each joint and whether the joint is a target.

    Args:
        points: ``[..., 3]`` (x, y, visibility) in heatmap pixels.
        height, width: heatmap size.
    Returns:
        ``(cx, cy, valid)``: int64 ``[...]`` cell column and row, bool ``[...]``.
    """
    cx = torch.floor(points[..., 0] + 0.5).long()
    cy = torch.floor(points[..., 1] + 0.5).long()
    valid = (points[..., 2] > 0) & (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    return cx, cy, valid


def render_heatmaps(points: Tensor, height: int, width: int, sigma: float) -> Tensor:
    """Gaussian heatmaps, the maximum over people (HigherHRNet's way).

    Each target joint puts ``exp(-((u - x)^2 + (v - y)^2) / (2 sigma^2))`` on its
    joint's map, centred at the joint's sub-pixel position (not truncated).

    Args:
        points: ``[B, P, J, 3]`` (x, y, visibility) in heatmap pixels.
        height, width: heatmap size ``h, w``.
        sigma: Gaussian standard deviation in heatmap pixels.
    Returns:
        float32 ``[B, J, h, w]`` in [0, 1]; all zeros where a joint has no target.
    """
    b, p, j, _ = points.shape
    _, _, valid = target_cells(points, height, width)
    us = torch.arange(width, device=points.device, dtype=points.dtype)
    vs = torch.arange(height, device=points.device, dtype=points.dtype)
    scale = -0.5 / (sigma * sigma)
    gx = torch.exp(scale * (us - points[..., 0:1]) ** 2).float() * valid[..., None]   # [B,P,J,w]
    gy = torch.exp(scale * (vs - points[..., 1:2]) ** 2).float()                      # [B,P,J,h]
    heatmaps = torch.zeros(b, j, height, width, device=points.device)
    for person in range(p):
        heatmaps = torch.maximum(heatmaps, gy[:, person, :, :, None] * gx[:, person, :, None, :])
    return heatmaps


def joints_array(points: Tensor, height: int, width: int, max_people: int) -> Tensor:
    """Joint locations for the associative-embedding loss (HigherHRNet's JointsGenerator).

    ``out[b, k, j] = (cy * w + cx, 1)`` for target joint ``j`` of the ``k``-th person
    having at least one target joint (people keep their order; extra people beyond
    ``max_people`` are dropped); ``(0, 0)`` everywhere else.

    Args:
        points: ``[B, P, J, 3]`` (x, y, visibility) in heatmap pixels.
        height, width: heatmap size ``h, w``.
        max_people: people slots in the output.
    Returns:
        int64 ``[B, max_people, J, 2]``.
    """
    b, p, j, _ = points.shape
    cx, cy, valid = target_cells(points, height, width)
    entries = torch.stack([(cy * width + cx) * valid, valid.long()], dim=-1)       # [B,P,J,2]
    has_target = valid.any(dim=-1)                                                  # [B,P]
    order = torch.argsort((~has_target).to(torch.uint8), dim=1, stable=True)        # targets first
    entries = torch.gather(entries, 1, order[:, :, None, None].expand(b, p, j, 2))
    entries = entries * torch.gather(has_target, 1, order)[:, :, None, None]
    out = torch.zeros(b, max_people, j, 2, dtype=torch.long, device=points.device)
    keep = min(p, max_people)
    out[:, :keep] = entries[:, :keep]
    return out


def crop_to_heatmap(points, stride: int):
    """Crop-pixel coordinates ``[..., 2]`` (tensor or array) -> heatmap coordinates."""
    return (points + 0.5) / stride - 0.5


def make_targets(keypoints: Tensor, stride: int, heatmap_size: int, sigma: float,
                 max_people: int) -> tuple[Tensor, Tensor]:
    """Heatmaps and joints arrays from keypoints in crop pixels.

    Args:
        keypoints: ``[B, P, J, 3]`` (x, y, visibility) in crop (network input) pixels.
        stride: crop pixels per heatmap pixel.
        heatmap_size: side ``h = w`` of the square heatmaps.
        sigma, max_people: as in :func:`render_heatmaps` and :func:`joints_array`.
    Returns:
        ``(heatmaps float32 [B, J, h, h], joints int64 [B, max_people, J, 2])``.
    """
    points = torch.cat([crop_to_heatmap(keypoints[..., :2], stride), keypoints[..., 2:]], dim=-1)
    return (render_heatmaps(points, heatmap_size, heatmap_size, sigma),
            joints_array(points, heatmap_size, heatmap_size, max_people))


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO segmentation (polygons, uncompressed or compressed RLE).

    Returns:
        uint8 ``[height, width]``, 1 inside the object.
    """
    if isinstance(segmentation, list):
        polygons = [poly for poly in segmentation if len(poly) >= 6]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():      # pycocotools' decode trips numpy 2's __array__ copy deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def ignored_by_loss(annotation: dict) -> bool:
    """Whether the heatmap loss skips an annotation's region: a crowd region or an annotated
    person without keypoints (``num_keypoints == 0``) that has a segmentation."""
    return bool((annotation.get("iscrowd", 0) or annotation.get("num_keypoints", 0) == 0)
                and annotation.get("segmentation"))


def ignore_mask(segmentations: Sequence[Any], height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width]``: 1 inside any of ``segmentations`` (COCO polygons or RLE)."""
    ignored = np.zeros((height, width), np.uint8)
    for segmentation in segmentations:
        ignored |= segmentation_mask(segmentation, height, width)
    return ignored


def supervision_mask(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Where the heatmap loss is applied: 0 over the regions :func:`ignored_by_loss`, 1 elsewhere.

    Args:
        annotations: COCO annotation dicts of one image.
        height, width: image size in pixels.
    Returns:
        uint8 ``[height, width]``.
    """
    return 1 - ignore_mask([a["segmentation"] for a in annotations if ignored_by_loss(a)], height, width)
