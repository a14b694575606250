"""Top-down crops: box fix, crop affine by hand, warping, targets, the Dataset, and bad input.

The last test runs the whole evaluation path on the COCO fixture: ground-truth
targets as a perfect prediction -> decode -> OKS-NMS -> COCO results -> pycocotools.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from threempose.data.keypoints import flip_index
from threempose.data.coco_eval import evaluate_keypoints
from threempose.pnfs.topdown_data import (
    TopDownCocoDataset, TopDownConfig, TopDownDataError, box_to_center_size, crop_matrix, crop_to_heatmap,
    heatmap_targets, heatmap_to_crop, invert_matrix, transform_points, warp_crop,
)
from threempose.pnfs.topdown_decode import coco_results, decode_crops

ANNOTATIONS = Path(__file__).parent / "data" / "tiny_person_keypoints.json"
SMALL = TopDownConfig(input_width=192, input_height=256, sigma=2.0)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """The fixture's images: black, with a 7 x 7 white dot on every labelled keypoint."""
    folder = tmp_path_factory.mktemp("images")
    data = json.loads(ANNOTATIONS.read_text())
    for img in data["images"]:
        canvas = Image.new("RGB", (img["width"], img["height"]))
        draw = ImageDraw.Draw(canvas)
        for ann in data["annotations"]:
            if ann["image_id"] == img["id"]:
                for x, y, v in np.reshape(ann["keypoints"], (17, 3)):
                    if v > 0:
                        draw.rectangle([round(x) - 3, round(y) - 3, round(x) + 3, round(y) + 3], fill="white")
        canvas.save(folder / img["file_name"], quality=98)
    return folder


# --------------------------------------------------------------------------- #
# Geometry by hand
# --------------------------------------------------------------------------- #
def test_box_aspect_fix_and_padding():
    center, size = box_to_center_size([10, 20, 30, 40], aspect_ratio=0.75)   # already 3:4
    assert center.tolist() == [25.0, 40.0] and size.tolist() == [37.5, 50.0]
    center, size = box_to_center_size([0, 0, 60, 40], aspect_ratio=0.75)     # too wide: height grows
    assert center.tolist() == [30.0, 20.0] and size.tolist() == [75.0, 100.0]
    _, size = box_to_center_size([0, 0, 10, 40], aspect_ratio=0.75, padding=1.0)  # too tall: width grows
    assert size.tolist() == [30.0, 40.0]


def test_crop_matrix_by_hand():
    center, size = np.array([25.0, 40.0]), np.array([37.5, 50.0])   # 288 / 37.5 = 7.68 crop px per px
    m = crop_matrix(center, size, 288, 384)
    assert np.allclose(transform_points([[25, 40], [35, 40], [25, 30]], m),
                       [[143.5, 191.5], [143.5 + 76.8, 191.5], [143.5, 191.5 - 76.8]])
    # Rotating 90 degrees counter-clockwise on screen: a point right of the centre goes up.
    rotated = crop_matrix(center, size, 288, 384, rotation=90.0)
    assert np.allclose(transform_points([[35, 40]], rotated), [[143.5, 191.5 - 76.8]])
    # Flip mirrors the crop: x -> 287 - x.
    flipped = crop_matrix(center, size, 288, 384, flip=True)
    assert np.allclose(transform_points([[35, 40]], flipped), [[287 - 143.5 - 76.8, 191.5]])
    # Scale augmentation: a 1.3x larger box shows the person smaller.
    assert np.allclose(transform_points([[35, 40]], crop_matrix(center, size * 1.3, 288, 384)),
                       [[143.5 + 76.8 / 1.3, 191.5]])


def test_crop_maps_back_exactly():
    m = crop_matrix([213.7, 150.2], [80.0, 120.0 / 1.5], 192, 256, rotation=-31.0, flip=True)
    points = np.array([[200.25, 140.5], [0.0, 0.0], [639.0, 479.0]])
    assert np.allclose(transform_points(transform_points(points, m), invert_matrix(m)), points, atol=1e-9)


