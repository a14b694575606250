"""Quarter-pixel adjustment and refinement of missing joints."""
import numpy as np
import pytest

from threempose.decode.adjust import adjust_people, quarter_offsets, refine_people, refine_windows
from threempose.decode.ideal import render_ideal_outputs


def previous_refine_person(keypoints, joint_tags, heatmaps, tags):
    """The refine this project shipped before windows (HigherHRNet's rule): float64,
    every missing joint searched over the whole map. Kept here as the reference."""
    out = np.array(keypoints, dtype=np.float64)
    detected = out[:, 2] > 0
    missing = np.flatnonzero(~detected)
    if missing.size == 0 or not detected.any():
        return out
    mean_tag = joint_tags[detected].astype(np.float64).mean(axis=0)
    diff = tags[missing].astype(np.float64) - mean_tag[None, :, None, None]
    score = heatmaps[missing] - np.round(np.sqrt((diff * diff).sum(axis=1)))
    _, h, w = heatmaps.shape
    flat = score.reshape(missing.size, h * w).argmax(axis=1)
    ys, xs = flat // w, flat % w
    vals = heatmaps[missing, ys, xs]
    xy = quarter_offsets(heatmaps, missing, xs, ys)
    fill = vals > 0
    out[missing[fill], :2] = xy[fill]
    out[missing[fill], 2] = vals[fill]
    return out


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




def whole_map(num_people, heatmaps):
    _, h, w = heatmaps.shape
    return np.tile(np.array([0, 0, w, h], np.int64), (num_people, 1))


def test_refine_takes_the_peak_whose_tag_matches_the_person():
    num_joints, h, w = 3, 10, 12
    hm = np.zeros((num_joints, h, w), np.float32)
    tags = np.zeros((num_joints, 1, h, w), np.float32)
    hm[2, 2, 2], tags[2, 0, 2, 2] = 0.9, 5.0     # strong peak of another person (tag 5)
    hm[2, 7, 9], tags[2, 0, 7, 9] = 0.3, 1.0     # weaker peak with this person's tag
    hm[2, 7, 10] = 0.1                           # right neighbour larger: x + 0.25
    keypoints = np.array([[[1.25, 1.0, 0.8], [3.0, 4.0, 0.7], [0, 0, 0]]])
    joint_tags = np.array([[[1.1], [0.9], [0.0]]])   # mean of the detected joints: 1.0
    out = refine_people(keypoints, joint_tags, hm, tags, whole_map(1, hm))
    np.testing.assert_allclose(out[0, 2], [9.25, 6.75, 0.3])
    np.testing.assert_array_equal(out[0, :2], keypoints[0, :2])      # detected joints unchanged
    hm[2] = -1.0                                                       # no positive response: stays missing
    out = refine_people(keypoints, joint_tags, hm, tags, whole_map(1, hm))
    np.testing.assert_array_equal(out[0, 2], [0, 0, 0])


def random_people(rng, num_people, num_joints, h, w, dim):
    """Grouped people [P, J, 3 + dim]: integer locations, some joints missing (value 0)."""
    people = np.zeros((num_people, num_joints, 3 + dim), np.float32)
    people[..., 0] = rng.integers(0, w, (num_people, num_joints))
    people[..., 1] = rng.integers(0, h, (num_people, num_joints))
    people[..., 2] = np.where(rng.random((num_people, num_joints)) < 0.6, rng.uniform(0.2, 1, (num_people, num_joints)), 0)
    people[..., 3:] = rng.normal(0, 1.5, (num_people, num_joints, dim))
    people[0, :, 2] = 0.0                       # nobody grouped: nothing to refine
    people[1, :, 2] = 0.5                       # everything grouped: nothing to refine
    return people


@pytest.mark.parametrize("dim", [1, 2])
def test_float32_refine_equals_the_previous_refine_on_the_whole_map(dim):
    # Continuous random maps have no ties, so float32 must pick the same pixels as float64.
    rng = np.random.default_rng(dim)
    num_joints, h, w = 5, 23, 31
    for _ in range(10):
        hm = rng.normal(0.1, 0.3, (num_joints, h, w)).astype(np.float32)
        tg = rng.normal(0, 2, (num_joints, dim, h, w)).astype(np.float32)
        people = random_people(rng, 6, num_joints, h, w, dim)
        keypoints = np.concatenate([people[..., :2], people[..., 2:3]], axis=-1).astype(np.float64)
        got = refine_people(keypoints, people[..., 3:], hm, tg, whole_map(6, hm))
        for p in range(6):
            expected = previous_refine_person(keypoints[p], people[p, :, 3:], hm, tg)
            np.testing.assert_allclose(got[p], expected, rtol=0, atol=1e-3)
        assert (got[..., 2] > 0).sum() > (keypoints[..., 2] > 0).sum()    # something was refined


