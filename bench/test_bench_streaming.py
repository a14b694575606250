"""Streaming inference and evaluation at scale: memory of ``infer`` over 20 vs 2,000 images,
of ``calibrate`` over 200 vs 2,000 val images, and the time ``evaluate`` takes on a 5,000-image
result file.

    pytest bench/test_bench_streaming.py -s
    python bench/test_bench_streaming.py [--images 2000] [--eval-images 5000] [--calibrate-images 2000]
        [--compare-with /work/main] [--skip-infer] [--skip-eval] [--skip-calibrate]

* ``infer``: a small random-weight derived network (2 rows, 3 layers, C = 8), short side 64,
  detection threshold 0 so that every image yields ``top_k`` = 30 people (results are as large
  as they get); the images are hard links to one 160 x 120 JPEG. Peak RSS is ``/usr/bin/time``'s
  maximum resident set size of the whole ``python -m threempose.infer`` process. Target: the
  peaks of 20 and 2,000 images differ by < 100 MiB. ``--compare-with DIR`` runs the same
  command from another checkout too (e.g. the tree before streaming).
* ``calibrate``: the same small network with EELs at layers 1 and 2 (exits 1, 2, 3), short
  side 64, detection threshold 0 (every exit yields ``top_k`` people), ``--grid 4``; the val
  split: ``bench/coco_scale_file.py``'s ground truth of 2,000 images (2.5 people each, hard
  links to one 320 x 240 JPEG), of which the first ``--max-images`` 200 or 2,000 are used.
  Peak RSS of the whole ``python -m threempose.calibrate`` process. Target: 200 and 2,000
  images differ by < 100 MiB (``--compare-with``: the tree before streaming too).
* ``evaluate``: ground truth of 5,000 images (``bench/coco_scale_file.py``, 2.5 people per
  image) and 20 detections per image (100,000: ground-truth people with jitter plus random
  ones); the CPU time of ``python -m threempose.evaluate`` (``/usr/bin/time`` user + sys, the
  machine is shared). Target: within a minute.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from coco_scale_file import write_coco_sized

RSS_GAP_MIB, EVAL_S = 100.0, 60.0
CALIBRATE_SMALL = 200


def _timed(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time; peak RSS (MiB), wall and CPU seconds."""
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %M %e %U %S", *cmd], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stderr.splitlines()[::-1] if x.startswith("TIME "))
    kib, wall, user, sys_s = line.split()[1:]
    return {"peak_rss_mib": int(kib) / 1024, "wall_s": float(wall), "cpu_s": float(user) + float(sys_s)}


INFER_SETTINGS = {"short_side": 64, "detection_threshold": 0.0, "flip_test": False, "project_to_input": False}


def make_model(out: Path, eels: tuple[int, ...] = ()) -> tuple[Path, Path]:
    """A small random-weight model file (early exits at ``eels``) and an infer config (short
    side 64, threshold 0)."""
    import torch

    from threempose.config import ModelConfig
    from threempose.nas.derived import DerivedNet
    from threempose.nas.model_file import save_model_file
    from threempose.nas.supernet import Supernet
    torch.manual_seed(0)
    genotype = Supernet(ModelConfig(rows=2, layers=3, channels=8, eels=list(eels), stem_blocks=0)).derive()
    model = out / f"model{''.join(map(str, eels))}.pt"
    save_model_file(model, DerivedNet(genotype, 17, 0).eval(), {})
    config = out / "infer.json"
    config.write_text(json.dumps({"infer": INFER_SETTINGS}))
    return model, config


def image_folder(out: Path, n: int) -> Path:
    from PIL import Image
    folder = out / f"images{n}"
    folder.mkdir(parents=True, exist_ok=True)
    one = out / "one.jpg"
    if not one.exists():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8)).save(one)
    for i in range(1, n + 1):
        target = folder / f"{i:06d}.jpg"
        if not target.exists():
            os.link(one, target)
    return folder


def measure_infer(out: Path, counts: tuple[int, ...], checkout: Path = ROOT) -> dict:
    model, config = make_model(out)
    rows = {}
    for n in counts:
        res = out / f"results{n}-{checkout.name}.json"
        rows[n] = _timed([sys.executable, "-m", "threempose.infer", "--checkpoint", str(model), "--config",
                          str(config), "--images", str(image_folder(out, n)), "--out", str(res), "--no-progress",
                          "--no-optimize"], checkout)
        rows[n]["people"] = len(json.loads(res.read_text()))
    return rows


