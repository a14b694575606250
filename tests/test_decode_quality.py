"""Decoding quality, scored with COCO keypoint AP: ideal outputs decode to exactly the
annotated people, and the "nearest" tie rule does at least as well as the earlier
"lowest_index" rule on noisy outputs."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from threempose.data.keypoints import JOINT_NAMES
from threempose.decode.decoder import DecodeParams, coco_results, decode
from threempose.decode.ideal import render_ideal_outputs
from threempose.decode.resize import plan_resize
from threempose.data.coco_eval import evaluate_keypoints

# Original 256 x 192 -> short side 384: scale 2, input 512 x 384, maps at stride 4: 128 x 96.
ORIGINAL, SHORT, STRIDE, SCALE = (256, 192), 384, 4, 2.0
MAP_W, MAP_H = 128, 96
INFO = plan_resize(*ORIGINAL, short_side=SHORT, multiple=32)
COLS, ROWS = 5, 2


def scene(rng, half_pixel: bool):
    """10 people on a 5 x 2 grid of 25 x 47 map-pixel cells, joints anywhere in the middle
    80% of their cell (integer or half-pixel centres), 90% of joints visible.
    Returns xy [10, 17, 2] map pixels, visible bool [10, 17], tags [10]."""
    cells = np.stack(np.meshgrid(np.arange(COLS), np.arange(ROWS)), -1).reshape(-1, 2)
    size = np.array([MAP_W / COLS, MAP_H / ROWS])
    xy = (cells[:, None, :] + rng.uniform(0.1, 0.9, (len(cells), 17, 2))) * size
    xy = np.floor(xy) + 0.5 if half_pixel else np.rint(xy)
    visible = rng.random((len(cells), 17)) < 0.9
    return xy, visible, 2.0 * rng.permutation(len(cells)) + 2.0


def ground_truth(scenes) -> COCO:
    """A COCO keypoint ground truth with one image per scene (people in original pixels)."""
    images, annotations = [], []
    for image_id, (xy, visible, _) in enumerate(scenes, start=1):
        images.append({"id": image_id, "width": ORIGINAL[0], "height": ORIGINAL[1]})
        original = ((xy + 0.5) * STRIDE - 0.5 + 0.5) / SCALE - 0.5      # map -> input -> original
        for p in range(xy.shape[0]):
            kps = np.concatenate([original[p], 2.0 * visible[p][:, None]], axis=1)
            kps[~visible[p]] = 0.0
            lo, hi = original[p][visible[p]].min(axis=0), original[p][visible[p]].max(axis=0)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "keypoints": kps.reshape(-1).tolist(), "num_keypoints": int(visible[p].sum()),
                                "bbox": [*lo.tolist(), *(hi - lo).tolist()],
                                "area": float(np.prod(hi - lo)), "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": 1, "name": "person", "keypoints": list(JOINT_NAMES), "skeleton": []}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@pytest.mark.parametrize("project", [False, True], ids=["map-resolution", "projected-to-input"])
def test_ideal_outputs_decode_to_exactly_the_annotated_people(project):
    rng = np.random.default_rng(0)
    scenes = [scene(rng, half_pixel=bool(i % 2)) for i in range(4)]
    params = DecodeParams(project_to_input=project, nms_kernel=5 if project else 3)
    results = []
    for image_id, (xy, visible, tags) in enumerate(scenes, start=1):
        hm, tg = render_ideal_outputs(xy, (MAP_W, MAP_H), tags, visible=visible)
        people = decode(hm, tg, cfg=params, resize=INFO)
        assert len(people) == xy.shape[0]
        results += coco_results(people, image_id)
    stats = evaluate_keypoints(ground_truth(scenes), results)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)


def noisy_outputs(rng, xy, visible, tags, heatmap_noise, tag_noise, spurious):
    """Ideal outputs plus Gaussian heatmap noise, Gaussian tag noise and `spurious` false peaks
    per joint type (amplitude 0.2-0.7, random tags in the people's range)."""
    num_people = xy.shape[0]
    hm, tg = render_ideal_outputs(xy, (MAP_W, MAP_H), tags, visible=visible,
                                  amplitude=rng.uniform(0.5, 1.0, visible.shape))
    if spurious:
        fake_xy = rng.uniform(0, [MAP_W, MAP_H], (spurious, 17, 2))
        fake_hm, fake_tg = render_ideal_outputs(fake_xy, (MAP_W, MAP_H), rng.uniform(1, 2 * num_people + 3, spurious),
                                                amplitude=rng.uniform(0.2, 0.7, (spurious, 17)))
        tg = np.where(fake_hm > hm, fake_tg, tg)
        hm = np.maximum(hm, fake_hm)
    hm = hm + rng.normal(0, heatmap_noise, hm.shape).astype(np.float32)
    tg = tg + rng.normal(0, tag_noise, tg.shape).astype(np.float32)
    return hm, tg


@pytest.mark.parametrize("heatmap_noise, tag_noise, spurious", [(0.05, 0.3, 3), (0.1, 0.4, 5)],
                         ids=["light", "heavy"])
def test_nearest_tie_rule_scores_at_least_the_lowest_index_rule(heatmap_noise, tag_noise, spurious):
    ap = {"nearest": [], "lowest_index": []}
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        scenes = [scene(rng, half_pixel=bool(i % 2)) for i in range(3)]
        outputs = [noisy_outputs(rng, *s, heatmap_noise, tag_noise, spurious) for s in scenes]
        gt = ground_truth(scenes)
        for rule in ap:
            params = DecodeParams(project_to_input=False, nms_kernel=3, tie_rule=rule)
            results = []
            for image_id, (hm, tg) in enumerate(outputs, start=1):
                results += coco_results(decode(hm, tg, cfg=params, resize=INFO), image_id)
            ap[rule].append(evaluate_keypoints(gt, results)["AP"])
    print(ap)
    assert all(new >= old for new, old in zip(ap["nearest"], ap["lowest_index"])), ap
    assert sum(ap["nearest"]) > sum(ap["lowest_index"]), ap       # the rules differ on these inputs
