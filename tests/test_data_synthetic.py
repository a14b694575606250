"""The embedded synthetic data set: determinism, COCO validity, keypoints on the drawn joints, caching."""
import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from threempose.config import SyntheticConfig
from threempose.data import synthetic
from threempose.data.keypoints import COCO_PERSON_CATEGORY
from threempose.data.synthetic import JOINT_COLORS, ensure_synthetic, generate
from threempose.data.targets import segmentation_mask


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16 images, 160-320 px, up to 4 people, seed 0: (annotation file, loaded COCO)."""
    ann = generate(tmp_path_factory.mktemp("syn"), 16, seed=0, min_size=160, max_size=320, max_people=4)
    with contextlib.redirect_stdout(io.StringIO()):
        return ann, COCO(str(ann))


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(tmp_path / name, 3, seed=seed, min_size=64, max_size=128, max_people=3)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert list(a) == ["annotations.json", "images/000001.jpg", "images/000002.jpg", "images/000003.jpg"]
    assert a == b
    assert list(c) == list(a) and all(a[k] != c[k] for k in a)


def test_annotations_are_valid_coco_person_keypoints(dataset):
    ann_file, coco = dataset
    raw = json.loads(ann_file.read_text())
    assert raw["categories"] == [COCO_PERSON_CATEGORY]
    sizes = [(im["width"], im["height"]) for im in raw["images"]]
    assert all(160 <= s <= 320 for wh in sizes for s in wh) and any(w != h for w, h in sizes)
    for im in raw["images"]:
        with Image.open(ann_file.parent / "images" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
    for a in raw["annotations"]:
        im = coco.imgs[a["image_id"]]
        assert a["category_id"] == 1 and len(a["keypoints"]) == 51
        assert a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3])
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"] and a["area"] > 0
        assert segmentation_mask(a["segmentation"], im["height"], im["width"]).sum() == a["area"]
        xs, ys, vs = (np.array(a["keypoints"][k::3]) for k in range(3))
        assert np.all((xs[vs > 0] >= 0) & (xs[vs > 0] < im["width"]) & (ys[vs > 0] < im["height"]))
        assert np.all((xs[vs == 0] == 0) & (ys[vs == 0] == 0))


def test_cocoeval_scores_the_ground_truth_against_itself_as_perfect(dataset):
    _, coco = dataset
    detections = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                   "keypoints": [float(v) for v in a["keypoints"]]}
                  for a in coco.anns.values() if a["num_keypoints"] > 0]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(detections), iouType="keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[5] == pytest.approx(1.0)    # AP, AR


def test_the_set_has_occlusion_truncation_crowds_and_unlabelled_people(dataset):
    _, coco = dataset
    anns = list(coco.anns.values())
    flags = {v for a in anns for v in a["keypoints"][2::3] if a["num_keypoints"]}
    assert flags == {0, 1, 2}
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) and a["num_keypoints"] == 0
                          for a in crowds)
    assert any(not a["iscrowd"] and a["num_keypoints"] == 0 for a in anns)
    assert any(not coco.imgToAnns[i] for i in coco.imgs)                     # images with nobody
    assert max(len(coco.imgToAnns[i]) for i in coco.imgs) >= 3


def test_keypoints_lie_on_their_joint_colours(dataset):
    ann_file, coco = dataset
    palette = np.array(JOINT_COLORS, float)
    hits = {1: [], 2: []}
    for image_id, im in coco.imgs.items():
        pixels = np.asarray(Image.open(ann_file.parent / "images" / im["file_name"]), float)
        for a in coco.imgToAnns[image_id]:
            for j in range(17):
                x, y, v = a["keypoints"][3 * j: 3 * j + 3]
                if v:
                    nearest = np.argmin(np.linalg.norm(palette - pixels[y, x], axis=1))
                    hits[v].append(nearest == j and np.linalg.norm(palette[j] - pixels[y, x]) < 60)
    assert len(hits[2]) > 200 and all(hits[2])                 # every visible joint sits on its dot
    assert len(hits[1]) > 5 and np.mean(hits[1]) < 0.5         # occluded ones mostly do not


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        generate(tmp_path, 1, seed=0, min_size=200, max_size=100)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        synthetic.main(["--out", str(tmp_path / "full")])
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_command_line_writes_the_same_files_as_generate(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        synthetic.main(["--out", str(tmp_path / "cli"), "--images", "2", "--seed", "4",
                        "--min-size", "64", "--max-size", "96", "--max-people", "2"])
    generate(tmp_path / "api", 2, seed=4, min_size=64, max_size=96, max_people=2)
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp folders left


def test_ensure_synthetic_generates_once_and_never_reuses_an_interrupted_run(tmp_path, monkeypatch):
    cfg = SyntheticConfig(train_images=3, val_images=2, seed=1, min_size=64, max_size=96, max_people=2,
                          cache_dir=str(tmp_path / "cache"))
    real_generate = synthetic.generate

    def interrupted(out_dir, num_images, *args, **kwargs):
        real_generate(out_dir, num_images, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(cfg, progress=False)
    assert not (tmp_path / "cache").exists()     # nothing half-made (not even its empty folder) is left

    monkeypatch.setattr(synthetic, "generate", real_generate)
    splits = ensure_synthetic(cfg, progress=False)
    assert splits.root.parent == tmp_path / "cache"
    train, val = (json.loads(p.read_text()) for p in (splits.train_annotations, splits.val_annotations))
    assert len(train["images"]) == 3 and len(val["images"]) == 2
    assert train["info"]["seed"] != val["info"]["seed"]
    first = [(images / "000001.jpg").read_bytes() for images in (splits.train_images, splits.val_images)]
    assert first[0] != first[1]

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated a cached data set")

    monkeypatch.setattr(synthetic, "generate", must_not_run)
    assert ensure_synthetic(cfg, progress=False) == splits
    assert synthetic.settings_hash(dataclasses.replace(cfg, train_images=4)) != splits.root.name
    assert synthetic.settings_hash(dataclasses.replace(cfg, cache_dir="/elsewhere")) == splits.root.name