def test_heatmap_convention():
    # Heatmap cell u is the centre of crop pixels 4u .. 4u + 3.
    assert crop_to_heatmap([1.5, 5.5, -0.5], 4).tolist() == [0.0, 1.0, -0.5]
    assert heatmap_to_crop(crop_to_heatmap([17.25], 4), 4).tolist() == [17.25]


def test_warp_places_image_pixels_where_the_matrix_says():
    image = Image.new("RGB", (64, 48))
    image.putpixel((20, 30), (255, 255, 255))
    # Crop 12 x 16 (centre (5.5, 7.5)) around (20.5, 30.5) at zoom 1: (20, 30) -> (5, 7).
    m = crop_matrix([20.5, 30.5], [12.0, 16.0], 12, 16)
    crop = warp_crop(image, m, 12, 16)
    assert crop.shape == (16, 12, 3)
    assert crop[7, 5].tolist() == [255, 255, 255] and crop.sum() == 3 * 255
    # Rotated 90 degrees: the offset (-0.5, -0.5) becomes (-0.5, +0.5): (20, 30) -> (5, 8).
    crop = warp_crop(image, crop_matrix([20.5, 30.5], [12.0, 16.0], 12, 16, rotation=90.0), 12, 16)
    assert crop[8, 5].min() >= 250 and crop.sum() - crop[8, 5].sum() <= 6   # cos(90 deg) ~ 6e-17


def test_heatmap_targets_and_weights():
    joints = np.zeros((17, 3))
    joints[0] = [4 * 5 + 1.5, 4 * 6 + 1.5, 2]        # heatmap (5, 6) exactly
    joints[1] = [30.0, 40.0, 1]                        # labelled but occluded: still a target
    joints[2] = [30.0, 40.0, 0]                        # not labelled
    joints[3] = [500.0, 40.0, 2]                       # outside the 192-wide crop
    target, weight = heatmap_targets(joints, SMALL)
    assert target.shape == (17, 64, 48) and weight.shape == (17,)
    assert weight[:5].tolist() == [1, 1, 0, 0, 0]
    assert target[0, 6, 5].item() == pytest.approx(1.0)
    assert target[0, 6, 6].item() == pytest.approx(math.exp(-1 / (2 * 2.0 ** 2)))
    assert target[0].argmax().item() == 6 * 48 + 5
    assert target[2:].abs().sum().item() == 0.0


def test_config_checks():
    with pytest.raises(ValueError, match="input_width"):
        TopDownConfig(input_width=190)
    with pytest.raises(ValueError, match="scale_min"):
        TopDownConfig(scale_min=1.4)
    assert TopDownConfig().heatmap_size == (96, 72)


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #
def _gt_people():
    data = json.loads(ANNOTATIONS.read_text())
    return [a for a in data["annotations"] if not a["iscrowd"] and any(v > 0 for v in a["keypoints"][2::3])]


def _bright(sample, joint_xy):
    """Whether the normalised crop is white-ish at a crop position."""
    x, y = (int(round(float(v))) for v in joint_xy[:2])
    return sample["image"][:, y, x].min().item() > 1.0     # white is ~2.2 after normalisation, black ~-2


def test_eval_samples_from_gt_boxes(image_dir):
    data = TopDownCocoDataset(ANNOTATIONS, image_dir, SMALL, train=False)
    people = _gt_people()
    assert len(data) == len(people) == 5
    for sample, ann in zip(data, people):
        keypoints = np.reshape(ann["keypoints"], (17, 3))
        assert sample["image"].shape == (3, 256, 192) and sample["target"].shape == (17, 64, 48)
        assert sample["image_id"] == ann["image_id"] and sample["box_score"] == 1.0
        assert not sample["flipped"]
        center, size = box_to_center_size(ann["bbox"], 192 / 256, 1.25)
        assert sample["area"] == pytest.approx(size[0] * size[1])
        assert np.allclose(sample["joints"][:, :2].numpy(),
                           transform_points(keypoints[:, :2], crop_matrix(center, size, 192, 256)), atol=1e-4)
        labelled = keypoints[:, 2] > 0
        assert sample["target_weight"].numpy().tolist() == labelled.astype(float).tolist()
        for joint in np.flatnonzero(labelled):
            assert _bright(sample, sample["joints"][joint])


