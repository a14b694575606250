"""The COCO keypoints Dataset, its errors, skipped images, and build_loaders."""
import contextlib
import dataclasses
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from threempose.config import DataConfig, SyntheticConfig
from threempose.data import loader as loader_module
from threempose.data.augment import augment_sample, center_affine, params_affine
from threempose.data.coco import AnnotationError, CocoKeypoints, UnreadableSplitError
from threempose.data.coco_index import CocoIndex
from threempose.data.image_io import read_image
from threempose.data.loader import RELEASE_EVERY, HeapReleasingCollate, PoseDataLoader, build_loaders, collate_samples
from threempose.data.sampler import EpochSampler
from threempose.data.synthetic import generate
from threempose.data.targets import ignore_mask, supervision_mask

CFG = DataConfig(input_size=64, heatmap_stride=4, sigma=1.5, max_people=6, batch_size=3, num_workers=0)
TINY = Path(__file__).parent / "data" / "tiny_person_keypoints.json"


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """(image dir, annotation file) of 6 images, 96-160 px, up to 3 people, seed 2."""
    out = tmp_path_factory.mktemp("coco")
    return out / "images", generate(out, 6, seed=2, min_size=96, max_size=160, max_people=3)


def _copy(synthetic_set, tmp_path):
    images, ann = synthetic_set
    shutil.copytree(images, tmp_path / "images")
    return tmp_path / "images", tmp_path / "ann.json", json.loads(ann.read_text())


def _pycocotools(ann_file) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def _reference_labels(coco: COCO, image_id: int):
    """(keypoints [P, 17, 3], supervision mask) of an image as the pycocotools-indexed path made them."""
    info, anns = coco.imgs[image_id], coco.imgToAnns.get(image_id, [])
    kpts = [a["keypoints"] for a in anns if not a.get("iscrowd", 0) and a["num_keypoints"] > 0]
    return (np.asarray(kpts, np.float64).reshape(-1, 17, 3),
            supervision_mask(anns, info["height"], info["width"]))


@pytest.fixture(scope="module")
def crowded_set(tmp_path_factory):
    """(image dir, annotation file) of 24 synthetic images with crowds and keypoint-less people."""
    out = tmp_path_factory.mktemp("crowded")
    return out / "images", generate(out, 24, seed=7, min_size=96, max_size=160, max_people=4)


def test_samples_equal_those_made_from_the_pycocotools_index(crowded_set):
    """The flat index gives the samples the pycocotools index gave, for every (seed, epoch, index)."""
    coco = _pycocotools(crowded_set[1])
    ds = CocoKeypoints(*crowded_set, CFG, train=True, seed=3)
    raw = CocoKeypoints(*crowded_set, CFG, train=True, seed=3, raw=True)
    assert ds.image_ids == sorted(coco.imgs)
    holes = people = 0
    for i, image_id in enumerate(ds.image_ids):
        info = coco.imgs[image_id]
        kpts, mask = _reference_labels(coco, image_id)
        holes += int((mask == 0).any())
        people += len(kpts)
        image = read_image(crowded_set[0] / info["file_name"])
        for epoch in (0, 5):
            affine = params_affine(ds.augment_params(i, epoch), info["width"], info["height"], CFG.input_size)
            expected = augment_sample(image, mask, kpts, affine, CFG)
            got = ds[(i, epoch)]
            assert got["image_id"].item() == image_id
            for key, value in expected.items():
                assert torch.equal(got[key], value), (i, epoch, key)
        r = raw[(i, 1)]
        assert np.array_equal(r["keypoints"].numpy(), kpts) and np.array_equal(r["mask"].numpy(), mask)
    assert holes >= 3 and people >= 30          # the set exercises ignored regions and many people


