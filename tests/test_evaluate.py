"""COCO keypoint evaluation against pycocotools run directly, hand-computed cases and bad input."""
import contextlib
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from threempose.data.coco_eval import METRIC_NAMES, EvaluationInputError, PerImageKeypointEval, evaluate_keypoints
from threempose.evaluate import main

ANNOTATIONS = Path(__file__).parent / "data" / "tiny_person_keypoints.json"


def _ground_truth():
    return json.loads(ANNOTATIONS.read_text())


def _people():
    """The fixture's people COCOeval scores (not crowd, at least one labelled joint)."""
    return [a for a in _ground_truth()["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]


def _copied_results():
    return [{"image_id": a["image_id"], "category_id": 1, "keypoints": list(a["keypoints"]), "score": 1.0}
            for a in _people()]


def _perturbed_results():
    """Noisy copies of the people (noise grows per person), a duplicate and a false positive."""
    rng = np.random.default_rng(0)
    results = []
    for k, a in enumerate(_people()):
        kp = np.array(a["keypoints"], dtype=float).reshape(17, 3)
        kp[:, :2] += rng.normal(0.0, 2.0 + 3.0 * k, size=(17, 2))
        kp[:, 2] = rng.uniform(0.2, 1.0, size=17)
        results.append({"image_id": a["image_id"], "category_id": 1,
                        "keypoints": kp.ravel().round(2).tolist(), "score": round(0.9 - 0.1 * k, 2)})
    results.append(dict(results[0], score=0.35))  # duplicate of person 0: a false positive
    far = np.array(results[1]["keypoints"]).reshape(17, 3)
    far[:, :2] += [150.0, 60.0]
    results.append({"image_id": 1, "category_id": 1, "keypoints": far.ravel().tolist(), "score": 0.6})
    return results


def _pycocotools_stats(results_path, image_ids=None):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ANNOTATIONS))
        dt = gt.loadRes(str(results_path))
        coco_eval = COCOeval(gt, dt, iouType="keypoints")
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def _write(tmp_path, obj, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("image_ids", [None, [1, 3]])
def test_matches_pycocotools_on_perturbed_results(tmp_path, image_ids):
    path = _write(tmp_path, _perturbed_results())
    expected = _pycocotools_stats(path, image_ids)
    stats = evaluate_keypoints(ANNOTATIONS, path, image_ids=image_ids)
    assert list(stats) == list(METRIC_NAMES)
    assert list(stats.values()) == pytest.approx(expected.tolist(), abs=1e-12)
    assert 0.2 < stats["AP"] < 0.95  # the perturbation makes a non-trivial case


def test_subset_differs_from_full_set(tmp_path):
    path = _write(tmp_path, _perturbed_results())
    assert evaluate_keypoints(ANNOTATIONS, path)["AP"] != evaluate_keypoints(ANNOTATIONS, path, [2])["AP"]


def test_ground_truth_copy_scores_one_and_list_is_not_modified():
    results = _copied_results()
    before = copy.deepcopy(results)
    gt = COCO()  # a loaded COCO object is accepted as well as a path
    gt.dataset = _ground_truth()
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    stats = evaluate_keypoints(gt, results)
    assert stats == pytest.approx(dict.fromkeys(METRIC_NAMES, 1.0))
    assert results == before


def test_two_of_five_people_found_hand_computed():
    # Exact copies of people 0 and 1 (score 1): recall 2/5 at every OKS threshold, precision 1
    # up to that recall, so AP averages 41 of COCO's 101 recall points (0.00..0.40).
    stats = evaluate_keypoints(ANNOTATIONS, _copied_results()[:2])
    assert stats["AR"] == pytest.approx(0.4)
    assert stats["AP"] == pytest.approx(41 / 101)


def test_only_selected_images_are_scored():
    # Image 2 has one scorable (large) person, no medium one: APM/ARM are COCO's -1.
    stats = evaluate_keypoints(ANNOTATIONS, _copied_results(), image_ids=[2])
    assert stats["AP"] == pytest.approx(1.0) and stats["APM"] == -1.0 and stats["ARM"] == -1.0


def test_empty_results_score_zero_with_warning(tmp_path):
    path = _write(tmp_path, [])
    with pytest.warns(UserWarning, match="results.json: no detections"):
        stats = evaluate_keypoints(ANNOTATIONS, path)
    assert stats == dict.fromkeys(METRIC_NAMES, 0.0)


def test_pycocotools_output_is_quiet_unless_verbose(capsys):
    evaluate_keypoints(ANNOTATIONS, _copied_results())
    assert capsys.readouterr().out == ""
    evaluate_keypoints(ANNOTATIONS, _copied_results(), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_cli_prints_table(tmp_path, capsys):
    path = _write(tmp_path, _perturbed_results())
    assert main(["--annotations", str(ANNOTATIONS), "--results", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines()[1:]}
    assert rows == pytest.approx(evaluate_keypoints(ANNOTATIONS, path), abs=5e-4)


def test_cli_json_as_module(tmp_path):
    path = _write(tmp_path, _perturbed_results())
    proc = subprocess.run(
        [sys.executable, "-m", "threempose.evaluate", "--annotations", str(ANNOTATIONS),
         "--results", str(path), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == pytest.approx(evaluate_keypoints(ANNOTATIONS, path))


def test_cli_bad_input_exits_2_naming_file(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["--annotations", str(ANNOTATIONS), "--results", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_missing_files_are_named(tmp_path):
    with pytest.raises(EvaluationInputError, match="annotation file not found: .*absent.json"):
        evaluate_keypoints(tmp_path / "absent.json", _copied_results())
    with pytest.raises(EvaluationInputError, match="results file not found: .*absent.json"):
        evaluate_keypoints(ANNOTATIONS, tmp_path / "absent.json")


@pytest.mark.parametrize("content, message", [
    ("", r"not a JSON file \(it is empty\); expected a JSON results file"),
    ("[{", "not valid JSON"),
    ('{"annotations": []}', "must be a JSON array"),
])
def test_unreadable_results_file_is_named(tmp_path, content, message):
    path = tmp_path / "bad_results.json"
    path.write_text(content)
    with pytest.raises(EvaluationInputError, match=f"bad_results.json.*{message}"):
        evaluate_keypoints(ANNOTATIONS, path)


def _instances_style():
    gt = _ground_truth()
    gt["categories"] = [{"id": 1, "name": "person", "supercategory": "person"}]
    return gt


def _annotation_without_keypoints():
    gt = _ground_truth()
    del gt["annotations"][2]["keypoints"]
    return gt


@pytest.mark.parametrize("content, message", [
    (None, r"not a JSON file \(it is empty\)"),
    ([1, 2], "not a COCO person-keypoints annotation file"),
    ({"images": []}, "'annotations' list is missing"),
    (_instances_style(), r"categories\[0\] \(id 1\): category 'person' has no 'keypoints' names, needs 17"),
    (_annotation_without_keypoints(), r"annotations\[2\] \(id 3\) lacks keypoints"),
])
def test_bad_annotation_file_is_named(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_text("" if content is None else json.dumps(content))
    with pytest.raises(EvaluationInputError, match=f"instances.json.*{message}"):
        evaluate_keypoints(path, _copied_results())


def _broken(index, **change):
    results = _copied_results()
    results[index] = {k: v for k, v in {**results[index], **change}.items() if v is not None}
    return results


@pytest.mark.parametrize("results, message", [
    (_broken(3, score=None), "results entry 3 lacks score"),
    (_broken(1, keypoints=[1.0] * 34), "results entry 1: 'keypoints' must be .* 51 .*got 34"),
    (_broken(4, keypoints=[[1.0, 2.0, 0.5]] * 17), "results entry 4: 'keypoints' must be a flat list"),
    (_broken(0, keypoints=[float("nan")] * 51), "results entry 0: 'keypoints' holds a NaN"),
    (_broken(2, image_id=99), "results entry 2: image_id 99 is not an image of .*tiny_person_keypoints"),
    (_broken(2, category_id=2), "results entry 2: category_id 2 is not a category"),
    (_broken(2, score="high"), "results entry 2: 'score' must be a finite number"),
])
def test_malformed_results_entry_is_named(tmp_path, results, message):
    path = _write(tmp_path, results, "my_results.json")
    with pytest.raises(EvaluationInputError, match=f"my_results.json: {message}"):
        evaluate_keypoints(ANNOTATIONS, path)
    with pytest.raises(EvaluationInputError, match=f"results list: {message}"):
        evaluate_keypoints(ANNOTATIONS, results)


def test_unknown_or_empty_image_ids_are_rejected():
    with pytest.raises(EvaluationInputError, match=r"image_ids \[42\] are not images of .*tiny_person"):
        evaluate_keypoints(ANNOTATIONS, _copied_results(), image_ids=[1, 42])
    with pytest.raises(EvaluationInputError, match="image_ids is empty"):
        evaluate_keypoints(ANNOTATIONS, _copied_results(), image_ids=[])


# --------------------------------------------------------------------------- #
# Per-image evaluation pooled later (calibrate's threshold search)
# --------------------------------------------------------------------------- #
def _two_result_sets(rng):
    """Two detection sets ("exits") on the fixture plus an image without people: noisy people,
    duplicates, false positives, 25 detections on image 1 (over COCOeval's 20 per image) and
    scores tied across images (the pooled sort must keep COCOeval's image order)."""
    sets = []
    for noise in (3.0, 12.0):
        results = []
        for a in _people():
            kp = np.array(a["keypoints"], dtype=float).reshape(17, 3)
            for copy_ in range(int(rng.integers(1, 4))):
                moved = kp.copy()
                moved[:, :2] += rng.normal(0.0, noise * (1 + copy_), size=(17, 2))
                moved[:, 2] = rng.uniform(0.2, 1.0, size=17)
                results.append({"image_id": a["image_id"], "category_id": 1, "keypoints": moved.ravel().tolist(),
                                "score": float(rng.choice([0.5, 0.7, 0.9]))})
        for image_id, count in ((1, 25), (2, 3), (4, 2)):
            for _ in range(count):
                k = np.stack([rng.uniform(0, 300, 17), rng.uniform(0, 200, 17), np.ones(17)], 1)
                results.append({"image_id": image_id, "category_id": 1, "keypoints": k.ravel().tolist(),
                                "score": float(rng.choice([0.1, 0.5, 0.6]))})
        sets.append(results)
    return sets


@pytest.mark.filterwarnings("ignore")
def test_per_image_matches_pooled_equal_cocoeval_of_the_mix():
    data = _ground_truth()
    data["images"].append(dict(data["images"][0], id=4, file_name="empty.jpg"))   # no people
    data["images"].append(dict(data["images"][0], id=5, file_name="nothing.jpg"))  # no people, no detections
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
    rng = np.random.default_rng(7)
    sets = _two_result_sets(rng)
    ids = [1, 2, 3, 4, 5]
    per_image = PerImageKeypointEval(gt)
    matches = [{i: per_image.match(i, [d for d in results if d["image_id"] == i]) for i in ids} for results in sets]
    assert matches[0][5] == (None,)
    for choice in [(0,) * 5, (1,) * 5, (0, 1, 0, 1, 0), (1, 0, 1, 1, 0), (1, 1, 0, 0, 1)]:
        mix = [d for i, c in zip(ids, choice) for d in sets[c] if d["image_id"] == i]
        expected = evaluate_keypoints(gt, mix, image_ids=ids)
        assert per_image.stats({i: matches[c][i] for i, c in zip(ids, choice)}) == expected, choice
    subset = evaluate_keypoints(gt, [d for d in sets[1] if d["image_id"] in (1, 3)], image_ids=[1, 3])
    assert per_image.stats({3: matches[1][3], 1: matches[1][1]}) == subset
    assert 0.05 < subset["AP"] < 0.95           # a non-trivial case


def test_per_image_match_rejects_bad_input():
    per_image = PerImageKeypointEval(ANNOTATIONS)
    with pytest.raises(EvaluationInputError, match="image id 99 is not an image of"):
        per_image.match(99, [])
    det = _copied_results()[0]
    with pytest.raises(EvaluationInputError, match=r"^detection 0 of image 2 has image_id 1$"):
        per_image.match(2, [det])
    with pytest.raises(EvaluationInputError, match="'keypoints' must be a flat list of 51"):
        per_image.match(1, [dict(det, keypoints=[1.0, 2.0])])
