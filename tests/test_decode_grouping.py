"""Tag grouping: the canonical assignment, the reference algorithm, and C++ == reference."""
import itertools
import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from threempose.decode import grouping
from threempose.decode.grouping import (COCO_JOINT_ORDER, GroupingParams, canonical_assignment,
                                        group_people, group_reference, native_available)

needs_native = pytest.mark.skipif(not native_available(),
                                  reason="threempose._grouping not built (pip install -e . with a C++17 compiler)")


def brute_force_assignment(cost: np.ndarray, rank=None) -> np.ndarray:
    """Minimum-cost assignment with the lexicographically smallest rank vector (dummy
    columns ranked last, all alike), by enumerating every permutation."""
    n, m = cost.shape
    size = max(n, m)
    rank = np.tile(np.arange(m), (n, 1)) if rank is None else rank
    square = np.zeros((size, size), dtype=np.int64)
    square[:n, :m] = cost
    best = min((sum(square[i, perm[i]] for i in range(size)),
                tuple(rank[i, perm[i]] if perm[i] < m else m for i in range(n)), perm[:n])
               for perm in itertools.permutations(range(size)))
    best = (best[0], best[2])
    out = np.array(best[1], dtype=np.int64)
    out[out >= m] = -1
    return out


def solvers():
    yield canonical_assignment
    if native_available():
        yield grouping.native_canonical_assignment


# --------------------------------------------------------------------------- #
# The assignment and its tie rule
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("solver", list(solvers()), ids=lambda f: f.__name__)
def test_assignment_is_the_lexicographically_smallest_optimum(solver):
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, m = rng.integers(1, 6, size=2)
        cost = rng.integers(-2, 3, size=(n, m)).astype(np.int64)   # few values: many ties
        if trial % 2:         # lowest column first
            assert np.array_equal(solver(cost), brute_force_assignment(cost)), cost
        else:                 # each row's own preference order
            rank = np.argsort(rng.random((n, m)), axis=1).astype(np.int64)
            assert np.array_equal(solver(cost, rank), brute_force_assignment(cost, rank)), (cost, rank)


