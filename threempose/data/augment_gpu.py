"""The batched, device-side implementation of :mod:`threempose.data.augment`.

DataLoader workers decode images, draw the affines (the same
:func:`~threempose.data.augment.draw_affine` as the CPU path) and pad each batch
(:func:`collate_raw`); :func:`augment_batch` then warps images and masks with
``affine_grid``/``grid_sample`` and makes the targets on the training device.
For the same draw, keypoints, heatmaps and joints equal the CPU path's exactly
(on the same device); images and masks differ only by Pillow's uint8 rounding.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threempose.config import DataConfig
from threempose.data.augment import heatmap_matrix, normalize, transform_keypoints
from threempose.data.targets import make_targets


def collate_raw(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch raw samples (``CocoKeypoints(..., raw=True)``) for :func:`augment_batch`.

    Images and masks are padded to the largest ``Hp x Wp`` by repeating their last
    row/column (so bilinear sampling at the true border matches Pillow's clamp),
    keypoints to the most people ``P`` with visibility 0.

    Returns:
        ``image`` uint8 ``[B, 3, Hp, Wp]``; ``mask`` uint8 ``[B, Hp, Wp]``;
        ``size`` int64 ``[B, 2]`` (true width, height); ``keypoints`` float64
        ``[B, P, J, 3]``; ``affine`` float64 ``[B, 2, 3]``; ``flipped`` bool ``[B]``;
        ``image_id`` int64 ``[B]``; ``skipped`` list of file names that failed to decode.
    """
    hp = max(s["image"].shape[1] for s in samples)
    wp = max(s["image"].shape[2] for s in samples)
    people = max(s["keypoints"].shape[0] for s in samples)
    joints = samples[0]["keypoints"].shape[1]
    images, masks, keypoints = [], [], torch.zeros(len(samples), people, joints, 3, dtype=torch.float64)
    for i, s in enumerate(samples):
        _, h, w = s["image"].shape
        images.append(np.pad(s["image"].numpy(), ((0, 0), (0, hp - h), (0, wp - w)), mode="edge"))
        masks.append(np.pad(s["mask"].numpy(), ((0, hp - h), (0, wp - w)), mode="edge"))
        keypoints[i, : s["keypoints"].shape[0]] = s["keypoints"]
    return {
        "image": torch.from_numpy(np.stack(images)),
        "mask": torch.from_numpy(np.stack(masks)),
        "size": torch.tensor([[s["image"].shape[2], s["image"].shape[1]] for s in samples]),
        "keypoints": keypoints,
        "affine": torch.stack([s["affine"] for s in samples]),
        "flipped": torch.stack([s["flipped"] for s in samples]),
        "image_id": torch.stack([s["image_id"] for s in samples]),
        "skipped": [name for s in samples for name in s["skipped"]],
    }


def _warp(src: Tensor, size: Tensor, matrix: Tensor, out_size: int) -> Tensor:
    """Bilinear warp with Pillow's border rule.

    Args:
        src: float32 ``[B, C, Hp, Wp]`` (edge-padded beyond each true size).
        size: int64 ``[B, 2]`` true (width, height).
        matrix: float64 ``[B, 2, 3]`` source pixel -> output pixel.
        out_size: output side ``S``.
    Returns:
        float32 ``[B, C, S, S]``, 0 where the source point lies more than half a
        pixel outside the true image.
    """
    b, _, hp, wp = src.shape
    full = torch.cat([matrix, matrix.new_tensor([0.0, 0.0, 1.0]).expand(b, 1, 3)], dim=1)
    inverse = torch.linalg.inv(full)[:, :2]                              # output px -> source px
    axis = torch.arange(out_size, device=src.device, dtype=torch.float64)
    v, u = torch.meshgrid(axis, axis, indexing="ij")
    uv = torch.stack([u, v], -1)                                         # [S, S, 2]
    xy = torch.einsum("bij,hwj->bhwi", inverse[:, :, :2], uv) + inverse[:, None, None, :, 2]
    pad_wh = torch.tensor([wp, hp], device=src.device, dtype=torch.float64)
    grid = ((2.0 * xy + 1.0) / pad_wh - 1.0).float()                     # align_corners=False
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    true_wh = size.to(device=src.device, dtype=torch.float64)[:, None, None, :]
    inside = ((xy >= -0.5) & (xy < true_wh - 0.5)).all(dim=-1)           # [B, S, S]
    return out * inside[:, None]


def augment_batch(batch: dict[str, Any], cfg: DataConfig, device: torch.device | str) -> dict[str, Tensor]:
    """GPU-side path: warp a :func:`collate_raw` batch and make its targets on ``device``.

    Returns the CPU path's batch: ``image`` float32 ``[B, 3, S, S]`` normalised;
    ``heatmaps`` float32 ``[B, J, h, h]``; ``mask`` float32 ``[B, h, h]``; ``joints``
    int64 ``[B, max_people, J, 2]``; ``affine`` float64 ``[B, 2, 3]``; ``flipped``
    bool ``[B]``; ``image_id`` int64 ``[B]`` (``h = S / heatmap_stride``).
    """
    size, stride = cfg.input_size, cfg.heatmap_stride
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, Tensor)}
    matrix, flipped = moved["affine"], moved["flipped"]
    image = _warp(moved["image"].float(), moved["size"], matrix, size)
    mask = _warp(moved["mask"][:, None].float(), moved["size"], heatmap_matrix(matrix, stride),
                 size // stride)[:, 0]
    keypoints = transform_keypoints(moved["keypoints"], matrix, flipped)
    heatmaps, joints = make_targets(keypoints, stride, size // stride, cfg.sigma, cfg.max_people)
    return {"image": normalize(image), "heatmaps": heatmaps, "mask": (mask > 0.5).float(),
            "joints": joints, "affine": matrix, "flipped": flipped, "image_id": moved["image_id"]}
