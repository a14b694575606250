"""Heatmap non-maximum suppression by max-pooling, and the top-k candidates per joint.

As in HigherHRNet's ``HeatmapParser.nms``/``top_k``: a pixel survives when it equals
the maximum of its ``kernel x kernel`` neighbourhood, every other pixel becomes 0;
then the k largest surviving values of each joint map are the candidates.

Unlike HigherHRNet, a flat plateau yields **one** candidate: a Gaussian centred
between two pixels has two (or four) equal maxima with equal tags, and each of
them used to start a person of its own. Of the survivors with the same positive
value, one is dropped when an earlier one (row-major: y, then x) lies in its
``kernel x kernel`` window, so a chain of equal survivors keeps its first pixel.
Non-positive survivors are left alone (they can never pass the detection
threshold, which is >= 0). Unlike ``torch.topk``, ties in the top-k are broken
deterministically too: equal values are taken in increasing row-major pixel index.

:func:`top_k_candidates` runs the C++ extension ``threempose._heatmap_nms``
(``csrc/nms.cpp``, one pass per joint map, no full-size temporaries) when it was
built, and this module's NumPy code (the reference) otherwise; both give the same
candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch

from threempose.decode.projection import ProjectedTags

try:  # built by `pip install` from csrc/nms.cpp (optional: see setup.py)
    from threempose import _heatmap_nms as _NATIVE
except ImportError:  # pragma: no cover - depends on the install
    _NATIVE = None


@dataclass(frozen=True)
class Candidates:
    """The top-k candidates of each joint type.

    vals: float32 [J, K] heatmap values, descending per joint.
    tags: float32 [J, K, L] the tag vectors at those pixels.
    locs: int64 [J, K, 2] their (x, y) pixel indices.
    K = min(k, h * w).
    """

    vals: np.ndarray
    tags: np.ndarray
    locs: np.ndarray


def max_pool_same(maps: np.ndarray, kernel: int) -> np.ndarray:
    """Stride-1 max-pooling with "same" padding (out-of-image pixels ignored).

    maps: float [J, h, w]; kernel: odd window size. Returns [J, h, w]: each pixel's
    maximum over its kernel x kernel window, computed separably (rows, then columns),
    equal to ``torch.nn.functional.max_pool2d(maps, kernel, 1, kernel // 2)`` and
    several times faster on a CPU.
    """
    src = out = maps
    for axis in (2, 1):
        out = src.copy()
        for s in range(1, kernel // 2 + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, -s), slice(s, None)
            np.maximum(out[tuple(hi)], src[tuple(lo)], out=out[tuple(hi)])
            np.maximum(out[tuple(lo)], src[tuple(hi)], out=out[tuple(lo)])
        src = out
    return out


# Runs of equal survivors up to _SHORT_RUN pixels are compared all at once, longer ones
# run by run: pairwise up to _PAIRWISE_RUN pixels, on a dense mask beyond.
_SHORT_RUN = 16
_PAIRWISE_RUN = 2048


def _later_in_plateau(ys: np.ndarray, xs: np.ndarray, radius: int) -> np.ndarray:
    """Which of these equal-valued pixels (sorted row-major) have an earlier one within
    Chebyshev distance ``radius``: bool [n]."""
    n = ys.size
    if n <= _PAIRWISE_RUN:
        near = (np.abs(ys[:, None] - ys[None, :]) <= radius) & (np.abs(xs[:, None] - xs[None, :]) <= radius)
        return np.tril(near, k=-1).any(axis=1)
    y0, x0 = ys.min(), xs.min()
    mask = np.zeros((ys.max() - y0 + 1 + 2 * radius, xs.max() - x0 + 1 + 2 * radius), dtype=bool)
    mask[ys - y0 + radius, xs - x0 + radius] = True
    later = np.zeros(n, dtype=bool)
    for dy in range(-radius, 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx >= 0:
                break
            later |= mask[ys - y0 + radius + dy, xs - x0 + radius + dx]
    return later


def drop_plateau_duplicates(det: np.ndarray, peaks: np.ndarray, kernel: int) -> np.ndarray:
    """Keep one pixel per plateau of NMS survivors (see the module docstring).

    det: float32 [J, h, w]; peaks: bool [J, h, w] the max-pool survivors. Returns a
    new bool [J, h, w] mask.
    """
    joint, ys, xs = np.nonzero(peaks & (det > 0))        # row-major within each joint
    vals = det[joint, ys, xs]
    order = np.lexsort((vals, joint))                   # stable: row-major among equal values
    joint, ys, xs, vals = joint[order], ys[order], xs[order], vals[order]
    same = (joint[1:] == joint[:-1]) & (vals[1:] == vals[:-1])
    out = peaks.copy()
    if not same.any():
        return out
    radius = kernel // 2
    run = np.cumsum(np.concatenate([[True], ~same]))    # run id of each survivor
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    lengths = np.diff(np.concatenate([starts, [vals.size]]))
    later = np.zeros(vals.size, dtype=bool)
    short = (lengths <= _SHORT_RUN)[run - 1]
    for d in range(1, min(int(lengths[lengths <= _SHORT_RUN].max(initial=1)), _SHORT_RUN)):
        i = np.arange(d, vals.size)
        earlier = i - d
        hit = short[i] & (run[i] == run[earlier]) & (np.abs(ys[i] - ys[earlier]) <= radius) \
            & (np.abs(xs[i] - xs[earlier]) <= radius)
        later[i[hit]] = True
    for a in starts[lengths > _SHORT_RUN]:
        b = a + lengths[run[a] - 1]
        later[a:b] = _later_in_plateau(ys[a:b], xs[a:b], radius)
    out[joint[later], ys[later], xs[later]] = False
    return out


def nms_heatmaps(heatmaps: np.ndarray, kernel: int) -> np.ndarray:
    """Zero every pixel that is not the maximum of its kernel x kernel window, and
    every plateau pixel but the first (see the module docstring).

    heatmaps: float32 [J, h, w]. kernel: odd window size (HigherHRNet uses 5 at
    the 512-pixel input resolution). Returns float32 [J, h, w].
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the NMS kernel must be an odd positive size, got {kernel}")
    det = np.asarray(heatmaps, dtype=np.float32)
    if det.ndim != 3:
        raise ValueError(f"heatmaps must be [J, h, w], got shape {det.shape}")
    peaks = drop_plateau_duplicates(det, max_pool_same(det, kernel) == det, kernel)
    return np.where(peaks, det, np.float32(0))


def top_k_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row of ``values`` [J, N] -> int64 [J, min(k, N)].

    Sorted by value descending; equal values by increasing index.
    """
    num = values.shape[1]
    k = min(k, num)
    kth = torch.topk(torch.from_numpy(np.ascontiguousarray(values)), k, dim=1, sorted=True).values[:, -1].numpy()
    out = np.empty((values.shape[0], k), dtype=np.int64)
    for j, row in enumerate(values):
        above = np.flatnonzero(row > kth[j])
        ties = np.flatnonzero(row == kth[j])[: k - above.size]
        chosen = np.concatenate([above, ties])
        out[j] = chosen[np.lexsort((chosen, -row[chosen]))]
    return out


def native_nms_available() -> bool:
    """True when the C++ extension ``threempose._heatmap_nms`` was built and imports."""
    return _NATIVE is not None


def top_k_peaks(heatmaps: np.ndarray, k: int, nms_kernel: int,
                backend: Literal["auto", "native", "reference"] = "auto") -> tuple[np.ndarray, np.ndarray]:
    """NMS, then the k best pixels per joint: (float32 [J, K] values, int64 [J, K] flat indices).

    heatmaps: float32 [J, h, w]; K = min(k, h*w). backend: "native" (C++; ImportError
    if not built), "reference" (NumPy) or "auto" (native when built).
    """
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if nms_kernel < 1 or nms_kernel % 2 == 0:
        raise ValueError(f"the NMS kernel must be an odd positive size, got {nms_kernel}")
    if backend not in ("auto", "native", "reference"):
        raise ValueError(f"backend must be 'auto', 'native' or 'reference', got {backend!r}")
    det = np.ascontiguousarray(heatmaps, dtype=np.float32)
    if det.ndim != 3:
        raise ValueError(f"heatmaps must be [J, h, w], got shape {det.shape}")
    if backend == "native" and _NATIVE is None:
        raise ImportError("the native NMS extension threempose._heatmap_nms is not built; reinstall with a "
                          "C++17 compiler available: pip install -e .")
    if backend != "reference" and _NATIVE is not None:
        return _NATIVE.top_k_peaks(det, nms_kernel, k)
    det = nms_heatmaps(det, nms_kernel)
    num_joints, h, w = det.shape
    flat_idx = top_k_indices(det.reshape(num_joints, h * w), k)
    return det.reshape(num_joints, h * w)[np.arange(num_joints)[:, None], flat_idx], flat_idx


def top_k_candidates(heatmaps: np.ndarray, tags: Union[np.ndarray, ProjectedTags], k: int, nms_kernel: int,
                     backend: Literal["auto", "native", "reference"] = "auto") -> Candidates:
    """NMS, then the k best candidates per joint with their tags and locations.

    heatmaps: float32 [J, h, w]. tags: float32 [J, L, h, w] tag maps (channel-first),
    or :class:`ProjectedTags` projected to (w, h). backend: as for :func:`top_k_peaks`.
    Returns :class:`Candidates` (K = min(k, h*w)).
    """
    heatmaps = np.asarray(heatmaps)
    if heatmaps.ndim == 3 and isinstance(tags, np.ndarray) and tags.ndim == 4:
        tags = ProjectedTags(tags, (tags.shape[3], tags.shape[2]))
    if heatmaps.ndim != 3 or not isinstance(tags, ProjectedTags) or tags.shape[0] != heatmaps.shape[0] \
            or tags.shape[2:] != heatmaps.shape[1:]:
        raise ValueError(f"tags must be [J, L, h, w] matching heatmaps {heatmaps.shape}, "
                         f"got {getattr(tags, 'shape', None)}")
    vals, flat_idx = top_k_peaks(heatmaps, k, nms_kernel, backend)
    num_joints, h, w = heatmaps.shape
    xs, ys = flat_idx % w, flat_idx // w
    joints = np.broadcast_to(np.arange(num_joints)[:, None], flat_idx.shape)
    cand_tags = tags.at(joints.reshape(-1), xs.reshape(-1), ys.reshape(-1)).reshape(*flat_idx.shape, -1)
    locs = np.stack([xs, ys], axis=-1)
    return Candidates(vals=vals.astype(np.float32), tags=cand_tags.astype(np.float32), locs=locs)