def test_index_matches_pycocotools_on_a_file_with_crowds(tmp_path):
    data = json.loads(TINY.read_text())
    segmentations = {1: _box(130, 60, 270, 380),                     # a person with keypoints: no hole
                     3: {"size": [480, 640], "counts": [300 * 480 + 10, 200, 480 * 340 - 210]},   # crowd RLE
                     5: _box(10, 20, 60, 90)}                         # a person without keypoints
    for ann in data["annotations"]:
        if ann["id"] in segmentations:
            ann["segmentation"] = segmentations[ann["id"]]
    data["images"].reverse()                                               # the index sorts by id
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    index, coco = CocoIndex.read(path, 17), _pycocotools(path)
    assert index.image_ids.tolist() == sorted(coco.imgs) and len(index.keypoints) == 5
    for i, image_id in enumerate(index.image_ids.tolist()):
        info = coco.imgs[image_id]
        kpts, mask = _reference_labels(coco, image_id)
        assert index.file_name(i) == info["file_name"] and index.size(i) == (info["width"], info["height"])
        assert np.array_equal(index.people(i), kpts)
        regions = index.ignored_regions(i)
        assert np.array_equal(1 - ignore_mask(regions, info["height"], info["width"]), mask)
    assert sum(len(index.ignored_regions(i)) for i in range(3)) == 2       # one crowd, one keypoint-less
    assert sum(int((_reference_labels(coco, i)[1] == 0).sum()) for i in coco.imgs) > 1000


def _box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_sample_has_the_documented_keys_shapes_and_consistent_targets(synthetic_set):
    ds = CocoKeypoints(*synthetic_set, CFG, train=True, seed=0)
    assert len(ds) == 6 and ds.image_ids == [1, 2, 3, 4, 5, 6]
    targets_seen = 0
    for i in range(len(ds)):
        s = ds[(i, 1)]
        assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
        assert s["heatmaps"].shape == (17, 16, 16) and s["mask"].shape == (16, 16)
        assert s["joints"].shape == (6, 17, 2) and s["joints"].dtype == torch.int64
        assert s["affine"].shape == (2, 3) and s["image_id"].item() == i + 1 and s["skipped"] == []
        assert -2.2 < s["image"].min() and s["image"].max() < 2.7
        # every target joint's cell is a local peak of its heatmap (well above its surroundings)
        for p, j in zip(*torch.nonzero(s["joints"][..., 1], as_tuple=True)):
            y, x = divmod(int(s["joints"][p, j, 0]), 16)
            assert s["heatmaps"][j, y, x] > 0.6
            targets_seen += 1
    assert targets_seen > 10
    assert torch.equal(ds[(2, 1)]["image"], ds[(2, 1)]["image"])               # same key, same sample
    assert not torch.equal(ds[(2, 1)]["affine"], ds[(2, 2)]["affine"])         # other epoch, new draw


def test_val_samples_use_the_centre_affine(synthetic_set):
    ds = CocoKeypoints(*synthetic_set, CFG, train=False)
    im = _pycocotools(synthetic_set[1]).imgs[ds.image_ids[0]]
    s = ds[0]
    a = center_affine(im["width"], im["height"], 64)
    assert np.array_equal(s["affine"].numpy(), a.matrix) and not s["flipped"]
    expected = set()
    kpts, _ = ds.annotations(0)
    for p in range(kpts.shape[0]):
        for j in range(17):
            x, y, v = kpts[p, j]
            u, w = ((a.matrix @ [x, y, 1.0]) + 0.5) / 4 - 0.5    # crop -> heatmap pixel centres
            cx, cy = int(np.floor(u + 0.5)), int(np.floor(w + 0.5))
            if v > 0 and 0 <= cx < 16 and 0 <= cy < 16:
                expected.add((j, cy * 16 + cx))
    got = {(int(j), int(s["joints"][p, j, 0])) for p, j in torch.nonzero(s["joints"][..., 1])}
    assert got == expected and len(expected) > 5


