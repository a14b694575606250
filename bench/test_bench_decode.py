"""Crowd-scale decoding at input resolution 512: grouping alone and the whole decode, per image.

    pytest bench/test_bench_decode.py --benchmark-group-by=param:num_people

Each scene is what HigherHRNet-W32 hands its parser at 512 with flip test: 128 x 128
heatmaps and tags (ideal outputs of the people, light heatmap and tag noise) for the
image and its flip, projected to the 512 x 512 input, NMS kernel 5, adjust and refine
on, top-k = max_people = max(30, 2 x people). ``munkres_loop`` is the per-joint Munkres loop of
HigherHRNet's ``match_by_tag`` (written here, not copied) on the same candidates.
"""
import numpy as np
import pytest

from threempose.data.keypoints import flip_index
from threempose.decode.decoder import DecodeParams, decode, merge_flip, project_maps
from threempose.decode.grouping import GroupingParams, group_people, native_available
from threempose.decode.heatmap_nms import top_k_candidates
from threempose.decode.ideal import render_ideal_outputs
from threempose.decode.resize import plan_resize

MAP, INPUT = 128, 512
INFO = plan_resize(INPUT, INPUT, short_side=INPUT)
PEOPLE = [1, 10, 30, 100]


def crowd_scene(num_people: int, seed: int = 0):
    """(heatmaps, tags, flip_heatmaps, flip_tags), each [17, 128, 128], of num_people people
    on a jittered grid (person height ~ 0.8 of a grid cell, 90% of joints visible)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(num_people)))
    cell = (MAP - 8) / side
    slots = rng.permutation(side * side)[:num_people]
    corner = np.stack([slots % side, slots // side], axis=1) * cell + 4
    xy = corner[:, None, :] + rng.uniform(0.1, 0.9, (num_people, 17, 2)) * cell
    visible = rng.random((num_people, 17)) < 0.9
    person_tags = 2.0 * rng.permutation(num_people) + 2.0
    mirrored = xy[:, flip_index()].copy()
    mirrored[..., 0] = MAP - 1 - mirrored[..., 0]
    outputs = []
    for points, vis in ((xy, visible), (mirrored, visible[:, flip_index()])):
        hm, tg = render_ideal_outputs(points, (MAP, MAP), person_tags, visible=vis, sigma=2.0)
        hm = hm + rng.uniform(0, 0.02, hm.shape).astype(np.float32)
        tg = tg + rng.normal(0, 0.1, tg.shape).astype(np.float32)
        outputs += [hm, tg]
    return tuple(outputs)


def decode_params(num_people: int) -> DecodeParams:
    size = max(30, 2 * num_people)    # room for people whose first joints are missing
    return DecodeParams(top_k=size, max_people=size, nms_kernel=5)


def candidates(num_people: int):
    hm, tg, fhm, ftg = crowd_scene(num_people)
    hm, tg = project_maps(*merge_flip(hm, tg, fhm, ftg), INFO.input_size)
    params = decode_params(num_people)
    return top_k_candidates(hm, tg, params.top_k, params.nms_kernel), params


def munkres_loop(vals, tags, locs, params: GroupingParams):
    """Per-joint Munkres grouping as in HigherHRNet's match_by_tag (people in a list)."""
    from munkres import Munkres
    people, tag_lists = [], []
    for joint in params.resolve_joint_order(vals.shape[0]):
        keep = vals[joint] > params.detection_threshold
        joints = np.concatenate([locs[joint][keep], vals[joint][keep, None], tags[joint][keep]], axis=1)
        if not len(joints):
            continue
        if not people:
            for row in joints:
                people.append({joint: row})
                tag_lists.append([row[3:]])
            continue
        grouped = min(len(people), params.max_people)
        means = np.array([np.mean(t, axis=0) for t in tag_lists[:grouped]])
        dist = np.linalg.norm(joints[:, None, 3:] - means[None], axis=2)
        cost = np.round(dist) * 100 - joints[:, 2:3]
        if len(joints) > grouped:
            cost = np.concatenate([cost, np.full((len(joints), len(joints) - grouped), 1e10)], axis=1)
        for row, col in Munkres().compute(cost.tolist()):
            if row < len(joints) and col < grouped and dist[row, col] < params.tag_threshold:
                people[col][joint] = joints[row]
                tag_lists[col].append(joints[row, 3:])
            else:
                people.append({joint: joints[row]})
                tag_lists.append([joints[row, 3:]])
    return people


@pytest.mark.parametrize("method", ["native", "reference", "munkres_loop"])
@pytest.mark.parametrize("num_people", PEOPLE)
def test_grouping_at_512(benchmark, num_people, method):
    if method == "native" and not native_available():
        pytest.skip("threempose._grouping not built")
    if method == "munkres_loop":
        pytest.importorskip("munkres", reason="munkres is in the bench extra: pip install -e .[bench]")
    cands, params = candidates(num_people)
    args = (cands.vals, cands.tags, cands.locs.astype(np.float32), params)
    benchmark.group = f"grouping at 512, {num_people} people"
    if method == "munkres_loop":
        people = benchmark(munkres_loop, *args)
        assert len(people) >= num_people
    else:
        people = benchmark(group_people, *args, method)
        assert people.shape[0] >= num_people


@pytest.mark.parametrize("num_people", PEOPLE)
def test_whole_decode_at_512(benchmark, num_people):
    hm, tg, fhm, ftg = crowd_scene(num_people)
    benchmark.group = f"whole decode at 512, {num_people} people"
    people = benchmark(decode, hm, tg, fhm, ftg, cfg=decode_params(num_people), resize=INFO)
    assert len(people) >= num_people
