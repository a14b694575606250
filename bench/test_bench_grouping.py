"""Keypoint grouping per image: the C++ extension vs the NumPy/SciPy reference.

    pytest bench/test_bench_grouping.py --benchmark-group-by=param:num_people

Inputs are what the decoder hands the grouping for one image with flip test:
17 joint types x 30 candidates, 2-D tags (image + flipped), with 1, 10 or 30
people (each joint visible with probability 0.9, tag noise 0.1) and the other
candidates clutter below the detection threshold.
"""
import numpy as np
import pytest

from threempose.decode.grouping import GroupingParams, group_people, native_available

BACKENDS = ["native", "reference"]


def crowd(num_people: int, seed: int = 0, k: int = 30, dim: int = 2):
    """Candidates [17, k] / [17, k, dim] / [17, k, 2] of one image with num_people people."""
    rng = np.random.default_rng(seed)
    person_tags = rng.permutation(num_people)[:, None] * 2.0 + rng.normal(0, 0.2, (num_people, dim))
    centres = rng.uniform(20, 108, (num_people, 2))
    vals = rng.uniform(0, 0.1, (17, k))                     # clutter below the threshold
    tags = rng.normal(0, 5, (17, k, dim))
    locs = rng.uniform(0, 128, (17, k, 2))
    for j in range(17):
        seen = np.flatnonzero(rng.random(num_people) < 0.9)[:k]
        vals[j, :seen.size] = rng.uniform(0.3, 1.0, seen.size)
        tags[j, :seen.size] = person_tags[seen] + rng.normal(0, 0.1, (seen.size, dim))
        locs[j, :seen.size] = centres[seen] + rng.normal(0, 8, (seen.size, 2))
        order = np.argsort(-vals[j], kind="stable")
        vals[j], tags[j], locs[j] = vals[j, order], tags[j, order], locs[j, order]
    return vals.astype(np.float32), tags.astype(np.float32), np.rint(locs).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_people", [1, 10, 30])
def test_grouping_per_image(benchmark, num_people, backend):
    if backend == "native" and not native_available():
        pytest.skip("threempose._grouping not built")
    vals, tags, locs = crowd(num_people)
    params = GroupingParams()
    benchmark.group = f"grouping, {num_people} people"
    people = benchmark(group_people, vals, tags, locs, params, backend)
    expected = group_people(vals, tags, locs, params, "reference")
    np.testing.assert_allclose(people, expected, rtol=0, atol=1e-6)
    assert people.shape[0] >= num_people      # sanity: nobody lost
