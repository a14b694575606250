"""Heatmap NMS by max-pooling and deterministic top-k candidates."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threempose.decode import heatmap_nms
from threempose.decode.heatmap_nms import max_pool_same, nms_heatmaps, top_k_candidates, top_k_indices


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_max_pool_equals_torch_max_pool2d(kernel):
    rng = np.random.default_rng(kernel)
    maps = rng.integers(0, 5, (3, 11, 14)).astype(np.float32)     # small integers: many plateaus
    expected = F.max_pool2d(torch.from_numpy(maps)[None], kernel, stride=1, padding=kernel // 2)[0]
    np.testing.assert_array_equal(max_pool_same(maps, kernel), expected.numpy())


def test_nms_keeps_window_maxima_and_one_pixel_per_plateau():
    hm = np.zeros((1, 7, 9), np.float32)
    hm[0, 3, 2] = 1.0          # isolated peak
    hm[0, 3, 3] = 0.6          # its neighbour: suppressed
    hm[0, 1, 7] = hm[0, 1, 8] = 0.8   # a two-pixel plateau: the first (row-major) is kept
    hm[0, 3, 6] = 0.5          # 2 rows below the plateau: a maximum of its 3x3 window, not of 5x5
    out3, out5 = nms_heatmaps(hm, 3)[0], nms_heatmaps(hm, 5)[0]
    assert {tuple(p) for p in np.argwhere(out3 > 0)} == {(3, 2), (1, 7), (3, 6)}
    assert {tuple(p) for p in np.argwhere(out5 > 0)} == {(3, 2), (1, 7)}
    assert out3[3, 2] == 1.0 and out3[1, 7] == 0.8
    with pytest.raises(ValueError, match="odd"):
        nms_heatmaps(hm, 4)


@pytest.mark.parametrize("kernel", [3, 5])
def test_gaussian_centred_between_pixels_gives_one_candidate(kernel):
    ys, xs = np.mgrid[0:16, 0:20]
    hm = np.zeros((3, 16, 20), np.float32)
    for j, (cx, cy) in enumerate([(7.5, 6.0), (7.0, 6.5), (7.5, 6.5)]):    # 2, 2 and 4 equal maxima
        hm[j] = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 1.5 ** 2))
    assert [int((hm[j] == hm[j].max()).sum()) for j in range(3)] == [2, 2, 4]   # real plateaus
    out = nms_heatmaps(hm, kernel)
    for j, first in enumerate([(6, 7), (6, 7), (6, 7)]):
        assert [tuple(p) for p in np.argwhere(out[j] > 0)] == [first]


def test_plateau_rules():
    hm = np.zeros((1, 6, 12), np.float32)
    hm[0, 2, 1:6] = 0.7        # a 5-pixel run, longer than the window: still one candidate
    hm[0, 4, 8] = hm[0, 4, 10] = 0.5   # equal, 2 apart: one plateau for kernel 5, two for kernel 3
    out3, out5 = nms_heatmaps(hm, 3)[0], nms_heatmaps(hm, 5)[0]
    assert {tuple(p) for p in np.argwhere(out3 > 0)} == {(2, 1), (4, 8), (4, 10)}
    assert {tuple(p) for p in np.argwhere(out5 > 0)} == {(2, 1), (4, 8)}
    # The earlier equal pixel is not a window maximum (a larger neighbour): the later one stays.
    hm = np.zeros((1, 3, 9), np.float32)
    hm[0, 1, 0], hm[0, 1, 2], hm[0, 1, 4] = 0.9, 0.5, 0.5
    assert {tuple(p) for p in np.argwhere(nms_heatmaps(hm, 5)[0] > 0)} == {(1, 0), (1, 4)}


def test_large_plateaus_match_the_pairwise_rule(monkeypatch):
    rng = np.random.default_rng(0)
    hm = rng.integers(0, 3, (2, 40, 50)).astype(np.float32)       # huge equal-valued sets
    pairwise = nms_heatmaps(hm, 5)                                 # runs > _SHORT_RUN
    monkeypatch.setattr(heatmap_nms, "_PAIRWISE_RUN", 10)          # force the dense path
    dense = nms_heatmaps(hm, 5)
    monkeypatch.setattr(heatmap_nms, "_SHORT_RUN", 10**6)          # force the vectorised path
    np.testing.assert_array_equal(nms_heatmaps(hm, 5), pairwise)
    np.testing.assert_array_equal(dense, pairwise)
    survivors = (max_pool_same(hm, 5) == hm) & (hm > 0)
    assert 0 < (dense > 0).sum() < survivors.sum()
    for j, y, x in np.argwhere(dense > 0):                          # no two kept pixels share a window
        win = dense[j, max(y - 2, 0):y + 3, max(x - 2, 0):x + 3]
        assert (win == hm[j, y, x]).sum() == 1


def test_top_k_sorts_by_value_then_index():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4, (5, 40)).astype(np.float32)      # heavy ties
    for k in (1, 7, 40, 60):
        got = top_k_indices(values, k)
        for row, idx in zip(values, got):
            expected = sorted(range(row.size), key=lambda i: (-row[i], i))[:k]
            assert idx.tolist() == expected


def test_candidates_carry_their_tags_and_locations():
    num_joints, h, w = 2, 9, 12
    ys, xs = np.mgrid[0:h, 0:w]
    hm = np.zeros((num_joints, h, w), np.float32)
    peaks = {0: [(2, 3, 0.9), (8, 6, 0.5)], 1: [(10, 1, 0.7)]}    # (x, y, value)
    for j, pts in peaks.items():
        for x, y, v in pts:
            hm[j, y, x] = v
    tags = np.stack([xs * 100.0 + ys, -(xs * 100.0 + ys)]).astype(np.float32)   # L = 2
    tags = np.broadcast_to(tags, (num_joints, 2, h, w)).copy()
    c = top_k_candidates(hm, tags, k=3, nms_kernel=3)
    assert c.vals.shape == (2, 3) and c.tags.shape == (2, 3, 2) and c.locs.shape == (2, 3, 2)
    np.testing.assert_array_equal(c.locs[0, :2], [[2, 3], [8, 6]])
    np.testing.assert_allclose(c.vals[0], [0.9, 0.5, 0.0])
    np.testing.assert_array_equal(c.locs[1, 0], [10, 1])
    x, y = c.locs[..., 0], c.locs[..., 1]
    np.testing.assert_array_equal(c.tags[..., 0], x * 100 + y)
    np.testing.assert_array_equal(c.tags[..., 1], -(x * 100 + y))


@pytest.mark.skipif(not heatmap_nms.native_nms_available(), reason="threempose._heatmap_nms not built")
def test_native_top_k_peaks_equal_the_reference():
    rng = np.random.default_rng(5)
    cases = [rng.normal(0, 1, (3, 17, 23)),                      # continuous, negatives
             rng.integers(-1, 3, (3, 17, 23)),                   # plateaus, zeros and negatives
             np.zeros((2, 5, 6)),                                 # nothing but zeros
             -rng.random((2, 5, 6)),                              # only negative survivors
             rng.integers(0, 2, (2, 30, 40)) * 0.5]               # large plateaus
    for maps in cases:
        maps = maps.astype(np.float32)
        for kernel in (1, 3, 5):
            for k in (1, 4, 30, 10_000):
                ref = heatmap_nms.top_k_peaks(maps, k, kernel, "reference")
                nat = heatmap_nms.top_k_peaks(maps, k, kernel, "native")
                np.testing.assert_array_equal(nat[1], ref[1])
                np.testing.assert_array_equal(nat[0], ref[0])
