"""Lazily projected tag maps equal torch's bilinear resampling where they are read."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threempose.decode.projection import ProjectedTags


@pytest.mark.parametrize("src, dst", [((7, 5), (28, 20)), ((8, 6), (19, 13)), ((6, 6), (6, 6)), ((9, 4), (5, 3))])
def test_projected_tags_equal_interpolate(src, dst):
    rng = np.random.default_rng(0)
    maps = rng.normal(0, 3, (3, 2, src[1], src[0])).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(maps), size=(dst[1], dst[0]), mode="bilinear",
                             align_corners=False).numpy()
    tags = ProjectedTags(maps, dst)
    assert tags.shape == expected.shape
    joints = rng.integers(0, 3, 50)
    xs, ys = rng.integers(0, dst[0], 50), rng.integers(0, dst[1], 50)
    np.testing.assert_allclose(tags.at(joints, xs, ys), expected[joints, :, ys, xs], rtol=0, atol=1e-5)
    got = tags.window(np.array([2, 0]), 1, 0, dst[0] - 1, dst[1])
    np.testing.assert_allclose(got, expected[[2, 0], :, :, 1:dst[0] - 1], rtol=0, atol=1e-5)
    if src == dst:                              # no resampling: the maps' own values, exactly
        np.testing.assert_array_equal(tags.window(np.arange(3), 0, 0, *dst), maps)


def test_materialized_tags_read_the_same():
    rng = np.random.default_rng(1)
    maps = rng.normal(0, 3, (2, 1, 6, 5)).astype(np.float32)
    lazy, full = ProjectedTags(maps, (20, 24)), ProjectedTags(maps, (20, 24))
    full.materialize()
    joints, xs, ys = np.array([0, 1, 1]), np.array([0, 7, 19]), np.array([23, 3, 0])
    np.testing.assert_allclose(full.at(joints, xs, ys), lazy.at(joints, xs, ys), rtol=0, atol=1e-5)
    np.testing.assert_allclose(full.window(np.array([1]), 2, 3, 9, 20), lazy.window(np.array([1]), 2, 3, 9, 20),
                               rtol=0, atol=1e-5)
