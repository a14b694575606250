"""PNFS Table I body-part groupings and the summing merge of shared keypoints (Eq. 6)."""
from __future__ import annotations

import pytest
import torch

from threempose.data.keypoints import JOINT_NAMES
from threempose.pnfs.parts import TABLE_I_MPII_ORDER, merge_part_outputs, part_groups, part_names, parts_per_joint
from threempose.pnfs.pckh import MPII_JOINT_NAMES


def _indices(text: str) -> list[int]:
    """'0-4' -> [0..4], '7,9' -> [7, 9], '9-12,15' -> [9..12, 15] (Table I notation)."""
    out = []
    for piece in text.split(","):
        low, _, high = piece.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


# Table I, COCO column, copied from the paper's text.
TABLE_I_COCO = {
    1: [("all keypoints", "0-16")],
    3: [("head part", "0-4"), ("upper limb part", "5-10"), ("lower limb part", "11-16")],
    5: [("head-shoulder", "0-6"), ("left lower arm", "7,9"), ("right lower arm", "8,10"),
        ("thigh", "11,12"), ("lower limb part", "13-16")],
    8: [("head-shoulder", "0-6"), ("left upper arm", "5,7"), ("left lower arm", "7,9"),
        ("right upper arm", "6,8"), ("right lower arm", "8,10"), ("thigh", "11-14"),
        ("left lower leg", "13,15"), ("right lower leg", "14,16")],
}

# Table I, MPII column, copied from the paper's text (its own MPII numbering).
TABLE_I_MPII = {
    1: [("all keypoints", "0-15")],
    3: [("head part", "0-2"), ("upper limb part", "3-8"), ("lower limb part", "9-15")],
    5: [("head-shoulder", "0-4"), ("left lower arm", "5,7"), ("right lower arm", "6,8"),
        ("thigh", "9,10,15"), ("lower limb part", "11-14")],
    8: [("head-shoulder", "0-4"), ("left upper arm", "3,5"), ("left lower arm", "5,7"),
        ("right upper arm", "4,6"), ("right lower arm", "6,8"), ("thigh", "9-12,15"),
        ("left lower leg", "11,13"), ("right lower leg", "12,14")],
}

# The MPII joints each group name stands for, by name.
MPII_PART_JOINTS = {
    "head part": {"head_top", "upper_neck", "thorax"},
    "upper limb part": {f"{s}_{j}" for s in ("left", "right") for j in ("shoulder", "elbow", "wrist")},
    "head-shoulder": {"head_top", "upper_neck", "thorax", "left_shoulder", "right_shoulder"},
    "left upper arm": {"left_shoulder", "left_elbow"},
    "left lower arm": {"left_elbow", "left_wrist"},
    "right upper arm": {"right_shoulder", "right_elbow"},
    "right lower arm": {"right_elbow", "right_wrist"},
    "left lower leg": {"left_knee", "left_ankle"},
    "right lower leg": {"right_knee", "right_ankle"},
}

# The joints each body-part name stands for (§III-E), by COCO joint name.
PART_JOINTS_BY_NAME = {
    "left upper arm": {"left_shoulder", "left_elbow"},
    "left lower arm": {"left_elbow", "left_wrist"},
    "right upper arm": {"right_shoulder", "right_elbow"},
    "right lower arm": {"right_elbow", "right_wrist"},
    "left lower leg": {"left_knee", "left_ankle"},
    "right lower leg": {"right_knee", "right_ankle"},
    "head part": {"nose", "left_eye", "right_eye", "left_ear", "right_ear"},
    "head-shoulder": {"nose", "left_eye", "right_eye", "left_ear", "right_ear",
                      "left_shoulder", "right_shoulder"},
}


@pytest.mark.parametrize("num_parts", [1, 3, 5, 8])
def test_groups_equal_table_i(num_parts):
    assert part_names(num_parts) == [name for name, _ in TABLE_I_COCO[num_parts]]
    assert part_groups(num_parts) == [_indices(text) for _, text in TABLE_I_COCO[num_parts]]


@pytest.mark.parametrize("num_parts", [1, 3, 5, 8])
def test_groups_cover_all_17_keypoints(num_parts):
    covered = set().union(*map(set, part_groups(num_parts)))
    assert covered == set(range(17))
    assert len(part_groups(num_parts)) == num_parts


def test_group_names_match_their_joints():
    for num_parts in (3, 5, 8):
        for name, group in zip(part_names(num_parts), part_groups(num_parts)):
            if name in PART_JOINTS_BY_NAME:
                assert {JOINT_NAMES[j] for j in group} == PART_JOINTS_BY_NAME[name], (num_parts, name)