def test_train_augmentation_is_seeded_and_flip_renames_joints(image_dir):
    cfg = TopDownConfig(input_width=192, input_height=256, sigma=2.0)
    data = TopDownCocoDataset(ANNOTATIONS, image_dir, cfg, train=True, seed=3)
    people = _gt_people()
    flips, rotations = set(), []
    for epoch in range(3):
        data.set_epoch(epoch)
        for index in range(len(data)):
            sample = data[index]
            keypoints = np.reshape(people[index]["keypoints"], (17, 3))
            moved = transform_points(keypoints[:, :2], sample["matrix"].numpy())
            if sample["flipped"]:
                moved = moved[flip_index()]                    # the left wrist is now called right
            assert np.allclose(sample["joints"][:, :2].numpy(), moved, atol=1e-4)
            inside = ((moved >= 0) & (moved <= [191, 255])).all(1) & (sample["joints"][:, 2].numpy() > 0)
            assert all(_bright(sample, sample["joints"][j]) for j in np.flatnonzero(inside))
            m = sample["matrix"].numpy()
            det = np.linalg.det(m[:, :2])
            flips.add(bool(sample["flipped"]))
            assert (det < 0) == bool(sample["flipped"])
            rotations.append(math.degrees(math.atan2(m[0, 1], m[0, 0] if det > 0 else -m[0, 0])))
    assert flips == {True, False}
    assert max(abs(r) for r in rotations) <= 45.0 + 1e-6 and np.ptp(rotations) > 20
    data.set_epoch(1)
    again = TopDownCocoDataset(ANNOTATIONS, image_dir, cfg, train=True, seed=3)
    again.set_epoch(1)
    assert torch.equal(data[2]["matrix"], again[2]["matrix"])
    again.set_epoch(2)
    assert not torch.equal(data[2]["matrix"], again[2]["matrix"])
    # EpochSampler's (index, epoch) keys draw that epoch's augmentation, whatever set_epoch says.
    assert torch.equal(again[(2, 1)]["matrix"], data[2]["matrix"]) and again.epoch == 2


