"""Augmentation semantics (thesis §4.1) and the CPU / GPU-side paths agreeing on the same draw."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from threempose.config import AugmentConfig, DataConfig
from threempose.data.augment import (IMAGENET_MEAN, IMAGENET_STD, Affine, center_affine, draw_affine,
                                     make_affine, normalize, transform_keypoints, warp_image)
from threempose.data.augment_gpu import _warp, augment_batch, collate_raw
from threempose.data.coco import CocoKeypoints
from threempose.data.keypoints import flip_index
from threempose.data.synthetic import generate

L_WRIST, R_WRIST = 9, 10


def _apply(affine: Affine, x: float, y: float) -> np.ndarray:
    return affine.matrix @ np.array([x, y, 1.0])


def _params(affine: Affine, width: int, height: int, input_size: int):
    """(scale, rotation degrees, (tx, ty), flipped) recovered from the matrix."""
    lin = affine.matrix[:, :2]
    det = np.linalg.det(lin)
    zoom = math.sqrt(abs(det))
    if det < 0:
        lin = lin @ np.diag([-1.0, 1.0])
    rotation = math.degrees(math.atan2(lin[0, 1], lin[0, 0]))
    t = _apply(affine, (width - 1) / 2, (height - 1) / 2) - (input_size - 1) / 2
    return zoom * min(width, height) / input_size, rotation, t, det < 0


def _keypoint(x, y, joint=L_WRIST):
    kp = torch.zeros(1, 1, 17, 3, dtype=torch.float64)
    kp[0, 0, joint] = torch.tensor([x, y, 2.0])
    return kp


def test_affine_matches_the_closed_form():
    # 200x100 source, 50 crop: zoom = scale * 50 / 100; source centre (99.5, 49.5) -> (24.5 + tx, 24.5 + ty)
    a = make_affine(200, 100, 50, scale=2.0, rotation=90.0, translation=(3.0, -4.0))
    np.testing.assert_allclose(_apply(a, 99.5, 49.5), [27.5, 20.5], atol=1e-12)
    # 20 px to the right at zoom 1, rotated 90 degrees counter-clockwise on screen: 20 px up
    np.testing.assert_allclose(_apply(a, 119.5, 49.5), [27.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(_apply(a, 99.5, 59.5), [37.5, 20.5], atol=1e-12)   # down -> right
    assert not a.flipped


def test_center_affine_fits_the_short_side_and_centres():
    a = center_affine(200, 100, 64)
    # the image's continuous extent [-0.5, 99.5] in y fills the crop's [-0.5, 63.5]
    np.testing.assert_allclose(_apply(a, 99.5, -0.5), [31.5, -0.5], atol=1e-12)
    np.testing.assert_allclose(_apply(a, 99.5, 99.5), [31.5, 63.5], atol=1e-12)
    np.testing.assert_allclose(_apply(a, -0.5, 49.5), [31.5 - 64, 31.5], atol=1e-12)   # long side cropped


def test_flip_mirrors_and_swaps_left_and_right():
    a = make_affine(100, 80, 80, flip=True)                   # zoom 1, centred
    assert a.flipped
    np.testing.assert_allclose(_apply(a, 10, 30), _apply(make_affine(100, 80, 80), 89, 30), atol=1e-12)
    out = transform_keypoints(_keypoint(10.0, 30.0), torch.from_numpy(a.matrix)[None], torch.tensor([True]))
    assert out[0, 0, L_WRIST, 2] == 0                          # the left wrist became a right wrist
    np.testing.assert_allclose(out[0, 0, R_WRIST].numpy(), [*_apply(a, 10, 30), 2.0], atol=1e-12)
    perm = flip_index()
    assert all(perm[perm[j]] == j for j in range(17)) and perm[5] == 6 and perm[0] == 0
    # the image is mirrored too: a white pixel lands exactly where its keypoint goes
    img = np.zeros((80, 100, 3), np.uint8)
    img[30, 10] = 255
    warped = warp_image(Image.fromarray(img), a.matrix, 80)
    x, y = _apply(a, 10, 30)
    assert warped[int(round(y)), int(round(x))].tolist() == [255, 255, 255] and warped.sum() == 3 * 255


@pytest.mark.parametrize("make_rng", [np.random.default_rng, lambda s: torch.Generator().manual_seed(s)])
def test_draw_affine_covers_the_configured_ranges(make_rng):
    cfg = AugmentConfig()
    rng = make_rng(0)
    params = [_params(draw_affine(rng, 300, 200, 128, cfg), 300, 200, 128) for _ in range(400)]
    scale, rot, t, flip = (np.array([p[i] for p in params], dtype=object) for i in range(4))
    scale, rot, flip = scale.astype(float), rot.astype(float), flip.astype(bool)
    t = np.stack(t)
    assert 0.75 <= scale.min() < 0.78 and 1.22 < scale.max() <= 1.25
    assert -30 <= rot.min() < -28 and 28 < rot.max() <= 30
    assert -40 <= t.min() < -38 and 38 < t.max() <= 40
    assert 0.4 < flip.mean() < 0.6
    same = draw_affine(make_rng(7), 300, 200, 128, cfg)
    assert np.array_equal(same.matrix, draw_affine(make_rng(7), 300, 200, 128, cfg).matrix)
    no_flip = dataclasses.replace(cfg, flip=False)
    assert not any(draw_affine(rng, 300, 200, 128, no_flip).flipped for _ in range(50))


def _dot_image(width, height, x, y, radius=3):
    img = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(img).ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255))
    return img


def _centroid(gray: np.ndarray) -> np.ndarray:
    v, u = np.mgrid[0:gray.shape[0], 0:gray.shape[1]]
    return np.array([(u * gray).sum(), (v * gray).sum()]) / gray.sum()


def test_keypoints_follow_the_drawn_joint_through_both_warps():
    cfg = AugmentConfig(scale_min=1.0, scale_max=1.6, translation=8.0)
    img = _dot_image(120, 90, 52, 38)
    rng = np.random.default_rng(3)
    for _ in range(8):
        a = draw_affine(rng, 120, 90, 64, cfg)
        kp = transform_keypoints(_keypoint(52.0, 38.0), torch.from_numpy(a.matrix)[None],
                                 torch.tensor([a.flipped]))[0, 0]
        where = kp[R_WRIST if a.flipped else L_WRIST, :2].numpy()
        cpu = warp_image(img, a.matrix, 64)[..., 0].astype(float)
        src = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
        gpu = _warp(src, torch.tensor([[120, 90]]), torch.from_numpy(a.matrix)[None], 64)[0, 0].numpy()
        np.testing.assert_allclose(_centroid(cpu), where, atol=0.2)
        np.testing.assert_allclose(_centroid(gpu), where, atol=0.2)


def test_normalize_uses_the_imagenet_statistics():
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    out = normalize(torch.cat([mean, mean + std], dim=2).expand(3, 2, 2))
    np.testing.assert_allclose(out[:, :, 0].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 1].numpy(), 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out / "images", generate(out, 6, seed=0, min_size=96, max_size=160, max_people=3)


@pytest.mark.parametrize("train", [True, False])
def test_cpu_and_gpu_side_paths_agree_on_the_same_draw(synthetic_set, train):
    cfg = DataConfig(input_size=96, heatmap_stride=4, sigma=2.0, max_people=5)
    cpu = CocoKeypoints(*synthetic_set, cfg, train=train, seed=11)
    raw = CocoKeypoints(*synthetic_set, cfg, train=train, seed=11, raw=True)
    keys = [(i, epoch) for epoch in range(2) for i in range(len(cpu))]
    ref = [cpu[k] for k in keys]
    got = augment_batch(collate_raw([raw[k] for k in keys]), cfg, "cpu")   # the GPU path, on the CPU device
    flips = torch.stack([s["flipped"] for s in ref])
    assert (0 < flips.sum() < len(keys)) if train else not flips.any()
    for key in ("heatmaps", "joints", "affine", "flipped", "image_id"):
        assert torch.equal(torch.stack([s[key] for s in ref]), got[key]), key
    assert torch.stack([s["joints"][..., 1] for s in ref]).sum() > 20          # real targets compared
    # images: Pillow rounds to uint8, so pixel values differ by at most one grey level
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    diff = (torch.stack([s["image"] for s in ref]) - got["image"]).abs() * std
    assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.5
    masks = torch.stack([s["mask"] for s in ref])
    assert (masks != got["mask"]).float().mean() <= 0.005 and 0 < masks.mean() < 1