def test_masks_cover_crowds_and_people_without_keypoints_and_empty_images_are_valid(synthetic_set, tmp_path):
    images, ann_file, data = _copy(synthetic_set, tmp_path)
    im = data["images"][0]
    w, h = im["width"], im["height"]
    data["images"] = [im]
    data["annotations"] = [
        {"id": 1, "image_id": im["id"], "category_id": 1, "iscrowd": 1, "num_keypoints": 0,
         "keypoints": [0] * 51, "segmentation": _box(0, 0, w / 2, h / 2), "area": 1.0, "bbox": [0, 0, 1, 1]},
        {"id": 2, "image_id": im["id"], "category_id": 1, "iscrowd": 0, "num_keypoints": 0,
         "keypoints": [0] * 51, "segmentation": _box(w / 2, h / 2, w, h), "area": 1.0, "bbox": [0, 0, 1, 1]},
    ]
    ann_file.write_text(json.dumps(data))
    s = CocoKeypoints(images, ann_file, CFG, train=False)[0]
    a = center_affine(w, h, 64)

    def cell(x, y):
        """(row, col) of the heatmap cell that source pixel (x, y) falls in."""
        u, v = a.matrix @ [x, y, 1.0] / 4
        return int(np.floor(v + 0.5)), int(np.floor(u + 0.5))

    assert s["mask"][cell(w / 4, h / 4)] == 0                  # inside the crowd region
    assert s["mask"][cell(3 * w / 4, 3 * h / 4)] == 0          # inside the keypoint-less person
    assert s["mask"][cell(3 * w / 4, h / 4)] == 1 and s["mask"][cell(w / 4, 3 * h / 4)] == 1
    assert s["heatmaps"].abs().sum() == 0 and s["joints"].abs().sum() == 0    # nobody with keypoints


@pytest.mark.parametrize("case", ["no_annotation_file", "no_image_dir", "not_json", "not_json_at_all",
                                  "instances", "annotation_without_keypoints", "string_image_id",
                                  "missing_images"])
def test_bad_input_fails_at_construction_naming_the_file(synthetic_set, tmp_path, case):
    images, ann_file, data = _copy(synthetic_set, tmp_path)
    ann_file.write_text(json.dumps(data))
    error, named = FileNotFoundError, ann_file
    if case == "no_annotation_file":
        ann_file.unlink()
    elif case == "no_image_dir":
        shutil.rmtree(images)
        named = images
    elif case == "not_json":
        ann_file.write_text("{not json")
        error = AnnotationError
    elif case == "not_json_at_all":
        ann_file.write_bytes(b"PK\x03\x04 a zip archive")
        error, named = AnnotationError, "not a JSON file (a zip archive"
    elif case == "instances":
        data["categories"] = [{"id": 1, "name": "person", "supercategory": "person"}]
        ann_file.write_text(json.dumps(data))
        error = AnnotationError
    elif case == "annotation_without_keypoints":
        del data["annotations"][0]["keypoints"]
        ann_file.write_text(json.dumps(data))
        error = AnnotationError
    elif case == "string_image_id":
        data["annotations"][0]["image_id"] = "1"
        ann_file.write_text(json.dumps(data))
        error, named = AnnotationError, "'image_id' must be an integer, got '1'"
    else:
        for name in ("000002.jpg", "000004.jpg", "000005.jpg", "000006.jpg"):
            (images / name).unlink()
        named = "4 image files of ann.json are missing from images, e.g. ['000002.jpg', '000004.jpg', '000005.jpg']"
    with pytest.raises(error) as e:
        CocoKeypoints(images, ann_file, CFG, train=True)
    message = str(e.value).replace(f"{tmp_path}/", "")
    assert str(named).replace(f"{tmp_path}/", "") in message and "\n" not in message


def test_a_large_file_that_is_not_json_fails_at_once_in_one_line(tmp_path):
    big = tmp_path / "person_keypoints_train2017.json"
    with open(big, "wb") as f:                 # 2 GiB of zeros (sparse: costs no disk)
        f.truncate(2 * 2**30)
    start = time.perf_counter()
    with pytest.raises(AnnotationError, match=r"not a JSON file \(binary: it holds NUL bytes\)") as e:
        CocoIndex.read(big, 17)
    assert time.perf_counter() - start < 5.0 and "\n" not in str(e.value) and str(big) in str(e.value)


