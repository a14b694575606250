"""Test-time resizing (short side to 512, aspect kept, padded) and the maps back.

Coordinate conventions (used by the whole decoder):

* **Image coordinates** are COCO's pixel-index coordinates: the centre of pixel
  (column x, row y) is the point (x, y); the image spans [-0.5, W - 0.5].
* Scaling an image by ``s`` (bilinear, ``align_corners=False``) maps a point
  ``p`` to ``(p + 0.5) * s - 0.5``: pixel areas scale, not pixel centres.
* A map at stride ``S`` relative to the network input (heatmaps and tags at 1/4:
  S = 4) has its pixel ``h`` centred on input point ``(h + 0.5) * S - 0.5``,
  which is where average pooling / strided convolutions and bilinear
  up/down-sampling put it. Training targets must use the same convention:
  a joint at input point ``p`` peaks at heatmap point ``(p + 0.5) / S - 0.5``.

The network input is the scaled image placed at the top-left corner of a canvas
padded on the right and bottom to a multiple of ``multiple`` (the fabric's
coarsest stride, 32), so the map back to the original image is a pure per-axis
scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ResizeInfo:
    """How an original image became the network input.

    original_size: (width, height) of the original image.
    resized_size: (width, height) of the scaled image (its short side = short_side).
    input_size: (width, height) of the network input (resized_size padded to a multiple).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def scale(self) -> np.ndarray:
        """Per-axis scale (sx, sy) from original to network input, float64 [2]."""
        return np.asarray(self.resized_size, np.float64) / np.asarray(self.original_size, np.float64)

    def to_input(self, points) -> np.ndarray:
        """Original-image points [..., 2] (x, y) -> network-input points [..., 2], float64."""
        return (np.asarray(points, np.float64) + 0.5) * self.scale - 0.5

    def to_original(self, points) -> np.ndarray:
        """Network-input points [..., 2] (x, y) -> original-image points [..., 2], float64."""
        return (np.asarray(points, np.float64) + 0.5) / self.scale - 0.5

    def affine_to_original(self) -> np.ndarray:
        """The 2x3 affine matrix A with ``original = A @ [x_in, y_in, 1]``, float64."""
        sx, sy = 1.0 / self.scale
        return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])

    def map_to_original(self, points, map_size: tuple[int, int]) -> np.ndarray:
        """Points [..., 2] on a map of ``map_size`` (width, height) -> original image.

        The map covers the whole network input (stride = input_size / map_size per
        axis; stride 1 for maps at the input resolution).
        """
        stride = np.asarray(self.input_size, np.float64) / np.asarray(map_size, np.float64)
        return self.to_original(map_to_input(points, stride))


def map_to_input(points, stride) -> np.ndarray:
    """Points [..., 2] on a map at ``stride`` (scalar or (sx, sy)) -> network-input points."""
    return (np.asarray(points, np.float64) + 0.5) * np.asarray(stride, np.float64) - 0.5


def plan_resize(width: int, height: int, short_side: int = 512, multiple: int = 32) -> ResizeInfo:
    """Sizes for scaling (width, height) so the short side is ``short_side``, then padding.

    The long side is scaled by the same factor and rounded to the nearest pixel;
    both sides are then padded up to a multiple of ``multiple``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if short_side < 1 or multiple < 1:
        raise ValueError(f"short_side and multiple must be >= 1, got {short_side}, {multiple}")
    s = short_side / min(width, height)
    resized = (max(1, int(np.floor(width * s + 0.5))), max(1, int(np.floor(height * s + 0.5))))
    padded = tuple(-(-r // multiple) * multiple for r in resized)
    return ResizeInfo((int(width), int(height)), resized, padded)


def resize_image(image: np.ndarray, short_side: int = 512, multiple: int = 32,
                 pad_value: float = 0.0) -> tuple[np.ndarray, ResizeInfo]:
    """Scale an image (bilinear, antialiased) and pad it for the network.

    image: [H, W] or [H, W, C], any real dtype (values are not normalised).
    Returns (float32 [H_in, W_in, C] with the scaled image at the top-left and
    ``pad_value`` elsewhere, :class:`ResizeInfo`).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    height, width, channels = image.shape
    info = plan_resize(width, height, short_side, multiple)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    (rw, rh), (iw, ih) = info.resized_size, info.input_size
    scaled = F.interpolate(t, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    out = np.full((ih, iw, channels), pad_value, dtype=np.float32)
    out[:rh, :rw] = scaled[0].permute(1, 2, 0).numpy()
    return out, info
