"""The whole decoder on synthetic network outputs made from known people."""
import json

import numpy as np
import pytest

from threempose.config import InferConfig
from threempose.data.keypoints import JOINT_NAMES, flip_index
from threempose.decode import heatmap_nms
from threempose.decode.decoder import DecodeParams, Person, coco_results, decode
from threempose.decode.grouping import native_available
from threempose.decode.resize import plan_resize

# Original image 192 x 128, short side -> 256: scale 2, input 384 x 256, maps at stride 4: 96 x 64.
ORIGINAL, SHORT, STRIDE, SCALE = (192, 128), 256, 4, 2.0
MAP_W, MAP_H = 96, 64
PERSON_TAGS = np.array([2.0, 4.0, 6.0, 8.0])
LEFT_RIGHT = [j for j, name in enumerate(JOINT_NAMES) if name.startswith(("left", "right"))]


def make_people(seed: int) -> np.ndarray:
    """4 people, 17 joints each, at sub-pixel map coordinates [4, 17, 2] (x, y); person p
    lives in its own 24-pixel-wide column band so same-type joints never touch."""
    rng = np.random.default_rng(seed)
    xy = np.empty((4, 17, 2))
    for p in range(4):
        xy[p, :, 0] = rng.uniform(24 * p + 4, 24 * p + 20, 17)
        xy[p, :, 1] = rng.uniform(4, MAP_H - 5, 17)
    return xy


def render(xy: np.ndarray, tags=PERSON_TAGS, amplitude=None, sigma=1.5, radius=3.0):
    """Heatmaps [17, h, w] (Gaussians) and tags [17, h, w] (person tag on a disc per joint)."""
    amplitude = np.ones(xy.shape[:2]) if amplitude is None else amplitude
    ys, xs = np.mgrid[0:MAP_H, 0:MAP_W]
    hm = np.zeros((17, MAP_H, MAP_W), np.float32)
    tg = np.zeros((17, MAP_H, MAP_W), np.float32)
    for p in range(xy.shape[0]):
        for j in range(17):
            d2 = (xs - xy[p, j, 0]) ** 2 + (ys - xy[p, j, 1]) ** 2
            hm[j] = np.maximum(hm[j], amplitude[p, j] * np.exp(-d2 / (2 * sigma**2)))
            tg[j][d2 <= radius**2] = tags[p]
    return hm, tg


def mirrored(xy: np.ndarray) -> np.ndarray:
    """The same people as the network sees them in the horizontally flipped input:
    x -> w - 1 - x, and the joint labelled j is the mirror image of joint flip_index[j]."""
    out = xy[:, flip_index()].copy()
    out[..., 0] = MAP_W - 1 - out[..., 0]
    return out


def to_original(xy_map: np.ndarray) -> np.ndarray:
    """Map coordinates -> original image, written out independently of resize.py."""
    on_input = (xy_map + 0.5) * STRIDE - 0.5
    return (on_input + 0.5) / SCALE - 0.5


def by_tag(people: list[Person]) -> dict[int, Person]:
    """Decoded people keyed by the ground-truth tag nearest their (largest) mean tag component."""
    out = {int(np.abs(PERSON_TAGS - p.tag.max()).argmin()): p for p in people}
    assert len(out) == len(people)
    return out


INFO = plan_resize(*ORIGINAL, short_side=SHORT, multiple=32)


def test_setup_matches_the_constants():
    assert INFO.input_size == (MAP_W * STRIDE, MAP_H * STRIDE) and INFO.resized_size == INFO.input_size


@pytest.mark.parametrize("project", [False, True], ids=["map-resolution", "projected-to-input"])
def test_known_people_decode_back(project):
    xy = make_people(0)
    hm, tg = render(xy)
    params = DecodeParams(project_to_input=project, nms_kernel=5 if project else 3)
    people = decode(hm, tg, cfg=params, resize=INFO)
    assert len(people) == 4
    assert [p.score for p in people] == sorted((p.score for p in people), reverse=True)
    for k, person in by_tag(people).items():
        assert (person.keypoints[:, 2] > 0.85).all()                 # every joint, at its peak
        err = np.abs(person.keypoints[:, :2] - to_original(xy[k])).max()
        assert err < 1.0                                              # original-image pixels
        if not project:   # quarter-pixel adjustment: within 1/4 map pixel = 0.5 original pixel
            assert err * SCALE / STRIDE <= 0.25 + 1e-9
        assert person.score == pytest.approx(person.keypoints[:, 2].mean(), abs=1e-6)


def test_gaussians_centred_between_pixels_give_no_duplicate_people(monkeypatch):
    xy = np.floor(make_people(5)) + 0.5         # every peak is a 2 x 2 plateau of equal maxima
    hm, tg = render(xy)
    params = DecodeParams(project_to_input=False, nms_kernel=3)
    people = decode(hm, tg, cfg=params, resize=INFO)
    assert len(people) == 4
    for k, person in by_tag(people).items():
        assert (person.keypoints[:, 2] > 0.7).all()
        assert np.abs(person.keypoints[:, :2] - to_original(xy[k])).max() < 1.0
    # Every plateau pixel as a candidate (the previous NMS): duplicate people appear.
    monkeypatch.setattr(heatmap_nms, "drop_plateau_duplicates", lambda det, peaks, kernel: peaks)
    assert len(decode(hm, tg, cfg=params, resize=INFO, backend="reference")) > 4