def test_window_refine_equals_the_previous_refine_on_rendered_people():
    # Weak joints (below the detection threshold), heatmap and tag noise: every joint
    # the previous whole-map refine finds lies at its own person, inside the window.
    rng = np.random.default_rng(0)
    num_people, num_joints, h, w = 5, 17, 64, 120
    found = 0
    for _ in range(4):
        xy = np.stack([rng.uniform(24 * np.arange(num_people)[:, None] + 3, 24 * np.arange(num_people)[:, None] + 20,
                                   (num_people, num_joints)),
                       rng.uniform(3, h - 4, (num_people, num_joints))], axis=-1)
        weak = rng.random((num_people, num_joints)) < 0.3
        amplitude = np.where(weak, rng.uniform(0.03, 0.09, weak.shape), rng.uniform(0.5, 1, weak.shape))
        hm, tg = render_ideal_outputs(xy, (w, h), 2.0 * np.arange(1, num_people + 1), amplitude=amplitude)
        hm += rng.uniform(-0.01, 0.01, hm.shape).astype(np.float32)
        tg = (tg + rng.normal(0, 0.1, tg.shape))[:, None].astype(np.float32)
        people = np.zeros((num_people, num_joints, 4), np.float32)
        people[..., :2] = np.rint(xy)
        people[..., 2] = np.where(weak, 0, amplitude)
        people[..., 3] = np.where(weak, 0, 2.0 * np.arange(1, num_people + 1)[:, None])
        keypoints = np.concatenate([people[..., :2], people[..., 2:3]], axis=-1).astype(np.float64)
        windows = refine_windows(people, (w, h))
        got = refine_people(keypoints, people[..., 3:], hm, tg, windows)
        for p in range(num_people):
            expected = previous_refine_person(keypoints[p], people[p, :, 3:], hm, tg)
            np.testing.assert_allclose(got[p], expected, rtol=0, atol=1e-3)
            assert (got[p, :, 2] > 0).all()                              # every weak joint found
            assert np.abs(got[p, :, :2] - xy[p]).max() < 1.0          # at the right place
        found += weak.sum()
    assert found > 50


def test_refine_does_not_reach_across_the_image():
    # A pixel with the person's tag far outside its window is not taken (the
    # previous whole-map refine took it); the window bounds follow the rule.
    num_joints, h, w = 2, 40, 200
    hm = np.zeros((num_joints, h, w), np.float32)
    tg = np.zeros((num_joints, 1, h, w), np.float32)
    hm[1, 20, 190], tg[1, 0, 20, 190] = 0.6, 3.0
    people = np.zeros((1, num_joints, 4), np.float32)
    people[0, 0] = (10, 20, 0.9, 3.0)
    windows = refine_windows(people, (w, h))
    grow = 0.125 * w                            # one grouped joint: the minimum margin
    np.testing.assert_array_equal(windows[0], [0, 0, 10 + grow + 1, h])
    keypoints = np.concatenate([people[..., :2], people[..., 2:3]], axis=-1).astype(np.float64)
    np.testing.assert_array_equal(refine_people(keypoints, people[..., 3:], hm, tg, windows), keypoints)
    assert previous_refine_person(keypoints[0], people[0, :, 3:], hm, tg)[1, 2] == pytest.approx(0.6)


def test_refine_windows_grow_with_the_person():
    people = np.zeros((2, 3, 4), np.float32)
    people[0, 0], people[0, 2] = (100, 50, 0.5, 0), (140, 60, 0.5, 0)     # box 40 x 10
    windows = refine_windows(people, (400, 300), margin=1.0, min_margin=0.0)
    np.testing.assert_array_equal(windows[0], [60, 10, 181, 101])
    np.testing.assert_array_equal(windows[1], [0, 0, 0, 0])               # no grouped joint
