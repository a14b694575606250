"""Ideal network outputs of known people: what a perfect bottom-up network would predict.

One Gaussian per visible joint on its joint's heatmap (the maximum over people,
as in the training targets) and the person's tag on a disc around each of its
joints on that joint's tag map (0 elsewhere). The decoder's tests and benchmarks
decode these back to the people they were made from.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def render_ideal_outputs(xy: np.ndarray, map_size: tuple[int, int], person_tags: np.ndarray,
                         visible: Optional[np.ndarray] = None, amplitude: Optional[np.ndarray] = None,
                         sigma: float = 1.5, tag_radius: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps and tag maps for people at known map positions.

    xy: [P, J, 2] joint positions (x, y) in map pixels (sub-pixel allowed).
    map_size: (w, h). person_tags: [P] one scalar tag per person.
    visible: bool [P, J] (default all); invisible joints leave no trace.
    amplitude: [P, J] peak heights (default 1).
    sigma: Gaussian standard deviation, tag_radius: disc radius, both in map pixels.
    Returns (float32 [J, h, w] heatmaps, float32 [J, h, w] tags); where discs of
    two people overlap, a pixel takes the tag of the nearer joint.
    """
    xy = np.asarray(xy, dtype=np.float64)
    num_people, num_joints, _ = xy.shape
    width, height = map_size
    visible = np.ones((num_people, num_joints), bool) if visible is None else np.asarray(visible, bool)
    amplitude = np.ones((num_people, num_joints)) if amplitude is None else np.asarray(amplitude, np.float64)
    person_tags = np.asarray(person_tags, dtype=np.float64)
    if visible.shape != (num_people, num_joints) or amplitude.shape != (num_people, num_joints) \
            or person_tags.shape != (num_people,):
        raise ValueError(f"visible, amplitude must be [P, J] and person_tags [P] for xy {xy.shape}")
    us, vs = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    heatmaps = np.zeros((num_joints, height, width))
    tags = np.zeros((num_joints, height, width))
    nearest = np.full((num_joints, height, width), np.inf)
    for p in range(num_people):
        dx2 = (us[None, :] - xy[p, :, 0:1]) ** 2                      # [J, w]
        dy2 = (vs[None, :] - xy[p, :, 1:2]) ** 2                      # [J, h]
        d2 = dy2[:, :, None] + dx2[:, None, :]                          # [J, h, w]
        d2[~visible[p]] = np.inf
        peak = amplitude[p][:, None, None] * np.exp(-d2 / (2 * sigma ** 2))
        np.maximum(heatmaps, peak, out=heatmaps)
        mine = (d2 <= tag_radius ** 2) & (d2 < nearest)
        tags[mine] = person_tags[p]
        nearest = np.where(mine, d2, nearest)
    return heatmaps.astype(np.float32), tags.astype(np.float32)
