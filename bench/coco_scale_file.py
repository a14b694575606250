"""A COCO-sized person-keypoints annotation file for the scale benches (no real images needed).

    python bench/coco_scale_file.py OUT_DIR [--images 60000] [--people 150130]

``OUT_DIR/annotations.json`` and ``OUT_DIR/images/NNNNNN.jpg``: every image is a hard
link to one small JPEG (``WIDTH x HEIGHT``), so 60,000 images cost one file. Like COCO
train2017's person file: ``people`` annotations with keypoints (``num_keypoints`` 1..17,
one polygon of 8-40 vertices with two decimals), as many again * ``KEYPOINTLESS``
people without keypoints (polygons: the loss ignores them) and 1 % crowd regions
(uncompressed RLE), spread at random over the images. Deterministic for the arguments.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 320, 240
KEYPOINTLESS = 0.75          # COCO train2017: ~112k keypoint-less people beside ~150k with keypoints
CROWD = 0.01


def _polygon(rng: np.random.Generator) -> list[list[float]]:
    n = int(rng.integers(8, 41))
    cx, cy = rng.uniform(20, WIDTH - 20), rng.uniform(20, HEIGHT - 20)
    angle = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(5, 60, n)
    xs = np.clip(cx + radius * np.cos(angle), 0, WIDTH - 1)
    ys = np.clip(cy + radius * np.sin(angle), 0, HEIGHT - 1)
    return [np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()]


def _crowd_rle(rng: np.random.Generator) -> dict:
    """Uncompressed RLE (column-major runs) of one random box."""
    x0, y0 = int(rng.integers(0, WIDTH // 2)), int(rng.integers(0, HEIGHT // 2))
    w, h = int(rng.integers(10, WIDTH // 2)), int(rng.integers(10, HEIGHT // 2))
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y0 + h, x0:x0 + w] = 1
    flat = mask.ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [HEIGHT, WIDTH], "counts": counts}


def write_coco_sized(out: str | Path, images: int = 60_000, people: int = 150_130, seed: int = 0) -> Path:
    """Write the file set described in the module docstring; returns the annotation file."""
    out = Path(out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    source = out / "one.jpg"
    pixels = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source, quality=90)
    names = [f"{i:06d}.jpg" for i in range(1, images + 1)]
    for name in names:
        target = image_dir / name
        if not target.exists():
            os.link(source, target)
    anns = []
    n_kpless, n_crowd = int(KEYPOINTLESS * people), int(CROWD * people)
    owner = rng.integers(1, images + 1, people + n_kpless + n_crowd)
    for k, image_id in enumerate(owner.tolist()):
        ann = {"id": k + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0}
        if k < people:
            vis = rng.integers(0, 3, 17)
            vis[rng.integers(0, 17)] = 2                         # at least one labelled joint
            xs, ys = rng.integers(0, WIDTH, 17), rng.integers(0, HEIGHT, 17)
            kpts = np.stack([xs * (vis > 0), ys * (vis > 0), vis], 1)
            ann.update(keypoints=kpts.ravel().tolist(), num_keypoints=int((vis > 0).sum()),
                       segmentation=_polygon(rng))
        elif k < people + n_kpless:
            ann.update(keypoints=[0] * 51, num_keypoints=0, segmentation=_polygon(rng))
        else:
            ann.update(keypoints=[0] * 51, num_keypoints=0, iscrowd=1, segmentation=_crowd_rle(rng))
        ann.update(area=1000.0, bbox=[10.0, 10.0, 50.0, 100.0])
        anns.append(ann)
    data = {"images": [{"id": i + 1, "file_name": name, "width": WIDTH, "height": HEIGHT}
                       for i, name in enumerate(names)],
            "annotations": anns,
            "categories": [{"id": 1, "name": "person", "supercategory": "person",
                            "keypoints": [f"j{j}" for j in range(17)], "skeleton": []}]}
    ann_file = out / "annotations.json"
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return ann_file


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--people", type=int, default=150_130)
    args = parser.parse_args()
    path = write_coco_sized(args.out, args.images, args.people)
    print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB")