@pytest.mark.parametrize("num_parts", [1, 3, 5, 8])
def test_mpii_groups_equal_table_i_in_the_release_order(num_parts):
    """part_groups(P, "mpii") is Table I's MPII column, renumbered from the table's order to the
    MPII release order of annotation files (and of pckh)."""
    table = [[TABLE_I_MPII_ORDER[j] for j in _indices(text)] for _, text in TABLE_I_MPII[num_parts]]
    assert [[MPII_JOINT_NAMES[j] for j in g] for g in part_groups(num_parts, "mpii")] == table
    assert set().union(*map(set, part_groups(num_parts, "mpii"))) == set(range(16))
    for name, group in zip(part_names(num_parts), table):
        if name in MPII_PART_JOINTS:
            assert set(group) == MPII_PART_JOINTS[name], (num_parts, name)
    if num_parts in (5, 8):                          # the thigh holds the pelvis (index 15) in MPII
        assert "pelvis" in table[part_names(num_parts).index("thigh")]


def test_mpii_merge_has_16_joints_and_sums_p8s_shared_ones():
    groups = part_groups(8, "mpii")
    merged = merge_part_outputs([torch.ones(1, len(g), 2, 2) for g in groups], 8, "mpii")
    assert merged.shape == (1, 16, 2, 2)
    shared = {MPII_JOINT_NAMES[j] for j, n in enumerate(parts_per_joint(8, "mpii")) if n == 2}
    assert shared == {"left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_knee", "right_knee"}
    assert [int(v) for v in merged[0, :, 0, 0]] == parts_per_joint(8, "mpii")
    with pytest.raises(ValueError, match="'lsp'"):
        part_groups(3, "lsp")


def test_shared_keypoints_are_those_of_p8():
    assert parts_per_joint(1) == parts_per_joint(3) == parts_per_joint(5) == [1] * 17
    # P = 8: shoulders (head-shoulder + upper arm), elbows (upper + lower arm), knees (thigh + lower leg).
    shared = {JOINT_NAMES[j] for j, n in enumerate(parts_per_joint(8)) if n == 2}
    assert shared == {"left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
                      "left_knee", "right_knee"}
    assert max(parts_per_joint(8)) == 2


def test_merge_sums_shared_keypoints_hand_case():
    # Part p, channel i holds the constant 10 p + i + 1 over a 2 x 3 map, batch of 2.
    groups = part_groups(8)
    maps = [torch.stack([torch.full((2, 3), 10.0 * p + i + 1) for i in range(len(g))])[None].repeat(2, 1, 1, 1)
            for p, g in enumerate(groups)]
    merged = merge_part_outputs(maps, 8)
    assert merged.shape == (2, 17, 2, 3)
    expected = {
        0: 1.0,            # nose: head-shoulder channel 0
        5: 6.0 + 11.0,     # left shoulder: head-shoulder ch 5 + left upper arm ch 0
        6: 7.0 + 31.0,     # right shoulder: head-shoulder ch 6 + right upper arm ch 0
        7: 12.0 + 21.0,    # left elbow: left upper arm ch 1 + left lower arm ch 0
        8: 32.0 + 41.0,    # right elbow: right upper arm ch 1 + right lower arm ch 0
        9: 22.0,           # left wrist: left lower arm ch 1
        10: 42.0,          # right wrist
        11: 51.0, 12: 52.0,  # hips: thigh ch 0, 1
        13: 53.0 + 61.0,   # left knee: thigh ch 2 + left lower leg ch 0
        14: 54.0 + 71.0,   # right knee: thigh ch 3 + right lower leg ch 0
        15: 62.0, 16: 72.0,  # ankles: lower legs ch 1
    }
    for joint, value in expected.items():
        assert torch.all(merged[:, joint] == value), JOINT_NAMES[joint]


def test_merge_is_differentiable_and_identity_for_p1():
    x = torch.randn(3, 17, 4, 5, requires_grad=True)
    merged = merge_part_outputs([x], 1)
    assert torch.equal(merged, x)
    parts = [torch.randn(1, len(g), 2, 2, requires_grad=True) for g in part_groups(8)]
    merge_part_outputs(parts, 8).sum().backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in parts)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="P=4"):
        part_groups(4)
    with pytest.raises(ValueError, match="3 parts, got 2"):
        merge_part_outputs([torch.zeros(1, 5, 2, 2), torch.zeros(1, 6, 2, 2)], 3)
    with pytest.raises(ValueError, match="upper limb part"):
        merge_part_outputs([torch.zeros(1, 5, 2, 2), torch.zeros(1, 5, 2, 2), torch.zeros(1, 6, 2, 2)], 3)


def test_package_exports_resolve():
    import threempose.pnfs as pnfs

    assert all(callable(getattr(pnfs, name)) for name in pnfs.__all__)
    assert pnfs.part_groups is part_groups
    with pytest.raises(AttributeError, match="nope"):
        pnfs.nope
