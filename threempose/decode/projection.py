"""Tag maps projected to the network-input resolution, evaluated only where they are read.

HigherHRNet projects heatmaps and tags to the input resolution (``PROJECT2IMAGE``,
bilinear, ``align_corners=False``) before decoding. The heatmaps are needed
everywhere (NMS), but the tags only at the top-k candidates and in the refine
windows, so :class:`ProjectedTags` computes the same bilinear values at just those
pixels (equal to ``torch.nn.functional.interpolate`` up to float32 rounding).
When a caller will read more pixels than the maps hold (refine on a crowd of
people), :meth:`ProjectedTags.materialize` projects them in full once instead.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def _axis_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear (align_corners=False) taps of each of ``dst`` output pixels on ``src`` inputs:
    (low index, high index, low weight, high weight), int64 / float32 [dst]."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    pos = np.maximum(pos, 0.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    hi = np.minimum(lo + 1, src - 1)
    frac = (pos - lo).astype(np.float32)
    return lo, hi, np.float32(1) - frac, frac


class ProjectedTags:
    """Tag maps [J, L, h, w] bilinearly resampled to ``size`` (W, H), evaluated lazily.

    With ``size == (w, h)`` the values are the maps' own, exactly.
    """

    full: Optional[np.ndarray] = None   # float32 [J, L, H, W] once materialize() ran

    def __init__(self, tags: np.ndarray, size: tuple[int, int]):
        tags = np.asarray(tags, dtype=np.float32)
        if tags.ndim != 4:
            raise ValueError(f"tag maps must be [J, L, h, w], got shape {tags.shape}")
        self.maps = tags
        self.size = (int(size[0]), int(size[1]))
        _, _, h, w = tags.shape
        self._x = _axis_weights(w, self.size[0])
        self._y = _axis_weights(h, self.size[1])

    def materialize(self) -> None:
        """Project the whole maps once (``F.interpolate``); later reads slice them."""
        if self.full is None:
            same = self.maps.shape[2:] == (self.size[1], self.size[0])
            self.full = self.maps if same else F.interpolate(
                torch.from_numpy(np.ascontiguousarray(self.maps)), size=(self.size[1], self.size[0]),
                mode="bilinear", align_corners=False).numpy()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[J, L, H, W] of the projected maps."""
        return (*self.maps.shape[:2], self.size[1], self.size[0])

    def at(self, joints: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Projected tags of joint maps ``joints`` at pixels (xs, ys), all int [n] -> float32 [n, L]."""
        if self.full is not None:
            return self.full[joints, :, ys, xs]
        x0, x1, wx0, wx1 = (a[xs] for a in self._x)
        y0, y1, wy0, wy1 = (a[ys] for a in self._y)
        m = self.maps
        top = wx0[:, None] * m[joints, :, y0, x0] + wx1[:, None] * m[joints, :, y0, x1]
        bottom = wx0[:, None] * m[joints, :, y1, x0] + wx1[:, None] * m[joints, :, y1, x1]
        return wy0[:, None] * top + wy1[:, None] * bottom

    def window(self, joints: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Projected tag maps of ``joints`` (int [m]) on the window [y0, y1) x [x0, x1):
        float32 [m, L, y1 - y0, x1 - x0]."""
        if self.full is not None:
            return self.full[joints, :, y0:y1, x0:x1]
        lo_x, hi_x, wx0, wx1 = (a[x0:x1] for a in self._x)
        lo_y, hi_y, wy0, wy1 = (a[y0:y1] for a in self._y)
        first, last = lo_x.min(), hi_x.max() + 1
        sub = self.maps[joints][..., first:last]                          # [m, L, h, w']
        rows = wy0[:, None] * sub[:, :, lo_y] + wy1[:, None] * sub[:, :, hi_y]   # [m, L, H', w']
        return wx0 * rows[..., lo_x - first] + wx1 * rows[..., hi_x - first]
