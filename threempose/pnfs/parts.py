"""PNFS body-part groupings for COCO (PNFS §III-E, Table I) and the merge of part outputs.

PNFS splits the 17 COCO keypoints into ``P`` parts, one part-specific fabric
subnetwork each. Parts may share keypoints (P = 5 and P = 8: the elbow is in
both the upper- and the lower-arm part). PNFS combines a shared keypoint by
*summing* the squashed scores that every part predicts for it (§III-D: "the
final position will be inferred by the prediction summed from these parts";
Eq. 6 sums ``f_S(T_p^i) * 1(k, p, i)`` over ``p, i`` before comparing with the
ground truth), so the sum, not each part's score, is trained towards the
Gaussian target and decoded at inference.

Table I, COCO column (0-based indices in :data:`threempose.data.keypoints.JOINT_NAMES` order):

====  ===============  ===========
P     group            COCO joints
====  ===============  ===========
1     all keypoints    0-16
3     head part        0-4
3     upper limb part  5-10
3     lower limb part  11-16
5     head-shoulder    0-6
5     left lower arm   7, 9
5     right lower arm  8, 10
5     thigh            11, 12
5     lower limb part  13-16
8     head-shoulder    0-6
8     left upper arm   5, 7
8     left lower arm   7, 9
8     right upper arm  6, 8
8     right lower arm  8, 10
8     thigh            11-14
8     left lower leg   13, 15
8     right lower leg  14, 16
====  ===============  ===========
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from threempose.data.keypoints import NUM_JOINTS

# P -> ((group name, joint indices), ...) in Table I's order.
PART_GROUPS: dict[int, tuple[tuple[str, tuple[int, ...]], ...]] = {
    1: (("all keypoints", tuple(range(0, 17))),),
    3: (("head part", tuple(range(0, 5))),
        ("upper limb part", tuple(range(5, 11))),
        ("lower limb part", tuple(range(11, 17)))),
    5: (("head-shoulder", tuple(range(0, 7))),
        ("left lower arm", (7, 9)),
        ("right lower arm", (8, 10)),
        ("thigh", (11, 12)),
        ("lower limb part", tuple(range(13, 17)))),
    8: (("head-shoulder", tuple(range(0, 7))),
        ("left upper arm", (5, 7)),
        ("left lower arm", (7, 9)),
        ("right upper arm", (6, 8)),
        ("right lower arm", (8, 10)),
        ("thigh", tuple(range(11, 15))),
        ("left lower leg", (13, 15)),
        ("right lower leg", (14, 16))),
}

PART_MODES = tuple(sorted(PART_GROUPS))  # (1, 3, 5, 8)


def _check_mode(num_parts: int) -> None:
    if num_parts not in PART_GROUPS:
        raise ValueError(f"PNFS body-part mode P={num_parts!r} is not one of Table I's modes "
                         f"{list(PART_MODES)}")


def part_groups(num_parts: int) -> list[list[int]]:
    """The COCO joint indices of each of the ``num_parts`` parts (Table I), in Table I's order.

    ``num_parts`` is 1, 3, 5 or 8; anything else raises ``ValueError``.
    """
    _check_mode(num_parts)
    return [list(joints) for _, joints in PART_GROUPS[num_parts]]


def part_names(num_parts: int) -> list[str]:
    """The Table I group names of mode ``num_parts``, in the order of :func:`part_groups`."""
    _check_mode(num_parts)
    return [name for name, _ in PART_GROUPS[num_parts]]


def parts_per_joint(num_parts: int) -> list[int]:
    """How many parts of mode ``num_parts`` predict each of the 17 joints (list of 17 ints >= 1)."""
    counts = [0] * NUM_JOINTS
    for group in part_groups(num_parts):
        for joint in group:
            counts[joint] += 1
    return counts


def merge_part_outputs(part_maps: Sequence[Tensor], num_parts: int) -> Tensor:
    """Combine per-part keypoint maps into one map per COCO joint, as PNFS Eq. 6 does.

    Args:
        part_maps: ``num_parts`` tensors; part ``p`` is ``[B, len(part_groups(P)[p]), *rest]``
            (``rest`` is typically ``h, w``: squashed scores), the same ``B`` and ``rest``
            for every part, channel ``i`` being joint ``part_groups(P)[p][i]``.
        num_parts: the mode ``P`` (1, 3, 5 or 8).
    Returns:
        ``[B, 17, *rest]``: for each joint, the sum of the maps of every part that holds it
        (a joint held by one part is that part's map unchanged). Differentiable.
    """
    groups = part_groups(num_parts)
    if len(part_maps) != len(groups):
        raise ValueError(f"P={num_parts} has {len(groups)} parts, got {len(part_maps)} part maps")
    first = part_maps[0]
    batch, rest = first.shape[0], tuple(first.shape[2:])
    merged = first.new_zeros((batch, NUM_JOINTS) + rest)
    for p, (group, maps) in enumerate(zip(groups, part_maps)):
        expected = (batch, len(group)) + rest
        if tuple(maps.shape) != expected:
            raise ValueError(f"part {p} ({part_names(num_parts)[p]}, joints {group}) of P={num_parts}: "
                             f"expected a map of shape {list(expected)}, got {list(maps.shape)}")
        index = torch.tensor(group, device=maps.device)
        merged = merged.index_add(1, index, maps)
    return merged