def test_flip_test_is_left_right_correct():
    xy = make_people(1)
    hm, tg = render(xy)
    fhm, ftg = render(mirrored(xy))
    blank = np.zeros_like(hm)
    params = DecodeParams(project_to_input=False, nms_kernel=3)
    # The image's own outputs are blank: every joint must come from the flipped pass.
    people = by_tag(decode(blank, blank, fhm, ftg, cfg=params, resize=INFO))
    assert len(people) == 4
    for k, person in people.items():
        assert person.tag.shape == (2,) and person.tag[0] == 0.0     # tags: [image, flipped]
        values = person.keypoints[:, 2]                               # averaged with the blank pass
        assert ((values > 0.42) & (values <= 0.5 + 1e-6)).all()
        assert np.abs(person.keypoints[:, :2] - to_original(xy[k])).max() < 1.0
    # Without the left/right permutation the paired joints come out swapped (the test can fail).
    swapped = by_tag(decode(blank, blank, fhm, ftg, cfg=params, resize=INFO, flip_index=range(17)))
    for k, person in swapped.items():
        err = np.abs(person.keypoints[LEFT_RIGHT, :2] - to_original(xy[k, LEFT_RIGHT])).max(axis=1)
        assert (err > 1.0).mean() > 0.5
    # Both passes informative: the same people as without flip, tags doubled.
    both = by_tag(decode(hm, tg, fhm, ftg, cfg=params, resize=INFO))
    single = by_tag(decode(hm, tg, cfg=params, resize=INFO))
    for k in single:
        np.testing.assert_allclose(both[k].keypoints, single[k].keypoints, atol=1e-4)
        np.testing.assert_allclose(both[k].tag, [PERSON_TAGS[k]] * 2)


def test_refine_recovers_a_weak_joint():
    xy = make_people(2)
    amplitude = np.ones((4, 17))
    amplitude[1, 9] = 0.08                     # person 1's left wrist is below the 0.1 threshold
    hm, tg = render(xy, amplitude=amplitude)
    params = DecodeParams(project_to_input=False, nms_kernel=3)
    refined = by_tag(decode(hm, tg, cfg=params, resize=INFO))[1]
    assert 0.07 < refined.keypoints[9, 2] < 0.08 + 1e-6
    assert np.abs(refined.keypoints[9, :2] - to_original(xy[1, 9])).max() < 1.0
    raw = by_tag(decode(hm, tg, cfg=DecodeParams(project_to_input=False, nms_kernel=3, refine=False),
                        resize=INFO))[1]
    np.testing.assert_array_equal(raw.keypoints[9], [0, 0, 0])
    assert raw.score == pytest.approx(refined.score)          # scored before refinement, as HigherHRNet


def test_coco_results_entries():
    hm, tg = render(make_people(3))
    people = decode(hm, tg, cfg=DecodeParams(project_to_input=False, nms_kernel=3), resize=INFO)
    entries = json.loads(json.dumps(coco_results(people, image_id=42)))
    assert len(entries) == 4
    for entry, person in zip(entries, people):
        assert set(entry) == {"image_id", "category_id", "keypoints", "score"}
        assert entry["image_id"] == 42 and entry["category_id"] == 1 and len(entry["keypoints"]) == 51
        np.testing.assert_allclose(entry["keypoints"], person.keypoints.reshape(-1))
        assert entry["score"] == pytest.approx(person.score)
    assert decode(np.zeros((17, 8, 8)), np.zeros((17, 8, 8)), cfg=DecodeParams(project_to_input=False)) == []


@pytest.mark.skipif(not native_available(), reason="threempose._grouping not built")
def test_native_and_reference_decode_identically():
    xy = make_people(4)
    hm, tg = render(xy)
    fhm, ftg = render(mirrored(xy))
    results = [decode(hm, tg, fhm, ftg, resize=INFO, backend=b) for b in ("native", "reference")]
    assert len(results[0]) == len(results[1]) == 4
    for a, b in zip(*results):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        assert a.score == b.score


def test_params_from_infer_config():
    cfg = InferConfig(top_k=12, detection_threshold=0.2, tag_threshold=0.5, adjust=False, refine=False)
    p = DecodeParams.from_config(cfg, nms_kernel=3)
    assert (p.top_k, p.detection_threshold, p.tag_threshold, p.adjust, p.refine, p.nms_kernel) == \
        (12, 0.2, 0.5, False, False, 3)
    assert (p.use_detection_val, p.ignore_too_much, p.max_people, p.project_to_input) == (True, False, 30, True)
    with pytest.raises(TypeError, match="nms_kernal"):
        DecodeParams.from_config(cfg, nms_kernal=3)
    with pytest.raises(ValueError, match="odd"):
        DecodeParams(nms_kernel=4)


def test_bad_inputs_are_clear_errors():
    hm, tg = np.zeros((17, 8, 8)), np.zeros((17, 8, 8))
    with pytest.raises(ValueError, match="resize=ResizeInfo"):
        decode(hm, tg)
    params = DecodeParams(project_to_input=False)
    with pytest.raises(ValueError, match="both flip_heatmaps and flip_tags"):
        decode(hm, tg, hm, cfg=params)
    with pytest.raises(ValueError, match="tags must be"):
        decode(hm, np.zeros((17, 4, 4)), cfg=params)
    with pytest.raises(ValueError, match="heatmaps must be \\[J, h, w\\]"):
        decode(hm[None], tg, cfg=params)
    with pytest.raises(ValueError, match="NaN"):
        decode(hm * np.nan, tg, cfg=params)
    with pytest.raises(ValueError, match="flip_index is needed"):
        decode(hm[:5], tg[:5], hm[:5], tg[:5], cfg=params)
