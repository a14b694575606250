"""PNFS body-part groupings for COCO and MPII (PNFS §III-E, Table I) and the merge of part outputs.

PNFS splits the keypoints into ``P`` parts, one part-specific fabric subnetwork each. Parts
may share keypoints (P = 5 and P = 8: the elbow is in both the upper- and the lower-arm
part). PNFS combines a shared keypoint by *summing* the squashed scores that every part
predicts for it (§III-D: "the final position will be inferred by the prediction summed from
these parts"; Eq. 6 sums ``f_S(T_p^i) * 1(k, p, i)`` over ``p, i`` before comparing with the
ground truth), so the sum, not each part's score, is trained towards the Gaussian target and
decoded at inference.

Table I, transcribed (0-based indices as the paper prints them):

====  ===============  ===========  ===========
P     group            MPII         COCO joints
====  ===============  ===========  ===========
1     all keypoints    0-15         0-16
3     head part        0-2          0-4
3     upper limb part  3-8          5-10
3     lower limb part  9-15         11-16
5     head-shoulder    0-4          0-6
5     left lower arm   5, 7         7, 9
5     right lower arm  6, 8         8, 10
5     thigh            9, 10, 15    11, 12
5     lower limb part  11-14        13-16
8     head-shoulder    0-4          0-6
8     left upper arm   3, 5         5, 7
8     left lower arm   5, 7         7, 9
8     right upper arm  4, 6         6, 8
8     right lower arm  6, 8         8, 10
8     thigh            9-12, 15     11-14
8     left lower leg   11, 13       13, 15
8     right lower leg  12, 14       14, 16
====  ===============  ===========  ===========

The COCO indices are :data:`threempose.data.keypoints.JOINT_NAMES` order (PNFS footnote 3's
COCO numbering). The MPII column is in PNFS footnote 3's MPII numbering, not the MPII
release's (there 0-2 are the right ankle, knee and hip, not a "head part"): "head top, upper
neck, thorax, l-shoulder, r-shoulder, l-elbow, r-elbow, l-wrist, r-wrist, l-hip, r-hip,
l-knee, r-knee, l-ankle, r-ankle, pelvis keypoints to 0-15" (:data:`TABLE_I_MPII_ORDER`).
:func:`part_groups` with ``dataset="mpii"`` returns the groups in the release order that MPII
annotation files and :mod:`threempose.pnfs.pckh` use (:data:`~threempose.pnfs.pckh.MPII_JOINT_NAMES`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from threempose.data.keypoints import NUM_JOINTS
from threempose.pnfs.pckh import MPII_JOINT_NAMES

DATASETS = ("coco", "mpii")
TABLE_I_MPII_ORDER = (
    "head_top", "upper_neck", "thorax", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle", "pelvis",
)
"""The MPII joint behind each index of Table I's MPII column: PNFS footnote 3's numbering."""

# P -> ((group name, MPII indices in Table I's numbering, COCO indices), ...) in Table I's order.
_TABLE_I: dict[int, tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]] = {
    1: (("all keypoints", tuple(range(0, 16)), tuple(range(0, 17))),),
    3: (("head part", tuple(range(0, 3)), tuple(range(0, 5))),
        ("upper limb part", tuple(range(3, 9)), tuple(range(5, 11))),
        ("lower limb part", tuple(range(9, 16)), tuple(range(11, 17)))),
    5: (("head-shoulder", tuple(range(0, 5)), tuple(range(0, 7))),
        ("left lower arm", (5, 7), (7, 9)),
        ("right lower arm", (6, 8), (8, 10)),
        ("thigh", (9, 10, 15), (11, 12)),
        ("lower limb part", tuple(range(11, 15)), tuple(range(13, 17)))),
    8: (("head-shoulder", tuple(range(0, 5)), tuple(range(0, 7))),
        ("left upper arm", (3, 5), (5, 7)),
        ("left lower arm", (5, 7), (7, 9)),
        ("right upper arm", (4, 6), (6, 8)),
        ("right lower arm", (6, 8), (8, 10)),
        ("thigh", (9, 10, 11, 12, 15), tuple(range(11, 15))),
        ("left lower leg", (11, 13), (13, 15)),
        ("right lower leg", (12, 14), (14, 16))),
}

_MPII_RELEASE_INDEX = tuple(MPII_JOINT_NAMES.index(name) for name in TABLE_I_MPII_ORDER)

PART_GROUPS: dict[str, dict[int, tuple[tuple[str, tuple[int, ...]], ...]]] = {
    "coco": {p: tuple((name, coco) for name, _, coco in rows) for p, rows in _TABLE_I.items()},
    "mpii": {p: tuple((name, tuple(_MPII_RELEASE_INDEX[j] for j in mpii)) for name, mpii, _ in rows)
             for p, rows in _TABLE_I.items()},
}
"""dataset -> P -> ((group name, joint indices in the data set's own joint order), ...)."""

NUM_DATASET_JOINTS = {"coco": NUM_JOINTS, "mpii": len(MPII_JOINT_NAMES)}
PART_MODES = tuple(sorted(_TABLE_I))  # (1, 3, 5, 8)


def _check_mode(num_parts: int, dataset: str = "coco") -> None:
    if dataset not in DATASETS:
        raise ValueError(f"PNFS body parts are defined for {list(DATASETS)}, not {dataset!r}")
    if num_parts not in _TABLE_I:
        raise ValueError(f"PNFS body-part mode P={num_parts!r} is not one of Table I's modes "
                         f"{list(PART_MODES)}")


def part_groups(num_parts: int, dataset: str = "coco") -> list[list[int]]:
    """The joint indices of each of the ``num_parts`` parts (Table I), in Table I's order.

    ``dataset`` ``"coco"``: indices into the 17 COCO joints; ``"mpii"``: into the 16 MPII joints
    in the release order (:data:`~threempose.pnfs.pckh.MPII_JOINT_NAMES`). ``num_parts`` is 1,
    3, 5 or 8; anything else (or another data set) raises ``ValueError``.
    """
    _check_mode(num_parts, dataset)
    return [list(joints) for _, joints in PART_GROUPS[dataset][num_parts]]


def part_names(num_parts: int) -> list[str]:
    """The Table I group names of mode ``num_parts``, in the order of :func:`part_groups`."""
    _check_mode(num_parts)
    return [name for name, _, _ in _TABLE_I[num_parts]]


def parts_per_joint(num_parts: int, dataset: str = "coco") -> list[int]:
    """How many parts of mode ``num_parts`` predict each joint of ``dataset`` (a list of ints >= 1)."""
    groups = part_groups(num_parts, dataset)
    counts = [0] * NUM_DATASET_JOINTS[dataset]
    for group in groups:
        for joint in group:
            counts[joint] += 1
    return counts


def merge_part_outputs(part_maps: Sequence[Tensor], num_parts: int, dataset: str = "coco") -> Tensor:
    """Combine per-part keypoint maps into one map per joint, as PNFS Eq. 6 does.

    Args:
        part_maps: ``num_parts`` tensors; part ``p`` is ``[B, len(part_groups(P, dataset)[p]), *rest]``
            (``rest`` is typically ``h, w``: squashed scores), the same ``B`` and ``rest``
            for every part, channel ``i`` being joint ``part_groups(P, dataset)[p][i]``.
        num_parts: the mode ``P`` (1, 3, 5 or 8).
        dataset: ``"coco"`` (17 joints) or ``"mpii"`` (16, release order).
    Returns:
        ``[B, J, *rest]`` (``J`` = 17 or 16): for each joint, the sum of the maps of every part
        that holds it (a joint held by one part is that part's map unchanged). Differentiable.
    """
    groups = part_groups(num_parts, dataset)
    if len(part_maps) != len(groups):
        raise ValueError(f"P={num_parts} has {len(groups)} parts, got {len(part_maps)} part maps")
    first = part_maps[0]
    batch, rest = first.shape[0], tuple(first.shape[2:])
    merged = first.new_zeros((batch, NUM_DATASET_JOINTS[dataset]) + rest)
    for p, (group, maps) in enumerate(zip(groups, part_maps)):
        expected = (batch, len(group)) + rest
        if tuple(maps.shape) != expected:
            raise ValueError(f"part {p} ({part_names(num_parts)[p]}, joints {group}) of P={num_parts}: "
                             f"expected a map of shape {list(expected)}, got {list(maps.shape)}")
        index = torch.tensor(group, device=maps.device)
        merged = merged.index_add(1, index, maps)
    return merged