def test_detection_boxes(image_dir, tmp_path):
    detections = tmp_path / "dets.json"
    detections.write_text(json.dumps([
        {"image_id": 1, "category_id": 1, "bbox": [130.0, 55.0, 140.0, 330.0], "score": 0.9},
        {"image_id": 3, "category_id": 1, "bbox": [120.0, 115.0, 60.0, 140.0], "score": 0.3},
        {"image_id": 3, "category_id": 1, "bbox": [300.0, 100.0, 20.0, 20.0], "score": 0.05},
        {"image_id": 2, "category_id": 2, "bbox": [10.0, 10.0, 50.0, 50.0], "score": 0.99},  # not a person
    ]))
    cfg = TopDownConfig(input_width=192, input_height=256, detection_threshold=0.1)
    data = TopDownCocoDataset(ANNOTATIONS, image_dir, cfg, train=False, detections=detections)
    assert [(s["image_id"], s["box_score"]) for s in data] == [(1, 0.9), (3, 0.3)]
    assert data[0]["target_weight"].sum().item() == 0.0


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def test_bad_files_name_the_file(image_dir, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TopDownCocoDataset(missing, image_dir, SMALL)
    with pytest.raises(FileNotFoundError, match="no_images"):
        TopDownCocoDataset(ANNOTATIONS, tmp_path / "no_images", SMALL)

    data = json.loads(ANNOTATIONS.read_text())
    instances = dict(data, categories=[{"id": 1, "name": "person"}])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    with pytest.raises(TopDownDataError, match="instances.json.*person-keypoints"):
        TopDownCocoDataset(path, image_dir, SMALL)

    no_box = json.loads(ANNOTATIONS.read_text())
    del no_box["annotations"][1]["bbox"]
    path = tmp_path / "no_box.json"
    path.write_text(json.dumps(no_box))
    with pytest.raises(TopDownDataError, match=r"no_box.json: annotations\[1\] \(id 2\).*bbox"):
        TopDownCocoDataset(path, image_dir, SMALL)

    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(TopDownDataError, match="broken.json.*not valid JSON"):
        TopDownCocoDataset(path, image_dir, SMALL)

    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 99, "category_id": 1, "bbox": [0, 0, 9, 9], "score": 1}]))
    with pytest.raises(TopDownDataError, match="dets.json: entry 0: image_id 99"):
        TopDownCocoDataset(ANNOTATIONS, image_dir, SMALL, train=False, detections=dets)
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 9, 9], "score": "high"}]))
    with pytest.raises(TopDownDataError, match="dets.json: entry 0: 'score' must be a number"):
        TopDownCocoDataset(ANNOTATIONS, image_dir, SMALL, train=False, detections=dets)
    dets.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 9, 9]}]))
    with pytest.raises(TopDownDataError, match="dets.json: entry 0 lacks"):
        TopDownCocoDataset(ANNOTATIONS, image_dir, SMALL, train=False, detections=dets)
    with pytest.raises(ValueError, match="train=False"):
        TopDownCocoDataset(ANNOTATIONS, image_dir, SMALL, train=True, detections=dets)

    with pytest.raises(TopDownDataError, match="tiny_person_keypoints.json: no usable person box"):
        TopDownCocoDataset(ANNOTATIONS, image_dir, TopDownConfig(min_keypoints=18))

    empty = tmp_path / "empty_images"
    empty.mkdir()
    data = TopDownCocoDataset(ANNOTATIONS, empty, SMALL)
    with pytest.raises(FileNotFoundError, match="000001.jpg"):
        data[0]


# --------------------------------------------------------------------------- #
# The whole evaluation path on the fixture
# --------------------------------------------------------------------------- #
def test_perfect_score_maps_decode_to_the_ground_truth_and_score_ap_1(image_dir):
    data = TopDownCocoDataset(ANNOTATIONS, image_dir, SMALL, train=False)
    samples = [data[i] for i in range(len(data))]
    scores = torch.stack([s["target"] for s in samples])
    matrices = np.stack([s["matrix"].numpy() for s in samples])
    keypoints = decode_crops(scores, matrices, SMALL.heatmap_stride)
    people = _gt_people()
    for decoded, ann, sample in zip(keypoints, people, samples):
        gt = np.reshape(ann["keypoints"], (17, 3))
        zoom = abs(np.linalg.det(sample["matrix"].numpy()[:, :2])) ** 0.5
        labelled = gt[:, 2] > 0
        error = np.abs(decoded[labelled, :2] - gt[labelled, :2])
        assert error.max() <= 0.25 * SMALL.heatmap_stride / zoom + 1e-6     # quarter-offset bound per axis
        assert np.allclose(decoded[labelled, 2], 1.0, atol=0.05)
    # A duplicate of person 0 at a lower box score is removed by OKS-NMS.
    image_ids = [s["image_id"] for s in samples] + [samples[0]["image_id"]]
    keypoints = np.concatenate([keypoints, keypoints[:1]])
    results = coco_results(image_ids, keypoints, [1.0] * len(samples) + [0.5],
                           [s["area"] for s in samples] + [samples[0]["area"]])
    assert len(results) == len(samples)
    stats = evaluate_keypoints(ANNOTATIONS, results)
    assert stats["AP"] > 0.95 and stats["AR"] > 0.95
