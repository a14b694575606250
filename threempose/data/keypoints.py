"""The 17 COCO person keypoints: names, left/right flip pairs, skeleton, OKS sigmas."""
from __future__ import annotations

NUM_JOINTS = 17

JOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)

# Pairs of joint indices that swap under a horizontal flip.
FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


def flip_index(num_joints: int = NUM_JOINTS) -> list[int]:
    """Permutation p with p[j] = the joint that j becomes after a horizontal flip."""
    perm = list(range(num_joints))
    for a, b in FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return perm


# COCO skeleton as 0-based joint index pairs (the 19 limbs of person_keypoints).
SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
    (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
    (3, 5), (4, 6),
)

# Per-joint OKS sigmas used by COCOeval.
OKS_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)

# The "categories" entry of a COCO person-keypoints annotation file.
COCO_PERSON_CATEGORY = {
    "id": 1,
    "name": "person",
    "supercategory": "person",
    "keypoints": list(JOINT_NAMES),
    "skeleton": [[a + 1, b + 1] for a, b in SKELETON],  # COCO files are 1-based
}
