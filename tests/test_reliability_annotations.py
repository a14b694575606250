"""Malformed COCO annotation files: one line naming the file, the first offending entry and the rule."""
import contextlib
import copy
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from threempose.config import DataConfig
from threempose.data.coco import AnnotationError, CocoKeypoints
from threempose.data.coco_schema import check_keypoint_annotations
from threempose.data.synthetic import generate
from threempose.evaluate import main as evaluate_main
from threempose.pnfs.topdown_data import TopDownDataError, read_person_keypoints

TINY = Path(__file__).parent / "data" / "tiny_person_keypoints.json"   # 3 images, 7 people
CFG = DataConfig(input_size=64, heatmap_stride=4, sigma=1.5, max_people=6, batch_size=2, num_workers=0)


def _tiny():
    return json.loads(TINY.read_text())


def _changed(change):
    data = _tiny()
    change(data)
    return data


def _set(collection, index, **values):
    """A change setting ``values`` on ``data[collection][index]`` (None deletes the key)."""
    def change(data):
        entry = data[collection][index]
        for key, value in values.items():
            if value is None:
                del entry[key]
            else:
                entry[key] = value
    return change


def _replace(collection, index, value):
    def change(data):
        data[collection][index] = value
    return change


CASES = [
    # (change, entry named, rule named)
    (_set("annotations", 3, image_id=None), r"annotations\[3\] \(id 4\)", "lacks 'image_id'"),
    (_set("annotations", 3, image_id="2"), r"annotations\[3\] \(id 4\)", "'image_id' must be an integer"),
    (_set("annotations", 3, image_id=99), r"annotations\[3\] \(id 4\)", "image_id 99 is not the id of"),
    (_replace("annotations", 1, "person"), r"annotations\[1\]", "must be a JSON object, got a JSON str"),
    (_set("annotations", 0, keypoints=["1"] * 51), r"annotations\[0\] \(id 1\)",
     "'keypoints' must be a flat list of 51 finite numbers .*non-number"),
    (_set("annotations", 0, keypoints=[1.0] * 34), r"annotations\[0\]", "'keypoints' .* got 34 entries"),
    (_set("annotations", 0, keypoints="1 2 3"), r"annotations\[0\]", "'keypoints' .* got a JSON str"),
    (_set("annotations", 2, segmentation="crowd"), r"annotations\[2\] \(id 3\)",
     "'segmentation' must be a list of polygons or an RLE object"),
    (_set("annotations", 2, segmentation=[[1, 2, 3, 4, 5]]), r"annotations\[2\]", "polygon 0 .* even number"),
    (_set("annotations", 2, segmentation={"size": [10, 10], "counts": [100]}), r"annotations\[2\]",
     r"RLE 'size' \[10, 10\] is not its image's \[height, width\] \[480, 640\]"),
    (_set("annotations", 2, segmentation={"size": [480, 640], "counts": [-1]}), r"annotations\[2\]",
     "RLE needs 'counts'"),
    (_set("annotations", 5, area=-10.0), r"annotations\[5\] \(id 6\)", "'area' must be a positive number"),
    (_set("annotations", 5, bbox=[0, 0, -5, 10]), r"annotations\[5\]", "'bbox' must be 4 numbers"),
    (_set("annotations", 5, iscrowd=2), r"annotations\[5\]", "'iscrowd' must be 0 or 1"),
    (_set("annotations", 5, num_keypoints=-1), r"annotations\[5\]", "'num_keypoints' must be"),
    (_set("images", 1, width="480"), r"images\[1\] \(id 2\)", "'width' must be a positive integer"),
    (_set("images", 1, height=0), r"images\[1\]", "'height' must be a positive integer"),
    (_set("images", 1, file_name=None), r"images\[1\]", "'file_name' must be a non-empty string"),
    (_set("images", 2, id=1), r"images\[2\] \(id 1\)", r"duplicate image id 1 \(also images\[0\]\)"),
    (_set("images", 2, file_name="000001.jpg"), r"images\[2\]", "duplicate file_name '000001.jpg'"),
    (_replace("images", 0, [1]), r"images\[0\]", "must be a JSON object"),
    (_set("categories", 0, keypoints=None), "", "no category has 'keypoints'"),
    (lambda d: d.update(images=[]), "", "'images' is empty: the split has no images"),
    (lambda d: d.update(annotations={}), "", "the 'annotations' list is missing"),
]


