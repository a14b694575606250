"""Quarter-pixel adjustment of grouped joints and refinement of missing joints.

Both follow HigherHRNet's ``HeatmapParser.adjust`` / ``refine``, except that refine
searches a window around each person instead of the whole map (see
:func:`refine_windows`), in float32. Coordinates here
are *heatmap index* coordinates of the decoding resolution (pixel (x, y) has its
centre at (x, y)); HigherHRNet's extra ``+0.5`` belongs to its continuous
convention and is applied, for us, when mapping to the image (see
:mod:`threempose.decode.resize`).
"""
from __future__ import annotations

from typing import Union

import numpy as np

from threempose.decode.projection import ProjectedTags


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


def refine_windows(people: np.ndarray, map_size: tuple[int, int], margin: float = 1.0,
                   min_margin: float = 0.125) -> np.ndarray:
    """The map window refine searches for each person's missing joints.

    people: [P, J, 3 + L] from the grouping (pixel x, y, value, tags); map_size: (w, h).
    The window is the bounding box of the person's grouped joints (value > 0), grown
    on every side by ``max(margin * its longer side, min_margin * the map's longer
    side)`` map pixels and clipped to the map: a missing joint is looked for within
    about one body length of the person, never across the whole image.
    Returns int64 [P, 4] (x0, y0, x1, y1), end-exclusive; an empty window for a
    person without grouped joints.
    """
    width, height = map_size
    found = people[..., 2] > 0                                         # [P, J]
    xs = np.where(found, people[..., 0], np.nan)
    ys = np.where(found, people[..., 1], np.nan)
    windows = np.zeros((people.shape[0], 4), dtype=np.int64)
    has = found.any(axis=1)
    if not has.any():
        return windows
    with np.errstate(invalid="ignore"):
        lo = np.stack([np.nanmin(xs[has], axis=1), np.nanmin(ys[has], axis=1)], axis=1)
        hi = np.stack([np.nanmax(xs[has], axis=1), np.nanmax(ys[has], axis=1)], axis=1)
    grow = np.maximum(margin * (hi - lo).max(axis=1), min_margin * max(width, height))[:, None]
    lo = np.maximum(np.floor(lo - grow), 0)
    hi = np.minimum(np.ceil(hi + grow) + 1, [width, height])
    windows[has] = np.concatenate([lo, hi], axis=1).astype(np.int64)
    return windows


def refine_people(keypoints: np.ndarray, joint_tags: np.ndarray, heatmaps: np.ndarray,
                  tags: Union[np.ndarray, ProjectedTags], windows: np.ndarray) -> np.ndarray:
    """Fill the people's missing joints from their windows of the maps (HigherHRNet ``refine``).

    keypoints: [P, J, 3] (x, y, score) at the decoding resolution; score 0 = missing.
    joint_tags: [P, J, L] the tags of the grouped joints (rows with score > 0 are used).
    heatmaps: float32 [J, h, w]. tags: float32 [J, L, h, w] (tag maps channel-first),
    or :class:`ProjectedTags` projected to (w, h).
    windows: int64 [P, 4] (x0, y0, x1, y1) from :func:`refine_windows`.
    Returns a new float64 [P, J, 3]. For each missing joint of a person with at least
    one grouped joint, the window pixel maximising ``heatmap - round(||tag - mean
    tag||)`` (float32; first in row-major order on ties) is taken, quarter-pixel
    adjusted, and filled in when its heatmap value is > 0; detected joints are
    unchanged. The work is one vectorised pass over each person's missing joints,
    so it grows with people x joints x window area, not people x map area (the
    tags are resampled to the decoding resolution at most once).
    """
    out = np.array(keypoints, dtype=np.float64)
    if not isinstance(tags, ProjectedTags):
        tags = ProjectedTags(tags, (tags.shape[3], tags.shape[2]))
    detected = out[..., 2] > 0                                         # [P, J]
    todo = np.flatnonzero(detected.any(axis=1) & ~detected.all(axis=1))
    area = np.maximum(windows[:, 2] - windows[:, 0], 0) * np.maximum(windows[:, 3] - windows[:, 1], 0)
    num_joints, _, height, width = tags.shape
    if ((~detected[todo]).sum(axis=1) * area[todo]).sum() > num_joints * height * width:
        tags.materialize()        # more window pixels to read than the maps hold
    for p in todo:
        x0, y0, x1, y1 = (int(v) for v in windows[p])
        if x1 <= x0 or y1 <= y0:
            continue
        missing = np.flatnonzero(~detected[p])
        mean_tag = joint_tags[p, detected[p]].astype(np.float64).mean(axis=0).astype(np.float32)
        det = heatmaps[missing, y0:y1, x0:x1]                          # [m, h', w']
        diff = tags.window(missing, x0, y0, x1, y1) - mean_tag[None, :, None, None]
        np.multiply(diff, diff, out=diff)
        score = diff[:, 0].copy()                                      # squared distance, summed in tag order
        for l in range(1, diff.shape[1]):
            score += diff[:, l]
        np.sqrt(score, out=score)
        np.rint(score, out=score)
        np.subtract(det, score, out=score)
        win_w = x1 - x0
        flat = score.reshape(missing.size, -1).argmax(axis=1)
        ys, xs = flat // win_w + y0, flat % win_w + x0
        vals = heatmaps[missing, ys, xs]
        fill = vals > 0
        xy = quarter_offsets(heatmaps, missing[fill], xs[fill], ys[fill])
        out[p, missing[fill], :2] = xy
        out[p, missing[fill], 2] = vals[fill]
    return out
