"""Quarter-pixel adjustment and refinement of missing joints."""
import numpy as np

from threempose.decode.adjust import adjust_people, quarter_offsets, refine_person


def test_quarter_offsets_move_towards_the_larger_neighbour():
    hm = np.zeros((1, 5, 5), np.float32)
    hm[0, 2, 2] = 1.0
    hm[0, 2, 3] = 0.5      # right > left: x + 0.25
    hm[0, 1, 2] = 0.5      # up > down: y - 0.25
    np.testing.assert_array_equal(quarter_offsets(hm, np.array([0]), np.array([2]), np.array([2])),
                                  [[2.25, 1.75]])
    flat = np.zeros((1, 5, 5), np.float32)   # equal neighbours: HigherHRNet shifts by -0.25
    np.testing.assert_array_equal(quarter_offsets(flat, np.array([0]), np.array([0]), np.array([4])),
                                  [[-0.25, 3.75]])


def test_adjust_moves_only_present_joints():
    hm = np.zeros((2, 6, 6), np.float32)
    hm[0, 3, 3], hm[0, 3, 4], hm[0, 4, 3] = 1.0, 0.4, 0.4
    people = np.zeros((1, 2, 4), np.float32)
    people[0, 0] = (3, 3, 1.0, 0.0)
    people[0, 1] = (5, 5, 0.0, 0.0)          # missing joint: untouched
    np.testing.assert_array_equal(adjust_people(people, hm)[0], [[3.25, 3.25], [5, 5]])


def test_refine_takes_the_peak_whose_tag_matches_the_person():
    num_joints, h, w = 3, 10, 12
    hm = np.zeros((num_joints, h, w), np.float32)
    tags = np.zeros((num_joints, 1, h, w), np.float32)
    hm[2, 2, 2], tags[2, 0, 2, 2] = 0.9, 5.0     # strong peak of another person (tag 5)
    hm[2, 7, 9], tags[2, 0, 7, 9] = 0.3, 1.0     # weaker peak with this person's tag
    hm[2, 7, 10] = 0.1                           # right neighbour larger: x + 0.25
    keypoints = np.array([[1.25, 1.0, 0.8], [3.0, 4.0, 0.7], [0, 0, 0]])
    joint_tags = np.array([[1.1], [0.9], [0.0]])   # mean of the detected joints: 1.0
    out = refine_person(keypoints, joint_tags, hm, tags)
    np.testing.assert_allclose(out[2], [9.25, 6.75, 0.3])
    np.testing.assert_array_equal(out[:2], keypoints[:2])       # detected joints unchanged
    hm[2] = -1.0                                                  # no positive response: stays missing
    np.testing.assert_array_equal(refine_person(keypoints, joint_tags, hm, tags)[2], [0, 0, 0])
