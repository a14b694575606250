"""Quarter-pixel adjustment of grouped joints and refinement of missing joints.

Both follow HigherHRNet's ``HeatmapParser.adjust`` / ``refine``. Coordinates here
are *heatmap index* coordinates of the decoding resolution (pixel (x, y) has its
centre at (x, y)); HigherHRNet's extra ``+0.5`` belongs to its continuous
convention and is applied, for us, when mapping to the image (see
:mod:`threempose.decode.resize`).
"""
from __future__ import annotations

import numpy as np


def quarter_offsets(heatmaps: np.ndarray, joints: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Shift pixel locations a quarter pixel towards their larger neighbour.

    heatmaps: [J, h, w]. joints, xs, ys: int arrays [n] (joint type, pixel x, pixel y).
    Returns float64 [n, 2] (x, y): x + 0.25 if the right neighbour is strictly
    larger than the left one, else x - 0.25 (HigherHRNet's rule, borders clamped);
    the same for y with the lower/upper neighbours.
    """
    _, h, w = heatmaps.shape
    right = heatmaps[joints, ys, np.minimum(xs + 1, w - 1)]
    left = heatmaps[joints, ys, np.maximum(xs - 1, 0)]
    down = heatmaps[joints, np.minimum(ys + 1, h - 1), xs]
    up = heatmaps[joints, np.maximum(ys - 1, 0), xs]
    dx = np.where(right > left, 0.25, -0.25)
    dy = np.where(down > up, 0.25, -0.25)
    return np.stack([xs + dx, ys + dy], axis=-1)


def adjust_people(people: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """Quarter-pixel adjusted (x, y) of grouped joints.

    people: [P, J, 3 + L] from the grouping (x, y, value, tags); heatmaps: [J, h, w].
    Returns float64 [P, J, 2]: joints with value > 0 shifted by
    :func:`quarter_offsets`, the others copied unchanged.
    """
    xy = people[..., :2].astype(np.float64)
    person, joint = np.nonzero(people[..., 2] > 0)
    if person.size:
        xs = people[person, joint, 0].astype(np.int64)
        ys = people[person, joint, 1].astype(np.int64)
        xy[person, joint] = quarter_offsets(heatmaps, joint, xs, ys)
    return xy


def refine_person(keypoints: np.ndarray, joint_tags: np.ndarray, heatmaps: np.ndarray,
                  tags: np.ndarray) -> np.ndarray:
    """Fill a person's missing joints from the full maps (HigherHRNet ``refine``).

    keypoints: [J, 3] (x, y, score) at the decoding resolution; score 0 = missing.
    joint_tags: [J, L] the tags of the person's grouped joints (rows with score > 0 are used).
    heatmaps: [J, h, w]. tags: [J, L, h, w] (tag maps channel-first).
    Returns a new float64 [J, 3]. For each missing joint, the pixel maximising
    ``heatmap - round(||tag - person's mean tag||)`` is taken (first in row-major
    order on ties), quarter-pixel adjusted, and filled in when its heatmap value
    is > 0; detected joints are unchanged.
    """
    out = np.array(keypoints, dtype=np.float64)
    detected = out[:, 2] > 0
    missing = np.flatnonzero(~detected)
    if missing.size == 0 or not detected.any():
        return out
    mean_tag = joint_tags[detected].astype(np.float64).mean(axis=0)
    diff = tags[missing].astype(np.float64) - mean_tag[None, :, None, None]
    dist = np.sqrt((diff * diff).sum(axis=1))                   # [m, h, w]
    det = heatmaps[missing]
    score = det - np.round(dist)
    _, h, w = det.shape
    flat = score.reshape(missing.size, h * w).argmax(axis=1)
    ys, xs = flat // w, flat % w
    vals = det[np.arange(missing.size), ys, xs]
    xy = quarter_offsets(heatmaps, missing, xs, ys)
    fill = vals > 0
    out[missing[fill], :2] = xy[fill]
    out[missing[fill], 2] = vals[fill]
    return out