def test_an_undecodable_image_is_skipped_counted_and_warned_about_once(synthetic_set, tmp_path):
    images, ann_file, data = _copy(synthetic_set, tmp_path)
    ann_file.write_text(json.dumps(data))
    bad = images / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])                   # truncated JPEG
    ds = CocoKeypoints(images, ann_file, CFG, train=True)
    s = ds[2]
    assert s["image_id"].item() == 4 and s["skipped"] == [str(bad)] and ds.skipped_files == [str(bad)]

    loader = PoseDataLoader(ds, EpochSampler(range(6), seed=0, shuffle=True), batch_size=2,
                            num_workers=1, collate_fn=collate_samples)      # the read fails in a worker
    with pytest.warns(RuntimeWarning, match="000003.jpg") as caught:
        ids = [i for batch in loader for i in batch["image_id"].tolist()]
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert sorted(ids) == [1, 2, 4, 4, 5, 6] and loader.skipped_files == [str(bad)]

    for p in images.iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(UnreadableSplitError, match=r"^none of the 6 images of .*ann\.json .* can be read"):
        ds[0]
    with pytest.raises(UnreadableSplitError) as caught:        # raised in a worker: still one line
        next(iter(loader))
    assert str(caught.value) == ds.unreadable_message()


def test_epoch_sampler_order_depends_on_seed_and_epoch_and_shards_ranks():
    def keys(seed, epoch, **kw):
        s = EpochSampler(range(10), seed=seed, shuffle=True, **kw)
        s.set_epoch(epoch)
        return list(s)

    assert keys(0, 3) == keys(0, 3) and all(e == 3 for _, e in keys(0, 3))
    assert sorted(i for i, _ in keys(0, 3)) == list(range(10))
    assert keys(0, 3) != keys(0, 4) and keys(0, 3) != keys(1, 3)
    ranks = [keys(0, 1, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    assert {i for r in ranks for i, _ in r} == set(range(10))
    s = EpochSampler(range(10), seed=0, shuffle=True)
    s.set_epoch(3, skip=4)
    assert list(s) == keys(0, 3)[4:] and len(s) == 6


def test_build_loaders_on_synthetic_data_resumes_and_both_paths_match(tmp_path):
    cfg = dataclasses.replace(CFG, synthetic=SyntheticConfig(
        train_images=10, val_images=4, min_size=80, max_size=128, max_people=3, cache_dir=str(tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = build_loaders(cfg, seed=5, arch_fraction=0.3, progress=False)
    assert not data.gpu_augment and len(data.train) == 2 and len(data.arch) == 1 and len(data.val) == 2
    assert data.val_image_ids == [1, 2, 3, 4] and data.val_annotations.is_file() and data.val_images.is_dir()
    train_idx = {i for i, _ in data.train.sampler}
    arch_idx = {i for i, _ in data.arch.sampler}
    assert len(train_idx) == 7 and len(arch_idx) == 3 and not train_idx & arch_idx

    def epoch_batches(loaders, epoch, skip=0):
        loaders.train.set_epoch(epoch, skip)
        return [loaders.prepare(b) for b in loaders.train]

    first = epoch_batches(data, 1)
    b = first[0]
    assert b["image"].shape == (3, 3, 64, 64) and b["heatmaps"].shape == (3, 17, 16, 16)
    assert b["mask"].shape == (3, 16, 16) and b["joints"].shape == (3, 6, 17, 2)
    resumed = build_loaders(cfg, seed=5, arch_fraction=0.3, progress=False)       # a new process
    again = epoch_batches(resumed, 1, skip=1)
    assert len(again) == 1 and all(torch.equal(first[1][k], again[0][k]) for k in first[1])
    assert [x["image_id"].tolist() for x in epoch_batches(data, 2)] != [x["image_id"].tolist() for x in first]

    gpu_cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, device="gpu"))
    gpu = build_loaders(gpu_cfg, seed=5, arch_fraction=0.3, device="cpu", progress=False)
    assert gpu.gpu_augment
    via_gpu = epoch_batches(gpu, 1)
    for key in ("heatmaps", "joints", "image_id", "affine"):
        assert all(torch.equal(x[key], y[key]) for x, y in zip(first, via_gpu))
    val = [data.prepare(x) for x in data.val]
    assert [x["image"].shape[0] for x in val] == [3, 1] and not any(x["flipped"].any() for x in val)


def test_heap_releasing_collate_releases_every_nth_batch_and_collates_unchanged(monkeypatch):
    calls = []
    monkeypatch.setattr(loader_module, "release_free_heap", lambda: calls.append(len(calls)) or True)
    collate = HeapReleasingCollate(collate_samples, every=2)
    samples = [{"x": torch.tensor([i, i + 1]), "skipped": [f"f{i}"] if i % 3 == 0 else []} for i in range(10)]
    for b, start in enumerate(range(0, 10, 2)):           # batches 0..4: released before 0, 2, 4
        batch = collate(samples[start:start + 2])
        assert len(calls) == b // 2 + 1
        assert torch.equal(batch["x"], torch.stack([s["x"] for s in samples[start:start + 2]]))
        assert batch["skipped"] == [n for s in samples[start:start + 2] for n in s["skipped"]]


def test_loader_workers_release_their_free_heap_and_yield_the_main_process_batches(tmp_path, monkeypatch):
    """Workers mmap their large buffers (set once, in loader_worker_init) and hand their free heap
    pages back (HeapReleasingCollate: each worker's first batch, then every RELEASE_EVERY-th), in
    the workers only, and the batches are those of the main process for the same (seed, epoch)."""
    calls = tmp_path / "release_calls"
    real = loader_module.release_free_heap

    def recording() -> bool:                      # runs in the forked workers: its pid, to a file
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real()

    def recording_init() -> bool:
        with open(tmp_path / "mmap_calls", "a") as f:
            f.write(f"{os.getpid()}\n")
        return True

    monkeypatch.setattr(loader_module, "release_free_heap", recording)
    monkeypatch.setattr(loader_module, "mmap_large_buffers", recording_init)
    cfg = dataclasses.replace(CFG, synthetic=SyntheticConfig(
        train_images=12, val_images=2, min_size=64, max_size=96, max_people=2, cache_dir=str(tmp_path)))
    batches = {}
    for workers in (0, 2):
        data = build_loaders(dataclasses.replace(cfg, num_workers=workers), seed=3, progress=False)
        data.train.set_epoch(2)
        batches[workers] = list(data.train)
    pids = calls.read_text().split()
    per_worker = -(-len(batches[2]) // 2 // RELEASE_EVERY)          # 2 batches each, round robin
    assert len(batches[2]) == 4 and len(pids) == 2 * per_worker and len(set(pids)) == 2
    assert str(os.getpid()) not in pids
    assert sorted((tmp_path / "mmap_calls").read_text().split()) == sorted(set(pids))   # each worker's init
    assert [b.keys() for b in batches[0]] == [b.keys() for b in batches[2]]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches[0], batches[2]) for k in a)


def test_a_split_smaller_than_a_batch_is_an_error(tmp_path):
    cfg = dataclasses.replace(CFG, batch_size=4, synthetic=SyntheticConfig(
        train_images=3, val_images=1, min_size=64, max_size=64, max_people=1, cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"3 images.*batch_size 4"):
        build_loaders(cfg, progress=False)


def test_missing_coco_root_explains_the_layout(tmp_path):
    cfg = dataclasses.replace(CFG, dataset="coco", root=str(tmp_path / "coco"))
    with pytest.raises(FileNotFoundError) as e:
        build_loaders(cfg)
    msg = str(e.value)
    assert "annotations/person_keypoints_train2017.json" in msg and "train2017/*.jpg" in msg
    assert "configs/search-small.json" in msg and "synthetic" in msg


def test_index_refuses_an_annotation_of_an_unlisted_image(tmp_path):
    """pycocotools keeps an annotation whose image_id names no image (and no sample ever uses it);
    the schema check (data/coco_schema.py) names it instead."""
    data = json.loads(TINY.read_text())
    data["annotations"].insert(1, dict(data["annotations"][0], id=99, image_id=12345))
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"annotations\[1\] \(id 99\): image_id 12345 is not the id"):
        CocoIndex.read(path, 17)
