"""Random affine augmentation (thesis §4.1): its semantics and the CPU implementation.

One augmentation is one :class:`Affine`: a 2x3 matrix from source-image pixels
to crop (network input) pixels, plus whether it mirrors the image. It is built
from the source size and four numbers::

    crop = T(centre_crop + t) . R(rotation) . S(scale * input_size / short side)
           . T(-centre_src) . Flip

* the short side of the image fills the crop at ``scale = 1`` (the long side is
  cropped, as HigherHRNet's ``scale_type: short``); ``scale`` > 1 zooms in;
* ``rotation`` in degrees, counter-clockwise as seen on screen;
* ``t = (tx, ty)`` in crop pixels;
* ``Flip`` mirrors ``x -> width - 1 - x``; a flipped sample's joints are renamed
  with :func:`~threempose.data.keypoints.flip_index` (a left wrist becomes a right one).

Pixel centres sit at integer coordinates. :func:`draw_affine` draws the four
numbers (from a numpy or torch generator) and is the only source of randomness,
so the CPU path here (Pillow warps in DataLoader workers) and the batched GPU
path (:mod:`threempose.data.augment_gpu`) apply the same draw. Both sample the
image bilinearly, clamp to the edge pixel within half a pixel of the image and
fill 0 (black image, unsupervised mask) beyond it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from threempose.config import AugmentConfig, DataConfig
from threempose.data.keypoints import flip_index
from threempose.data.targets import make_targets

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Generator = Union[np.random.Generator, torch.Generator]


@dataclass(frozen=True)
class Affine:
    """``matrix``: float64 ``[2, 3]``, source pixel ``(x, y, 1)`` -> crop pixel;
    ``flipped``: the matrix mirrors the image (joints are renamed with flip_index)."""

    matrix: np.ndarray
    flipped: bool


@dataclass(frozen=True)
class AugmentParams:
    """The four numbers of one augmentation (module docstring); the defaults are
    the evaluation-time transform (short side fills the crop, centred, no flip)."""

    scale: float = 1.0
    rotation: float = 0.0
    translation: tuple[float, float] = (0.0, 0.0)
    flip: bool = False

    def zoom(self, width: int, height: int, input_size: int) -> float:
        """Crop pixels per source pixel of a ``width x height`` image."""
        return self.scale * input_size / min(width, height)


def make_affine(width: int, height: int, input_size: int, scale: float = 1.0,
                rotation: float = 0.0, translation: tuple[float, float] = (0.0, 0.0),
                flip: bool = False) -> Affine:
    """The affine of the module docstring for a ``width x height`` source image."""
    flip_m = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if flip else np.eye(3)
    to_origin = np.array([[1.0, 0.0, -(width - 1) / 2], [0.0, 1.0, -(height - 1) / 2], [0.0, 0.0, 1.0]])
    zoom = AugmentParams(scale).zoom(width, height, input_size)
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    rotate_zoom = np.array([[c * zoom, s * zoom, 0.0], [-s * zoom, c * zoom, 0.0], [0.0, 0.0, 1.0]])
    centre = (input_size - 1) / 2
    to_crop = np.array([[1.0, 0.0, centre + translation[0]], [0.0, 1.0, centre + translation[1]],
                        [0.0, 0.0, 1.0]])
    return Affine(matrix=(to_crop @ rotate_zoom @ to_origin @ flip_m)[:2], flipped=bool(flip))


def params_affine(params: AugmentParams, width: int, height: int, input_size: int) -> Affine:
    """:func:`make_affine` of drawn (or default) parameters."""
    return make_affine(width, height, input_size, params.scale, params.rotation, params.translation,
                       params.flip)


def center_affine(width: int, height: int, input_size: int) -> Affine:
    """Evaluation-time transform: short side resized to ``input_size``, centred, no flip."""
    return params_affine(AugmentParams(), width, height, input_size)


def _uniform(rng: Generator, low: float, high: float) -> float:
    if isinstance(rng, torch.Generator):
        u = torch.rand((), generator=rng, dtype=torch.float64).item()
    else:
        u = rng.random()
    return low + (high - low) * u


def draw_params(rng: Generator, cfg: AugmentConfig) -> AugmentParams:
    """Draw a random augmentation: scale ~ U[scale_min, scale_max], rotation ~
    U[-rotation, rotation] degrees, tx, ty ~ U[-translation, translation] crop
    pixels, flip with probability 1/2 when ``cfg.flip``. Five uniforms are drawn
    from ``rng`` in that order (the flip draw is made even when flips are off)."""
    scale = _uniform(rng, cfg.scale_min, cfg.scale_max)
    rotation = _uniform(rng, -cfg.rotation, cfg.rotation)
    tx = _uniform(rng, -cfg.translation, cfg.translation)
    ty = _uniform(rng, -cfg.translation, cfg.translation)
    flip = _uniform(rng, 0.0, 1.0) < 0.5 and cfg.flip
    return AugmentParams(scale, rotation, (tx, ty), flip)


def draw_affine(rng: Generator, width: int, height: int, input_size: int,
                cfg: AugmentConfig) -> Affine:
    """:func:`draw_params` (the same five draws) as the affine of a ``width x height`` image."""
    return params_affine(draw_params(rng, cfg), width, height, input_size)


def transform_keypoints(keypoints: Tensor, matrix: Tensor, flipped: Tensor) -> Tensor:
    """Apply affines to keypoints and rename flipped joints.

    Args:
        keypoints: float64 ``[B, P, J, 3]`` (x, y, visibility) in source pixels.
        matrix: float64 ``[B, 2, 3]``.
        flipped: bool ``[B]``.
    Returns:
        float64 ``[B, P, J, 3]`` in crop pixels; visibility unchanged (joints that
        leave the crop are dropped later, by the target functions).
    """
    xy = keypoints[..., :2] @ matrix[:, None, :, :2].transpose(-1, -2) + matrix[:, None, None, :, 2]
    out = torch.cat([xy, keypoints[..., 2:]], dim=-1)
    perm = torch.tensor(flip_index(keypoints.shape[2]), device=keypoints.device)
    return torch.where(flipped[:, None, None, None], out[:, :, perm], out)


def heatmap_matrix(matrix, stride: int):
    """``[..., 2, 3]`` source pixel -> heatmap pixel from a crop matrix (array or tensor),
    following :func:`threempose.data.targets.crop_to_heatmap`."""
    out = matrix / stride
    out[..., 2] += 0.5 / stride - 0.5
    return out


def normalize(image: Tensor) -> Tensor:
    """``[..., 3, H, W]`` RGB in [0, 255] -> float32 normalised with the ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1) * 255.0
    return (image.float() - mean) / std