def test_preference_ranks_order_by_distance_then_index():
    dist = np.array([[2.0, 0.5, 2.0, 0.1], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(grouping.preference_ranks(dist), [[2, 1, 3, 0], [0, 1, 2, 3]])


@pytest.mark.parametrize("solver", list(solvers()), ids=lambda f: f.__name__)
def test_assignment_is_optimal_on_large_problems(solver):
    rng = np.random.default_rng(1)
    for n, m in [(30, 30), (30, 7), (5, 30), (30, 1)]:
        cost = (rng.integers(0, 4, size=(n, m)) * 100 * 2**20 - rng.integers(0, 2**20, size=(n, 1))).astype(np.int64)
        got = solver(cost)
        rows, cols = linear_sum_assignment(cost.astype(np.float64))
        assigned = got >= 0
        assert assigned.sum() == min(n, m) and len(set(got[assigned])) == assigned.sum()
        assert cost[np.flatnonzero(assigned), got[assigned]].sum() == cost[rows, cols].sum()


def test_assignment_rejects_bad_costs():
    with pytest.raises(ValueError, match="int64"):
        canonical_assignment(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="2\\*\\*44"):
        canonical_assignment(np.full((2, 2), 2**50, dtype=np.int64))
    with pytest.raises(ValueError, match="permutations"):
        canonical_assignment(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64))


# --------------------------------------------------------------------------- #
# The reference grouping on hand-made inputs
# --------------------------------------------------------------------------- #
def candidates(per_joint, k=3, dim=1):
    """[(val, tag, x, y), ...] per joint -> vals [J,K], tags [J,K,L], locs [J,K,2] (zero padded)."""
    j = len(per_joint)
    vals = np.zeros((j, k), np.float32)
    tags = np.zeros((j, k, dim), np.float32)
    locs = np.zeros((j, k, 2), np.float32)
    for a, cands in enumerate(per_joint):
        for b, (v, t, x, y) in enumerate(cands):
            vals[a, b], tags[a, b], locs[a, b] = v, t, (x, y)
    return vals, tags, locs


def test_reference_groups_a_hand_made_example():
    vals, tags, locs = candidates([
        [(0.9, 0.0, 1, 1), (0.8, 5.0, 2, 2), (0.05, 9.0, 3, 3)],    # 3rd below threshold
        [(0.7, 5.2, 4, 4), (0.6, 0.1, 5, 5), (0.5, 20.0, 6, 6)],    # B, A, new person C
        [(0.9, 2.6, 7, 7)],             # nearest B (2.5 -> rounds to 2) but >= tag_threshold: new D
    ])
    params = GroupingParams(joint_order=(0, 1, 2))
    people = group_reference(vals, tags, locs, params)
    expected = np.zeros((4, 3, 4), np.float32)
    expected[0, 0], expected[0, 1] = (1, 1, 0.9, 0.0), (5, 5, 0.6, 0.1)
    expected[1, 0], expected[1, 1] = (2, 2, 0.8, 5.0), (4, 4, 0.7, 5.2)
    expected[2, 1] = (6, 6, 0.5, 20.0)
    expected[3, 2] = (7, 7, 0.9, 2.6)
    np.testing.assert_array_equal(people, expected)


def test_exact_tag_ties_follow_the_lexicographic_rule():
    # Two people with the same tag (HigherHRNet's tag-keyed dict would merge them);
    # the next joint's two candidates tie exactly: candidate 0 -> person 0.
    vals, tags, locs = candidates([[(0.9, 1.0, 0, 0), (0.9, 1.0, 9, 9)],
                                   [(0.5, 1.0, 1, 1), (0.5, 1.0, 8, 8)]], k=2)
    people = group_reference(vals, tags, locs, GroupingParams(joint_order=(0, 1)))
    assert people.shape == (2, 2, 4)
    np.testing.assert_array_equal(people[:, 1, :2], [[1, 1], [8, 8]])


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_the_strongest_candidate_takes_its_own_person_among_equal_costs(backend):
    if backend == "native" and not native_available():
        pytest.skip("threempose._grouping not built")
    # People 0 (tag 4) and 1 (tag 0). Candidate A (tag 0) belongs to person 1, X (tag -6)
    # to nobody. Rounded costs tie: A->1, X->0 costs 0 + 1000 and A->0, X->1 400 + 600.
    vals, tags, locs = candidates([[(0.9, 4.0, 0, 0), (0.8, 0.0, 5, 5)],
                                   [(0.9, 0.0, 6, 6), (0.8, -6.0, 9, 9)]], k=2)
    nearest = group_people(vals, tags, locs, GroupingParams(joint_order=(0, 1)), backend)
    assert nearest.shape[0] == 3
    np.testing.assert_array_equal(nearest[1, 1, :2], [6, 6])          # A joined its person
    lowest = group_people(vals, tags, locs, GroupingParams(joint_order=(0, 1), tie_rule="lowest_index"), backend)
    assert lowest.shape[0] == 4 and not lowest[1, 1].any()            # A went to person 0, was rejected


def test_candidates_are_taken_strongest_first():
    # Same candidates in another order: the same people (rows are sorted by value).
    per_joint = [[(0.9, 4.0, 0, 0), (0.8, 0.0, 5, 5)], [(0.8, -6.0, 9, 9), (0.9, 0.0, 6, 6)]]
    shuffled = group_reference(*candidates(per_joint, k=2), GroupingParams(joint_order=(0, 1)))
    per_joint[1] = per_joint[1][::-1]
    np.testing.assert_array_equal(shuffled, group_reference(*candidates(per_joint, k=2),
                                                            GroupingParams(joint_order=(0, 1))))


def test_max_people_and_ignore_too_much():
    first = [(0.9, float(t), t, 0) for t in range(0, 9, 3)]        # 3 people, tags 0, 3, 6
    second = [(0.9, 6.0, 0, 1), (0.9, 0.0, 0, 2)]
    vals, tags, locs = candidates([first, second])
    order = (0, 1)
    # max_people=2: only people 0 and 1 are matched; the tag-6 candidate starts a 4th person.
    people = group_reference(vals, tags, locs, GroupingParams(max_people=2, joint_order=order))
    assert people.shape[0] == 4 and people[3, 1, 3] == 6.0 and people[0, 1, 3] == 0.0
    # ignore_too_much: with 2 people already (== max_people) joint 1 is skipped entirely.
    people = group_reference(vals, tags, locs, GroupingParams(max_people=2, ignore_too_much=True,
                                                              joint_order=order))
    assert people.shape[0] == 3 and not people[:, 1].any()


def test_coco_joint_order_is_higherhrnets():
    assert COCO_JOINT_ORDER == tuple(i - 1 for i in [1, 2, 3, 4, 5, 6, 7, 12, 13, 8, 9, 10, 11, 14, 15, 16, 17])
    assert list(GroupingParams().resolve_joint_order(17)) == list(COCO_JOINT_ORDER)
    assert list(GroupingParams().resolve_joint_order(5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="permutation"):
        GroupingParams(joint_order=(0, 0, 1)).resolve_joint_order(3)


def test_bad_inputs_are_clear_errors():
    vals, tags, locs = candidates([[(0.9, 0.0, 1, 1)]])
    with pytest.raises(ValueError, match="locs must be"):
        group_reference(vals, tags, locs[:, :, :1])
    with pytest.raises(ValueError, match="NaN"):
        group_reference(vals, tags * np.nan, locs, GroupingParams(joint_order=(0,)))
    with pytest.raises(ValueError, match="detection_threshold"):
        GroupingParams(detection_threshold=-1.0)
    with pytest.raises(ValueError, match="tie_rule"):
        GroupingParams(tie_rule="first")


# --------------------------------------------------------------------------- #
# C++ == reference
# --------------------------------------------------------------------------- #
def people_candidates(rng, num_people, num_joints=17, k=30, dim=2, tag_noise=0.05, spacing=2.0,
                      false_positives=3):
    """Candidates as a network would give them: per joint, one per person (value in [0.2, 1],
    tag = person tag + noise), a few false positives, then low-value filler; sorted by value."""
    person_tags = rng.permutation(num_people)[:, None] * spacing + rng.normal(0, 0.1, (num_people, dim))
    vals = rng.uniform(0.0, 0.1, (num_joints, k))
    tags = rng.normal(0, 3, (num_joints, k, dim))
    locs = rng.integers(0, 128, (num_joints, k, 2)).astype(np.float32)
    for j in range(num_joints):
        present = rng.random(num_people) < 0.9
        n = min(int(present.sum()), k)
        vals[j, :n] = rng.uniform(0.2, 1.0, n)
        tags[j, :n] = person_tags[present][:n] + rng.normal(0, tag_noise, (n, dim))
        fp = min(false_positives, k - n)
        vals[j, n:n + fp] = rng.uniform(0.1, 0.3, fp)
        order = np.argsort(-vals[j], kind="stable")
        vals[j], tags[j], locs[j] = vals[j][order], tags[j][order], locs[j][order]
    return vals.astype(np.float32), tags.astype(np.float32), locs


def assert_same_people(vals, tags, locs, params=GroupingParams()):
    ref = group_people(vals, tags, locs, params, backend="reference")
    nat = group_people(vals, tags, locs, params, backend="native")
    assert ref.shape == nat.shape
    assert np.array_equal(ref[..., 2] > 0, nat[..., 2] > 0)      # same joints
    np.testing.assert_allclose(nat, ref, rtol=0, atol=1e-6)       # same scores, coords, tags
    return ref


@needs_native
def test_native_equals_reference_on_random_inputs():
    rng = np.random.default_rng(2)
    for trial in range(150):
        params = GroupingParams(use_detection_val=bool(trial % 2), ignore_too_much=trial % 3 == 0,
                                max_people=int(rng.integers(1, 31)), tag_threshold=float(rng.uniform(0.5, 2)),
                                tie_rule="nearest" if trial % 5 else "lowest_index")
        dim = int(rng.integers(1, 3))
        if trial % 4 == 0:   # unstructured: values and quantised tags, many ties
            vals = rng.random((17, 30)).astype(np.float32)
            tags = (rng.integers(0, 6, (17, 30, dim)) * 0.5).astype(np.float32)
            locs = rng.integers(0, 64, (17, 30, 2)).astype(np.float32)
        else:
            vals, tags, locs = people_candidates(rng, int(rng.integers(1, 16)), dim=dim,
                                                 tag_noise=float(rng.uniform(0.01, 0.6)))
        assert_same_people(vals, tags, locs, params)


@needs_native
def test_native_equals_reference_on_edge_cases():
    rng = np.random.default_rng(3)
    empty = assert_same_people(np.zeros((17, 0), np.float32), np.zeros((17, 0, 1), np.float32),
                               np.zeros((17, 0, 2), np.float32))
    assert empty.shape == (0, 17, 4)

    vals, tags, locs = people_candidates(rng, 5)
    vals[7] = 0.0                                         # one joint type (left hip) missing
    people = assert_same_people(vals, tags, locs)
    assert people.shape[0] >= 5 and not people[:, 7].any()

    ties_v = np.full((17, 4), 0.5, np.float32)            # exact ties in values and tags
    ties_t = np.tile(np.array([0.0, 0.0, 3.0, 3.0], np.float32)[None, :, None], (17, 1, 1))
    ties_l = np.tile(np.arange(4, dtype=np.float32)[None, :, None], (17, 1, 2))
    people = assert_same_people(ties_v, ties_t, ties_l)
    assert people.shape[0] == 4 and (people[..., 2] > 0).all()
    for p in range(4):   # the lexicographic rule keeps candidate p with person p at every joint
        np.testing.assert_array_equal(people[p, :, 0], p)

    vals, tags, locs = people_candidates(rng, 30, tag_noise=0.02, false_positives=0)
    vals[:, :] = np.where(vals > 0.2, vals, 0.0)          # exactly 30 people, no clutter
    people = assert_same_people(vals, tags, locs)
    assert people.shape[0] == 30
    spread = np.ptp(np.where(people[..., 2:3] > 0, people[..., 3:], np.nan), axis=1)
    assert np.nanmax(spread) < 0.2                        # every person holds one tag value

    far = (np.arange(17 * 30, dtype=np.float32).reshape(17, 30, 1)) * 1000.0   # tags far apart
    people = assert_same_people(np.full((17, 30), 0.9, np.float32), far, locs)
    assert people.shape[0] == 17 * 30 and ((people[..., 2] > 0).sum(axis=1) == 1).all()

    below = assert_same_people(rng.uniform(0, 0.0999, (17, 30)).astype(np.float32), tags, locs)
    assert below.shape == (0, 17, 5)                      # every candidate below threshold
    at = assert_same_people(np.full((17, 30), 0.125, np.float32), tags, locs,
                            GroupingParams(detection_threshold=0.125))
    assert at.shape == (0, 17, 5)                         # "> threshold": equal is out


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(grouping, "_NATIVE", None)
    monkeypatch.setattr(grouping, "_WARNED", False)
    vals, tags, locs = candidates([[(0.9, 0.0, 1, 1)]])
    params = GroupingParams(joint_order=(0,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = group_people(vals, tags, locs, params)
        group_people(vals, tags, locs, params)
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "not built" in str(caught[0].message)
    np.testing.assert_array_equal(first, group_reference(vals, tags, locs, params))
    with pytest.raises(ImportError, match="pip install"):
        group_people(vals, tags, locs, params, backend="native")
