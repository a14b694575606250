"""Test-time resize: sizes, the coordinate maps, and that they match the image warp."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threempose.decode.resize import map_to_input, plan_resize, resize_image


@pytest.mark.parametrize("size", [(640, 480), (427, 640), (512, 512), (1000, 333)])
def test_plan_keeps_aspect_and_pads_to_the_multiple(size):
    info = plan_resize(*size, short_side=512, multiple=32)
    w, h = size
    rw, rh = info.resized_size
    assert min(rw, rh) == 512
    assert abs(rw / rh - w / h) < 1.0 / min(rw, rh)
    iw, ih = info.input_size
    assert iw % 32 == 0 and ih % 32 == 0 and 0 <= iw - rw < 32 and 0 <= ih - rh < 32


def test_point_round_trip_and_affine():
    info = plan_resize(640, 427)
    pts = np.random.default_rng(0).uniform(-0.5, 600, (50, 2))
    np.testing.assert_allclose(info.to_original(info.to_input(pts)), pts, atol=1e-9)
    affine = info.affine_to_original()
    via_affine = (affine @ np.c_[info.to_input(pts), np.ones(50)].T).T
    np.testing.assert_allclose(via_affine, pts, atol=1e-9)
    # corners of the image map to corners of the scaled image
    np.testing.assert_allclose(info.to_input([-0.5, -0.5]), [-0.5, -0.5])
    np.testing.assert_allclose(info.to_input([639.5, 426.5]), np.array(info.resized_size) - 0.5)


def blob(width, height, center, sigma):
    ys, xs = np.mgrid[0:height, 0:width]
    return np.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * sigma**2))


def centroid(img):
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(xs * img).sum(), (ys * img).sum()]) / img.sum()


@pytest.mark.parametrize("size,short", [((300, 200), 512), ((900, 600), 256)])
def test_coordinate_map_matches_the_image_warp(size, short):
    """A blob at a known sub-pixel point lands where to_input says (up- and downscaling)."""
    p = np.array([size[0] * 0.37 + 0.3, size[1] * 0.61 + 0.7])
    image = blob(*size, p, sigma=0.04 * size[1])[..., None] * np.array([1.0, 0.5, 0.25])
    out, info = resize_image(image, short_side=short, multiple=32, pad_value=-1.0)
    rw, rh = info.resized_size
    assert out.shape == (info.input_size[1], info.input_size[0], 3)
    assert (out[rh:] == -1).all() and (out[:, rw:] == -1).all()
    np.testing.assert_allclose(centroid(out[:rh, :rw, 0]), info.to_input(p), atol=0.05)
    np.testing.assert_allclose(out[:rh, :rw, 1], out[:rh, :rw, 0] * 0.5, atol=1e-6)


def test_heatmap_convention_matches_strided_pooling():
    """A map made by stride-4 average pooling of the input has its blob where map_to_input says."""
    p = np.array([57.3, 30.8])
    img = torch.from_numpy(blob(128, 96, p, sigma=6.0)).float()[None, None]
    hm = F.avg_pool2d(img, 4)[0, 0].numpy()
    np.testing.assert_allclose(map_to_input(centroid(hm), 4), p, atol=0.05)
    info = plan_resize(200, 150, short_side=96, multiple=32)     # input 128 x 96
    np.testing.assert_allclose(info.map_to_original(centroid(hm), (32, 24)), info.to_original(p), atol=0.1)
