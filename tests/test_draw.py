"""Drawing people: dots, limbs, thresholds, input forms and atomic PNG output."""
import numpy as np
import pytest
from PIL import Image

from threempose.data.keypoints import JOINT_NAMES, SKELETON
from threempose.inference.draw import JOINT_COLORS, LIMB_COLORS, LIMB_SIDES, draw_people, save_drawing

BACKGROUND = (20, 20, 20)
# A standing person (x, y in units of its height), joints far enough apart that
# every dot and every limb midpoint is clear of the other marks at height 400.
_POSE = ((0.0, 0.06), (0.04, 0.02), (-0.04, 0.02), (0.1, 0.05), (-0.1, 0.05), (0.16, 0.2),
         (-0.16, 0.2), (0.22, 0.36), (-0.22, 0.36), (0.26, 0.5), (-0.26, 0.5), (0.1, 0.55),
         (-0.1, 0.55), (0.12, 0.75), (-0.12, 0.75), (0.12, 0.96), (-0.12, 0.96))


def _person(score=0.9, joint_scores=None):
    kp = np.array([[250 + 400 * x, 20 + 400 * y, 0.9] for x, y in _POSE])
    if joint_scores is not None:
        kp[:, 2] = joint_scores
    return {"keypoints": kp.tolist(), "score": score}


def _blank(width=500, height=440):
    return Image.new("RGB", (width, height), BACKGROUND)


def _pixel(image, xy):
    return image.getpixel((round(xy[0]), round(xy[1])))


def test_dots_have_joint_colours():
    person = _person()
    drawn = draw_people(_blank(), [person], show_scores=False)
    for j, (x, y, _) in enumerate(person["keypoints"]):
        assert _pixel(drawn, (x, y)) == JOINT_COLORS[j], JOINT_NAMES[j]


def test_limb_midpoints_have_limb_colours():
    person = _person()
    drawn = draw_people(_blank(), [person], show_scores=False, radius=3, line_width=3)
    kp = np.array(person["keypoints"])
    for limb, (a, b) in enumerate(SKELETON):
        mid = (kp[a, :2] + kp[b, :2]) / 2
        assert min(np.linalg.norm(kp[:, :2] - mid, axis=1)) > 5  # the pose keeps it clear of dots
        assert _pixel(drawn, mid) == LIMB_COLORS[limb], (JOINT_NAMES[a], JOINT_NAMES[b])


def test_palette_tells_left_from_right():
    assert len(set(LIMB_COLORS)) == len(SKELETON)
    left = {c for c, s in zip(LIMB_COLORS, LIMB_SIDES) if s == "left"}
    right = {c for c, s in zip(LIMB_COLORS, LIMB_SIDES) if s == "right"}
    assert len(left) == len(right) == 8
    # warm (red channel dominant) on the left, cool (blue channel dominant) on the right
    assert all(r > b for r, g, b in left) and all(b > r for r, g, b in right)
    assert JOINT_COLORS[JOINT_NAMES.index("left_wrist")] != JOINT_COLORS[JOINT_NAMES.index("right_wrist")]


def test_joint_below_threshold_is_not_drawn_nor_its_limbs():
    wrist, elbow = JOINT_NAMES.index("left_wrist"), JOINT_NAMES.index("left_elbow")
    scores = np.full(17, 0.9)
    scores[wrist] = 0.25
    person = _person(joint_scores=scores)
    kp = np.array(person["keypoints"])
    drawn = draw_people(_blank(), [person], score_threshold=0.3, show_scores=False)
    assert _pixel(drawn, kp[wrist]) == BACKGROUND
    assert _pixel(drawn, (kp[wrist, :2] + kp[elbow, :2]) / 2) == BACKGROUND
    assert _pixel(drawn, kp[elbow]) == JOINT_COLORS[elbow]
    drawn_low = draw_people(_blank(), [person], score_threshold=0.2, show_scores=False)
    assert _pixel(drawn_low, kp[wrist]) == JOINT_COLORS[wrist]


def test_non_finite_joint_is_skipped():
    person = _person()
    person["keypoints"][0] = [float("nan"), 10.0, 0.9]
    nose_free = _person()
    nose_free["keypoints"][0][2] = 0.0
    assert (np.asarray(draw_people(_blank(), [person]))
            == np.asarray(draw_people(_blank(), [nose_free]))).all()


def test_flat_list_array_and_dict_forms_agree_and_input_is_untouched():
    person = _person()
    array = np.full((440, 500, 3), BACKGROUND, dtype=np.uint8)
    as_dict = np.asarray(draw_people(array, [person], show_scores=False))
    flat = {"keypoints": np.ravel(person["keypoints"]).tolist(), "score": 0.9}
    assert (np.asarray(draw_people(array, [flat], show_scores=False)) == as_dict).all()
    assert (np.asarray(draw_people(_blank(), [np.array(person["keypoints"])])) == as_dict).all()
    assert (array == BACKGROUND).all()
    assert (as_dict != BACKGROUND).any()


def test_score_label_is_drawn_only_when_asked():
    with_label = np.asarray(draw_people(_blank(), [_person(score=0.87)]))
    without = np.asarray(draw_people(_blank(), [_person(score=0.87)], show_scores=False))
    changed = np.argwhere((with_label != without).any(axis=2))
    assert len(changed) > 20
    top_y = 20 + 400 * min(y for _, y in _POSE)
    assert changed[:, 0].max() < top_y  # the label sits above the person


@pytest.mark.parametrize("people, message", [
    ([{"score": 0.5}], "person 0 has no 'keypoints'"),
    ([_person(), np.zeros((17, 2))], r"person 1: keypoints must be 17 x \[x, y, score\].*shape \(17, 2\)"),
    ([{"keypoints": [0.0] * 50}], "person 0: .*shape \\(50,\\)"),
    ([{"keypoints": [[0, 0, "a"]] * 17}], "person 0: .*non-numeric"),
])
def test_bad_person_is_named(people, message):
    with pytest.raises(ValueError, match=message):
        draw_people(_blank(), people)


def test_bad_image_is_rejected():
    with pytest.raises(ValueError, match="uint8 of shape \\[H, W, 3\\]"):
        draw_people(np.zeros((10, 10), np.uint8), [])
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        draw_people("image.jpg", [])


def test_save_drawing_writes_readable_png(tmp_path):
    path = save_drawing(tmp_path / "out" / "drawn.png", _blank(), [_person()])
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert (np.asarray(saved) == np.asarray(draw_people(_blank(), [_person()]))).all()


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="person 1"):
        save_drawing(tmp_path / "a.png", _blank(), [_person(), {"keypoints": [1, 2]}])

    def save_half(self, fp, format=None, **params):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", save_half)
    with pytest.raises(OSError, match="disk full"):
        save_drawing(tmp_path / "b.png", _blank(), [_person()])
    assert list(tmp_path.iterdir()) == []


def test_save_drawing_wants_png_name(tmp_path):
    with pytest.raises(ValueError, match="drawn.jpg: .*PNG"):
        save_drawing(tmp_path / "drawn.jpg", _blank(), [])
    assert list(tmp_path.iterdir()) == []
