"""Heatmaps, joints arrays and supervision masks against hand-computed references."""
import math

import numpy as np
import pytest
import torch

from threempose.data.targets import (joints_array, make_targets, render_heatmaps, segmentation_mask,
                                     supervision_mask)


def _points(people):
    """[1, P, 17, 3] with the given {joint: (x, y, v)} per person; other joints v = 0."""
    out = torch.zeros(1, len(people), 17, 3, dtype=torch.float64)
    for p, joints in enumerate(people):
        for j, xyv in joints.items():
            out[0, p, j] = torch.tensor(xyv, dtype=torch.float64)
    return out


def _gaussian(h, w, x, y, sigma):
    v, u = np.mgrid[0:h, 0:w]
    return np.exp(-((u - x) ** 2 + (v - y) ** 2) / (2 * sigma ** 2))


def test_heatmap_is_the_closed_form_gaussian_at_the_subpixel_joint():
    hm = render_heatmaps(_points([{5: (10.3, 7.6, 2)}]), 24, 32, sigma=2.0)
    assert hm.shape == (1, 17, 24, 32) and hm.dtype == torch.float32
    np.testing.assert_allclose(hm[0, 5].numpy(), _gaussian(24, 32, 10.3, 7.6, 2.0), atol=1e-6)
    assert divmod(int(hm[0, 5].argmax()), 32) == (8, 10)          # nearest cell (row 8, col 10)
    # one sigma to the side the value is exp(-1/2) relative to the centre
    hm1 = render_heatmaps(_points([{0: (12.0, 9.0, 1)}]), 24, 32, sigma=3.0)[0, 0]
    assert hm1[9, 12] == pytest.approx(1.0) and hm1[9, 15] == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert hm[0, [j for j in range(17) if j != 5]].abs().max() == 0


def test_heatmap_takes_the_maximum_over_people():
    pts = _points([{3: (8.0, 8.0, 2)}, {3: (11.0, 9.0, 2)}])
    hm = render_heatmaps(pts, 20, 20, sigma=2.0)[0, 3].numpy()
    expected = np.maximum(_gaussian(20, 20, 8, 8, 2.0), _gaussian(20, 20, 11, 9, 2.0))
    np.testing.assert_allclose(hm, expected, atol=1e-6)


def test_joints_outside_the_map_or_unlabelled_are_dropped():
    # width 32: x = 31.4 rounds to 31 (kept), 31.6 to 32 (dropped), -0.6 to -1 (dropped), -0.4 to 0 (kept)
    pts = _points([{0: (31.4, 3.0, 2), 1: (31.6, 3.0, 2), 2: (-0.6, 3.0, 2), 3: (-0.4, 3.0, 2),
                    4: (5.0, 5.0, 0), 5: (5.0, 23.4, 1)}])
    hm = render_heatmaps(pts, 24, 32, sigma=2.0)[0]
    peaks = hm.flatten(1).max(dim=1).values
    assert [bool(p > 0) for p in peaks[:6]] == [True, False, False, True, False, True]
    joints = joints_array(pts, 24, 32, max_people=2)[0, 0]
    assert joints[:6].tolist() == [[3 * 32 + 31, 1], [0, 0], [0, 0], [3 * 32 + 0, 1], [0, 0],
                                   [23 * 32 + 5, 1]]


def test_joints_array_packs_people_with_targets_and_truncates():
    pts = _points([{0: (40.0, 1.0, 2)},                  # no joint inside: not a slot
                   {16: (2.2, 3.7, 2)},                  # -> slot 0, cell (4, 2)
                   {}, {7: (0.0, 0.0, 1)},              # -> slot 1, cell (0, 0)
                   {1: (5.0, 6.0, 2)}])                  # third person with targets: dropped at max_people=2
    joints = joints_array(pts, 8, 8, max_people=2)
    assert joints.shape == (1, 2, 17, 2) and joints.dtype == torch.int64
    expected = torch.zeros(1, 2, 17, 2, dtype=torch.long)
    expected[0, 0, 16] = torch.tensor([4 * 8 + 2, 1])
    expected[0, 1, 7] = torch.tensor([0, 1])
    assert torch.equal(joints, expected)
    assert joints_array(pts, 8, 8, max_people=6)[0, 2:3, 1].tolist() == [[6 * 8 + 5, 1]]


def test_make_targets_maps_crop_pixel_centres_to_heatmap_pixel_centres():
    # (x + 0.5) / 4 - 0.5: crop x = 41 -> 9.875, y = 22 -> 5.125
    kpts = _points([{9: (41.0, 22.0, 2)}])
    heatmaps, joints = make_targets(kpts, stride=4, heatmap_size=16, sigma=1.5, max_people=3)
    np.testing.assert_allclose(heatmaps[0, 9].numpy(), _gaussian(16, 16, 9.875, 5.125, 1.5), atol=1e-6)
    assert joints[0, 0, 9].tolist() == [5 * 16 + 10, 1]      # round(5.125) = 5, round(9.875) = 10


def test_segmentation_mask_reads_polygons_and_both_rle_forms():
    square = [[2.0, 2.0, 7.0, 2.0, 7.0, 7.0, 2.0, 7.0]]
    m = segmentation_mask(square, 10, 12)
    assert m.shape == (10, 12) and m.dtype == np.uint8
    assert m[3:7, 3:7].all() and not m[0].any() and not m[:, 9:].any()
    # uncompressed RLE, column-major: 0s then 1s; on a 4x3 image, counts [5, 3, 4] = column 1 rows 1-3
    rle = {"counts": [5, 3, 4], "size": [4, 3]}
    expected = np.zeros((4, 3), np.uint8)
    expected[1:4, 1] = 1
    assert np.array_equal(segmentation_mask(rle, 4, 3), expected)
    from pycocotools import mask as mask_utils
    compressed = mask_utils.encode(np.asfortranarray(expected))
    assert np.array_equal(segmentation_mask(compressed, 4, 3), expected)


def test_supervision_mask_zeroes_crowds_and_people_without_keypoints():
    crowd = {"iscrowd": 1, "num_keypoints": 0, "segmentation": {"counts": [0, 2, 18], "size": [4, 5]}}
    nokpt = {"iscrowd": 0, "num_keypoints": 0, "segmentation": [[3.0, 0.0, 5.0, 0.0, 5.0, 4.0, 3.0, 4.0]]}
    person = {"iscrowd": 0, "num_keypoints": 5, "segmentation": [[0.0, 0.0, 5.0, 0.0, 5.0, 4.0, 0.0, 4.0]]}
    m = supervision_mask([crowd, nokpt, person], 4, 5)
    expected = np.ones((4, 5), np.uint8)
    expected[0:2, 0] = 0          # crowd RLE: the first two pixels of column 0
    expected[:, 3:5] = 0          # polygon x in [3, 5]: pixel columns 3 and 4 (pixel i spans [i, i+1))
    assert np.array_equal(m, expected)   # the person with keypoints leaves no hole