def _pil_coefficients(matrix: np.ndarray) -> tuple[float, ...]:
    """Pillow's AFFINE data (output -> input, pixel centres at +0.5) for a forward matrix."""
    inv = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    offset = inv[:, 2] + 0.5 - inv[:, :2].sum(axis=1) * 0.5
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def warp_image(image: Image.Image, matrix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear affine warp of an RGB image into a ``size x size`` crop.

    Returns:
        uint8 ``[size, size, 3]``.
    """
    out = image.transform((size, size), Image.Transform.AFFINE, _pil_coefficients(matrix),
                          resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.array(out)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Warp a 0/1 ``[H, W]`` mask bilinearly and threshold at 1/2.

    Returns:
        float32 ``[size, size]`` of 0/1 (0 outside the source image).
    """
    src = Image.fromarray(mask.astype(np.float32), mode="F")
    out = src.transform((size, size), Image.Transform.AFFINE, _pil_coefficients(matrix),
                        resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    return (np.asarray(out) > 0.5).astype(np.float32)


def augment_sample(image: Image.Image, mask: np.ndarray, keypoints: np.ndarray, affine: Affine,
                   cfg: DataConfig) -> dict[str, Tensor]:
    """CPU path: warp one sample and make its targets.

    Args:
        image: RGB, ``W x H``.
        mask: uint8 ``[H, W]`` supervision mask (see ``targets.supervision_mask``).
        keypoints: float ``[P, J, 3]`` (x, y, visibility) in source pixels.
        affine: from :func:`draw_affine` or :func:`center_affine`.
        cfg: ``input_size`` S, ``heatmap_stride``, ``sigma``, ``max_people``.
    Returns:
        ``image`` float32 ``[3, S, S]`` normalised; ``heatmaps`` float32 ``[J, h, h]``;
        ``mask`` float32 ``[h, h]``; ``joints`` int64 ``[max_people, J, 2]``;
        ``affine`` float64 ``[2, 3]``; ``flipped`` bool ``[]`` (``h = S / stride``).
    """
    size, stride = cfg.input_size, cfg.heatmap_stride
    crop = torch.from_numpy(warp_image(image, affine.matrix, size)).permute(2, 0, 1)
    hm_mask = warp_mask(mask, heatmap_matrix(affine.matrix, stride), size // stride)
    matrix = torch.from_numpy(affine.matrix)
    flipped = torch.tensor(affine.flipped)
    kpts = torch.as_tensor(keypoints, dtype=torch.float64).reshape(1, -1, cfg.num_joints, 3)
    kpts = transform_keypoints(kpts, matrix[None], flipped[None])
    heatmaps, joints = make_targets(kpts, stride, size // stride, cfg.sigma, cfg.max_people)
    return {"image": normalize(crop), "heatmaps": heatmaps[0], "mask": torch.from_numpy(hm_mask),
            "joints": joints[0], "affine": matrix, "flipped": flipped}
