"""Do two forms of a network (float32 vs bf16 or int8) find the same people?

    report = agreement(fp32_predictions, int8_predictions)     # one Prediction per image, same order
    report.mean_oks, report.same_people, report.same_exit      # fractions / means over the images

People of the two forms are paired per image by the assignment that maximises the summed OKS
(Hungarian, :func:`scipy.optimize.linear_sum_assignment`); a pair with OKS below
``min_match_oks`` is no pair (a person lost and one extra). OKS is COCO's, with the reference
person's keypoint box as its area::

    OKS(a, b) = mean_j exp(-d_j^2 / (2 s^2 k_j^2))    over the joints j found in the reference a,
    d_j: distance between a's and b's joint j, s^2 = the area of a's found joints' bounding box
    (at least 1 px^2), k_j = 2 * OKS_SIGMAS[j]

Only people with score ``>= min_score`` take part (a decoder lists weak candidates near its
threshold that the other form may rank just below it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from threempose.data.keypoints import OKS_SIGMAS
from threempose.decode.decoder import Person

MIN_MATCH_OKS = 0.5


def oks(reference: np.ndarray, other: np.ndarray, sigmas: Sequence[float] = OKS_SIGMAS) -> float:
    """OKS between keypoints ``[J, 3]`` (x, y, score; score 0 = not found) of a reference
    person and another (module docstring); 0 when the reference has no joint."""
    found = reference[:, 2] > 0
    if not found.any():
        return 0.0
    xy = reference[found, :2]
    area = max(float(np.prod(xy.max(0) - xy.min(0))), 1.0)
    k = 2 * np.asarray(sigmas, dtype=np.float64)[found]
    d2 = ((reference[found, :2] - other[found, :2]) ** 2).sum(1)
    return float(np.exp(-d2 / (2 * area * k ** 2)).mean())


def match_people(reference: Sequence[Person], other: Sequence[Person],
                 min_match_oks: float = MIN_MATCH_OKS) -> list[float]:
    """The OKS of each matched pair (module docstring); ``len(reference) - len(result)`` people
    are lost, ``len(other) - len(result)`` extra."""
    if not reference or not other:
        return []
    table = np.array([[oks(a.keypoints, b.keypoints) for b in other] for a in reference])
    rows, cols = linear_sum_assignment(-table)
    return [float(table[r, c]) for r, c in zip(rows, cols) if table[r, c] >= min_match_oks]


@dataclass
class Agreement:
    """images: images compared. mean_oks: mean OKS over every matched pair (1.0 when there is
    none). same_people: fraction of images where every person has a match (none lost, none
    extra). same_exit: fraction of images that took the same exit. pairs, lost, extra: totals."""

    images: int
    mean_oks: float
    same_people: float
    same_exit: float
    pairs: int
    lost: int
    extra: int

    def to_dict(self) -> dict:
        return dict(vars(self))


def agreement(reference: Sequence, other: Sequence, min_score: float = 0.0,
              min_match_oks: float = MIN_MATCH_OKS) -> Agreement:
    """Compare two lists of :class:`~threempose.inference.predictor.Prediction` (same images, same
    order): module docstring."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"agreement needs predictions of the same images, got {len(reference)} and {len(other)}")
    all_oks, same_people, same_exit, lost, extra = [], 0, 0, 0, 0
    for a, b in zip(reference, other):
        people_a = [p for p in a.people if p.score >= min_score]
        people_b = [p for p in b.people if p.score >= min_score]
        pairs = match_people(people_a, people_b, min_match_oks)
        all_oks += pairs
        lost += len(people_a) - len(pairs)
        extra += len(people_b) - len(pairs)
        same_people += len(pairs) == len(people_a) == len(people_b)
        same_exit += a.exit == b.exit
    n = len(reference)
    return Agreement(n, float(np.mean(all_oks)) if all_oks else 1.0, same_people / n, same_exit / n,
                     len(all_oks), lost, extra)