@pytest.mark.parametrize("change, entry, rule", CASES)
def test_each_rule_is_one_line_naming_file_entry_and_rule(change, entry, rule):
    with pytest.raises(AnnotationError) as caught:
        check_keypoint_annotations(_changed(change), "ann.json", 17)
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"ann\.json: {entry}.*{rule}", message), message


def test_the_valid_file_passes_and_names_the_person_category():
    assert check_keypoint_annotations(_tiny(), "ann.json", 17) == 1
    assert check_keypoint_annotations(_tiny(), "ann.json", 17, evaluation_fields=True,
                                      every_category_keypoints=True) == 1


def test_evaluation_requires_the_fields_cocoeval_reads():
    data = _changed(_set("annotations", 4, area=None))
    assert check_keypoint_annotations(copy.deepcopy(data), "ann.json", 17) == 1      # training fills in
    with pytest.raises(AnnotationError, match=r"ann\.json: annotations\[4\] \(id 5\) lacks area"):
        check_keypoint_annotations(data, "ann.json", 17, evaluation_fields=True)


def test_duplicate_ids_are_what_pycocotools_silently_merges():
    """The reason for the rule: pycocotools keeps one image of two with the same id, so one
    image's people are trained on another's pixels; the check refuses the file."""
    data = _changed(_set("images", 2, id=1))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    assert len(data["images"]) == 3 and len(coco.imgs) == 2 and coco.imgs[1]["file_name"] == "000003.jpg"
    with pytest.raises(AnnotationError, match="duplicate image id 1"):
        check_keypoint_annotations(data, "ann.json", 17)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    return out / "images", generate(out, 3, seed=4, min_size=64, max_size=96, max_people=2)


@pytest.mark.parametrize("change, rule", [
    (_set("images", 1, id=1), "duplicate image id 1"),
    (_set("images", 1, width="64"), "'width' must be a positive integer"),
    (_set("annotations", 0, image_id=None), "lacks 'image_id'"),
])
def test_the_training_data_set_refuses_the_file_at_construction(synthetic_set, tmp_path, change, rule):
    images, annotations = synthetic_set
    shutil.copytree(images, tmp_path / "images")
    data = json.loads(annotations.read_text())
    change(data)
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=rf"^{re.escape(str(tmp_path / 'ann.json'))}: .*{rule}"):
        CocoKeypoints(tmp_path / "images", tmp_path / "ann.json", CFG, train=True)


@pytest.mark.parametrize("content, message", [
    (b"", r"not a JSON file \(it is empty\)"),
    (b"\xff\xfe{\x00}\x00", r"not a JSON file \(binary"),
    (b"PK\x03\x04rest-of-a-zip", r"not a JSON file \(a zip archive, e\.g\. a PyTorch checkpoint"),
    (b"{\"images\": [", "not valid JSON"),
])
def test_an_annotation_file_of_the_wrong_kind_is_one_line(synthetic_set, tmp_path, content, message):
    images, _ = synthetic_set
    (tmp_path / "ann.json").write_bytes(content)
    with pytest.raises(AnnotationError, match=message) as caught:
        CocoKeypoints(images, tmp_path / "ann.json", CFG, train=True)
    assert "\n" not in str(caught.value) and str(tmp_path / "ann.json") in str(caught.value)


@pytest.mark.parametrize("change, rule", [
    (_set("images", 2, id=1), r"images\[2\] \(id 1\): duplicate image id 1"),
    (_set("annotations", 5, area=-10.0), r"annotations\[5\] \(id 6\): 'area' must be a positive number"),
    (_set("annotations", 3, image_id=None), r"annotations\[3\] \(id 4\) lacks 'image_id'"),
])
def test_evaluate_checks_its_ground_truth_with_the_same_rules(tmp_path, capsys, change, rule):
    """The evaluate command: one line and exit 2 (pycocotools would merge the duplicate images,
    and a negative area overflows OKS into meaningless numbers)."""
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_changed(change)))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 2, "category_id": 1, "keypoints": [1.0] * 51, "score": 1.0}]))
    assert evaluate_main(["--annotations", str(path), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(rf"error: {re.escape(str(path))}: {rule}", err), err


def test_pnfs_top_down_data_uses_the_same_check(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_changed(_set("images", 2, id=1))))
    with pytest.raises(TopDownDataError, match=r"gt\.json: images\[2\] \(id 1\): duplicate image id 1"):
        read_person_keypoints(path)
