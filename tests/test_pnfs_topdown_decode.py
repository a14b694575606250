"""Top-down decoding: quarter offset, back to image pixels, flip test, OKS, OKS-NMS, rescoring."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from threempose.data.keypoints import OKS_SIGMAS, flip_index
from threempose.pnfs.topdown_data import box_to_center_size, crop_matrix, crop_to_heatmap, transform_points
from threempose.pnfs.topdown_decode import (
    coco_results, decode_crops, decode_heatmaps, flip_back, oks_nms, oks_similarity, rescore,
)


def _gaussians(centers, height, width, sigma=2.0):
    """``[K, h, w]`` maps, map k a unit Gaussian at ``centers[k] = (x, y)`` (heatmap pixels)."""
    ys, xs = np.mgrid[0:height, 0:width]
    maps = [np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)) for x, y in centers]
    return torch.tensor(np.stack(maps), dtype=torch.float32)


def test_quarter_offset_toward_the_second_peak():
    maps = _gaussians([(10.3, 7.8), (10.7, 7.2), (0.0, 5.0), (6.0, 6.0)], 16, 20)[None]
    coords, maxvals = decode_heatmaps(maps)
    # (10.3, 7.8): peak (10, 8); right and upper neighbours are higher -> (10.25, 7.75).
    # (10.7, 7.2): peak (11, 7); left and lower neighbours are higher -> (10.75, 7.25).
    # (0, 5): on the left border -> no x offset; equal neighbours in y -> no y offset.
    # (6, 6): exactly on a pixel, equal neighbours -> no offset.
    assert coords[0].tolist() == [[10.25, 7.75], [10.75, 7.25], [0.0, 5.0], [6.0, 6.0]]
    assert maxvals[0, 3].item() == pytest.approx(1.0)
    assert maxvals[0, 0].item() == pytest.approx(math.exp(-(0.3 ** 2 + 0.2 ** 2) / 8), rel=1e-6)


@pytest.mark.parametrize("rotation", [0.0, 30.0])
def test_gaussian_at_a_known_image_point_decodes_within_half_a_pixel(rotation):
    center, size = box_to_center_size([100.0, 50.0, 72.0, 96.0], 288 / 384)    # zoom 288 / 90 = 3.2
    matrix = crop_matrix(center, size, 288, 384, rotation=rotation)
    points = np.array([[118.3, 70.7], [150.15, 120.9], [155.0, 85.55], [120.875, 99.125]])  # box centre (136, 98)
    heatmap_xy = crop_to_heatmap(transform_points(points, matrix), 4)
    maps = _gaussians(heatmap_xy, 96, 72, sigma=3.0)
    keypoints = decode_crops(maps[None], matrix[None], stride=4)
    assert keypoints.shape == (1, 4, 3)
    error = np.linalg.norm(keypoints[0, :, :2] - points, axis=1)
    assert error.max() < 0.5          # bound: 0.25 heatmap px * sqrt(2) * 4 / 3.2 = 0.44 px
    assert np.all(keypoints[0, :, 2] > 0.9)


def test_flip_back_is_exact_for_the_crop_convention():
    rng = np.random.default_rng(0)
    joints = rng.uniform([120, 60], [180, 140], size=(17, 2))
    center, size = box_to_center_size([110.0, 50.0, 80.0, 100.0], 192 / 256)
    plain = crop_matrix(center, size, 192, 256)
    mirrored = crop_matrix(center, size, 192, 256, flip=True)
    maps = _gaussians(crop_to_heatmap(transform_points(joints, plain), 4), 64, 48)
    # In the mirrored crop, channel j holds the joint that j's flip partner was.
    flipped_maps = _gaussians(crop_to_heatmap(transform_points(joints[flip_index()], mirrored), 4), 64, 48)
    assert torch.allclose(flip_back(flipped_maps[None])[0], maps, atol=1e-6)
    with pytest.raises(ValueError, match="17"):
        flip_back(torch.zeros(1, 15, 4, 4))


def test_oks_similarity_hand_case():
    rng = np.random.default_rng(1)
    reference = np.concatenate([rng.uniform(0, 100, (17, 2)), np.ones((17, 1))], axis=1)
    other = reference.copy()
    other[5, :2] += [3.0, 4.0]                                     # d^2 = 25 at the left shoulder
    expected = (16 + math.exp(-25 / (2 * 2000.0 * (2 * OKS_SIGMAS[5]) ** 2))) / 17
    assert oks_similarity(reference, other[None], 1000.0, np.array([3000.0]))[0] == pytest.approx(expected)
    assert oks_similarity(reference, reference[None], 1000.0, np.array([1000.0]))[0] == pytest.approx(1.0)
    # With a keypoint threshold only joints confident in both people count: joints 0..4 here.
    other[:, 2] = 0.0
    other[:5, 2] = 0.9
    assert oks_similarity(reference, other[None], 1000.0, np.array([3000.0]), keypoint_threshold=0.2)[0] == 1.0
    other[:, 2] = 0.0
    assert oks_similarity(reference, other[None], 1000.0, np.array([3000.0]), keypoint_threshold=0.2)[0] == 0.0


def test_oks_nms_keeps_one_of_two_near_duplicates():
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.uniform(100, 200, (17, 2)), np.full((17, 1), 0.8)], axis=1)
    a_again = a + np.concatenate([rng.normal(0, 0.5, (17, 2)), np.zeros((17, 1))], axis=1)
    b = a + [300.0, 0.0, 0.0]
    keypoints, scores, areas = np.stack([a, a_again, b]), [0.8, 0.9, 0.5], [10000.0, 10000.0, 10000.0]
    assert oks_similarity(a_again, a[None], 1e4, np.array([1e4]))[0] > 0.9
    assert oks_nms(keypoints, scores, areas, threshold=0.9) == [1, 2]
    assert oks_nms(keypoints, scores, areas, threshold=1.0) == [1, 0, 2]
    with pytest.raises(ValueError, match="must match"):
        oks_nms(keypoints, scores[:2], areas)


def test_rescore_box_times_mean_confident_joint_score():
    keypoints = np.zeros((2, 17, 3))
    keypoints[0, :4, 2] = [0.9, 0.1, 0.5, 0.3]
    assert rescore(keypoints, [0.8, 1.0], 0.2).tolist() == pytest.approx([0.8 * (0.9 + 0.5 + 0.3) / 3, 0.0])


def test_coco_results_entries():
    rng = np.random.default_rng(3)
    keypoints = np.concatenate([rng.uniform(0, 300, (3, 17, 2)), np.full((3, 17, 1), 0.5)], axis=2)
    keypoints[1] = keypoints[0]                                    # duplicate on image 7
    results = coco_results([7, 7, 4], keypoints, [0.9, 0.6, 1.0], [5000.0, 5000.0, 5000.0])
    assert [(r["image_id"], r["score"]) for r in results] == [(7, pytest.approx(0.45)), (4, pytest.approx(0.5))]
    assert results[0]["category_id"] == 1 and len(results[0]["keypoints"]) == 51
    assert results[1]["keypoints"] == keypoints[2].ravel().tolist()
    assert coco_results([], np.zeros((0, 17, 3)), [], []) == []
    with pytest.raises(ValueError, match=r"\[N, 17, 3\]"):
        coco_results([1], np.zeros((1, 16, 3)), [1.0], [1.0])
    with pytest.raises(ValueError, match=r"\[N, K, h, w\]"):
        decode_heatmaps(torch.zeros(17, 4, 4))