def make_val_split(out: Path, images: int) -> Path:
    """A COCO-layout root (``val2017/``, ``annotations/person_keypoints_val2017.json``) of
    ``images`` generated images and a calibrate config reading it."""
    root = out / f"val{images}"
    if not (root / "annotations").is_dir():
        generated = write_coco_sized(out / f"gen{images}", images, int(2.5 * images))
        (root / "annotations").mkdir(parents=True)
        (root / "annotations" / "person_keypoints_val2017.json").symlink_to(generated)
        (root / "val2017").symlink_to(generated.parent / "images")
    config = out / f"calibrate{images}.json"
    config.write_text(json.dumps({"data": {"dataset": "coco", "root": str(root), "val_split": "val2017"},
                                  "infer": INFER_SETTINGS}))
    return config


def measure_calibrate(out: Path, counts: tuple[int, ...], checkout: Path = ROOT) -> dict:
    model, _ = make_model(out, eels=(1, 2))
    config = make_val_split(out, max(counts))
    rows = {}
    for n in counts:
        res = out / f"calibrated{n}-{checkout.name}.json"
        rows[n] = _timed([sys.executable, "-m", "threempose.calibrate", "--checkpoint", str(model), "--config",
                          str(config), "--out", str(res), "--max-images", str(n), "--grid", "4", "--no-progress"],
                         checkout)
        rows[n]["thresholds"] = {e["layer"]: e["threshold"] for e in json.loads(res.read_text())["infer"]["eels"]}
    return rows


def make_eval_files(out: Path, images: int) -> tuple[Path, Path]:
    gt = write_coco_sized(out / "gt", images, int(2.5 * images))
    data = json.loads(gt.read_text())
    rng = np.random.default_rng(1)
    dets = []
    for ann in data["annotations"]:
        if ann["num_keypoints"] > 0 and not ann["iscrowd"]:
            k = np.asarray(ann["keypoints"], float).reshape(17, 3)
            k[:, :2] += rng.normal(0, 4, (17, 2))
            k[:, 2] = 1.0
            dets.append({"image_id": ann["image_id"], "category_id": 1,
                         "keypoints": np.round(k, 2).ravel().tolist(), "score": float(rng.uniform(0.3, 1))})
    per_image = 20
    found = collections.Counter(d["image_id"] for d in dets)
    for image in data["images"]:
        for _ in range(per_image - found[image["id"]]):          # the rest: random low-score people
            k = np.stack([rng.uniform(0, 320, 17), rng.uniform(0, 240, 17), np.ones(17)], 1)
            dets.append({"image_id": image["id"], "category_id": 1, "keypoints": np.round(k, 2).ravel().tolist(),
                         "score": float(rng.uniform(0, 0.5))})
    results = out / "results5000.json"
    results.write_text(json.dumps(dets))
    return gt, results


def measure_evaluate(out: Path, images: int) -> dict:
    gt, results = make_eval_files(out, images)
    row = _timed([sys.executable, "-m", "threempose.evaluate", "--annotations", str(gt), "--results",
                  str(results), "--json"], ROOT)
    row["detections"] = len(json.loads(results.read_text()))
    return row


def test_infer_memory_is_flat_over_thousands_of_images(tmp_path):
    rows = measure_infer(tmp_path, (20, 2000))
    print(rows)
    assert rows[2000]["peak_rss_mib"] - rows[20]["peak_rss_mib"] < RSS_GAP_MIB


def test_calibrate_memory_is_flat_over_thousands_of_images(tmp_path):
    rows = measure_calibrate(tmp_path, (CALIBRATE_SMALL, 2000))
    print(rows)
    assert rows[2000]["peak_rss_mib"] - rows[CALIBRATE_SMALL]["peak_rss_mib"] < RSS_GAP_MIB


def test_evaluate_of_5000_images_takes_under_a_minute(tmp_path):
    row = measure_evaluate(tmp_path, 5000)
    print(row)
    assert row["cpu_s"] < EVAL_S


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/threempose-streaming")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--eval-images", type=int, default=5000)
    parser.add_argument("--calibrate-images", type=int, default=2000)
    parser.add_argument("--compare-with", type=Path)
    parser.add_argument("--skip-infer", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-calibrate", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    if not args.skip_infer:
        report["infer"] = measure_infer(out, (20, args.images))
        if args.compare_with:
            report["infer_" + args.compare_with.name] = measure_infer(out, (20, args.images), args.compare_with)
    if not args.skip_calibrate:
        counts = (CALIBRATE_SMALL, args.calibrate_images)
        report["calibrate"] = measure_calibrate(out, counts)
        if args.compare_with:
            report["calibrate_" + args.compare_with.name] = measure_calibrate(out, counts, args.compare_with)
    if not args.skip_eval:
        report["evaluate"] = measure_evaluate(out, args.eval_images)
    print(json.dumps(report, indent=1))
