"""The embedded synthetic data set: stick figures in COCO person-keypoints format.

Usage::

    python -m threempose.data.synthetic --out DIR --images 64 --seed 0 \\
        [--min-size 256 --max-size 640 --max-people 4]

    splits = ensure_synthetic(cfg.data.synthetic)   # cached train + val splits

``DIR/images/000001.jpg ...`` and ``DIR/annotations.json`` (COCO keys; one
category, :data:`~threempose.data.keypoints.COCO_PERSON_CATEGORY`); with ``--format mpii``
(``data.synthetic.format: "mpii"``) also ``DIR/mpii.json``, the same people in the common JSON
form of the MPII annotations (:func:`mpii_people`: 16 joints, MPII release order). Each image
has a random size in ``[min_size, max_size]`` per side and a textured, washed-out
background with grey distractor shapes. On it, 0..max_people front-facing stick
figures (the person's left on the image's right) of random size, position, lean
and limb angles: limbs as thick bars (the person's left side bluish, right side
orange), a head disc, and a dot of a distinct saturated colour
(:data:`JOINT_COLORS`) on each of the 17 joints. Keypoints are integer pixel
positions of the dot centres; ``v = 2`` where the dot's centre is seen, ``1``
where a later figure or an occluder covers it, ``0`` (and x = y = 0) outside the
image. Sometimes also: tiny figures annotated with ``num_keypoints == 0`` (as
COCO does for small people), occluding grey boxes, and a crowd region (a blob of
tiny figures, ``iscrowd = 1``, uncompressed-RLE segmentation). People's
segmentations are polygons (limb bars, torso, head), clipped to the image.

Output is byte-identical for the same arguments: image ``i`` is drawn from
``numpy.random.default_rng([seed, i])``, JPEGs are written with fixed quality
and no chroma subsampling, and every file is written atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy.spatial import ConvexHull
from tqdm import tqdm

from threempose.config import SyntheticConfig
from threempose.data.keypoints import COCO_PERSON_CATEGORY, NUM_JOINTS
from threempose.util.cli import entry_point
from threempose.util.files import atomic_open, atomic_write_json, staged_dir

GENERATOR_VERSION = 2          # bump when the drawing changes, so caches are rebuilt
JPEG_QUALITY = 95
ANNOTATION_FILE = "annotations.json"
MPII_ANNOTATION_FILE = "mpii.json"
IMAGE_DIR = "images"

# One saturated colour per COCO joint (RGB); left and right of a pair differ.
JOINT_COLORS = (
    (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 120, 255), (255, 120, 0),
    (0, 0, 255), (255, 0, 0), (0, 200, 0), (150, 0, 255), (0, 255, 140), (255, 0, 120),
    (0, 110, 110), (130, 0, 0), (150, 255, 0), (255, 110, 180), (0, 0, 120), (130, 120, 0),
)
_LEFT_LIMB, _RIGHT_LIMB = (90, 140, 220), (220, 140, 90)
_SKIN = ((224, 190, 160), (190, 140, 100), (140, 95, 60), (95, 65, 45))

# Joint indices (COCO order).
_NOSE, _L_EYE, _R_EYE, _L_EAR, _R_EAR = 0, 1, 2, 3, 4
_L_SHOULDER, _R_SHOULDER, _L_ELBOW, _R_ELBOW, _L_WRIST, _R_WRIST = 5, 6, 7, 8, 9, 10
_L_HIP, _R_HIP, _L_KNEE, _R_KNEE, _L_ANKLE, _R_ANKLE = 11, 12, 13, 14, 15, 16
_LEGS = ((_L_HIP, _L_KNEE), (_L_KNEE, _L_ANKLE), (_R_HIP, _R_KNEE), (_R_KNEE, _R_ANKLE))
_ARMS = ((_L_SHOULDER, _L_ELBOW), (_L_ELBOW, _L_WRIST), (_R_SHOULDER, _R_ELBOW), (_R_ELBOW, _R_WRIST))
_LEFT_JOINTS = frozenset((_L_SHOULDER, _L_ELBOW, _L_WRIST, _L_HIP, _L_KNEE, _L_ANKLE))


@dataclass(frozen=True)
class SyntheticSplits:
    """Paths of the generated train and val splits (image folders and annotation files)."""

    root: Path
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path

    def mpii_annotations(self, split: str) -> Path:
        """``<split>/mpii.json``: the MPII-form file of ``split`` (``format: "mpii"`` sets only)."""
        return self.root / split / MPII_ANNOTATION_FILE


@dataclass
class _Figure:
    """A stick figure in image coordinates."""

    joints: np.ndarray              # int64 [17, 2] dot centres (x, y)
    parts: list[tuple[np.ndarray, tuple[int, int, int]]]   # (polygon [k, 2], colour), in drawing order
    dot_radius: int
    face_radius: int


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #
def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    """Rotate ``[..., 2]`` vectors by ``angle`` radians (counter-clockwise on screen, y down)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * v[..., 0] + s * v[..., 1], -s * v[..., 0] + c * v[..., 1]], axis=-1)


def _bar(p: np.ndarray, q: np.ndarray, width: float) -> np.ndarray:
    """The rectangle ``[4, 2]`` of a limb of ``width`` from ``p`` to ``q``."""
    d = q - p
    n = np.array([-d[1], d[0]]) / max(float(np.hypot(*d)), 1e-6) * width / 2
    return np.stack([p + n, q + n, q - n, p - n])


def _disc(centre: np.ndarray, radius: float, sides: int = 16) -> np.ndarray:
    a = np.arange(sides) * 2 * math.pi / sides
    return centre + radius * np.stack([np.cos(a), np.sin(a)], axis=-1)


def _clip_polygon(poly: np.ndarray, width: int, height: int) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex polygon ``[k, 2]`` to ``[0, width] x [0, height]``."""
    pts = [tuple(p) for p in poly]
    for axis, bound, keep_above in ((0, 0.0, True), (0, float(width), False),
                                    (1, 0.0, True), (1, float(height), False)):
        inside = (lambda p: p[axis] >= bound) if keep_above else (lambda p: p[axis] <= bound)
        out = []
        for k, cur in enumerate(pts):
            prev = pts[k - 1]
            if inside(cur) != inside(prev):
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if inside(cur):
                out.append(cur)
        pts = out
        if not pts:
            break
    return np.asarray(pts, np.float64).reshape(-1, 2)


def _make_figure(rng: np.random.Generator, height: float, pelvis: np.ndarray) -> _Figure:
    """A front-facing figure ``height`` pixels tall with its pelvis at ``pelvis``."""
    h = height
    lean = rng.normal(0.0, 0.08)
    j = np.zeros((NUM_JOINTS, 2))
    neck = _rotate(np.array([0.0, -0.30 * h]), lean)
    shoulder = 0.11 * h * rng.uniform(0.85, 1.1)
    j[_L_SHOULDER] = neck + _rotate(np.array([shoulder, 0.02 * h]), lean)
    j[_R_SHOULDER] = neck + _rotate(np.array([-shoulder, 0.02 * h]), lean)
    j[_L_HIP], j[_R_HIP] = (0.075 * h, 0.0), (-0.075 * h, 0.0)
    head = neck + _rotate(np.array([0.0, -0.11 * h]), lean + rng.normal(0.0, 0.12))
    head_r = 0.07 * h
    yaw = rng.uniform(-0.4, 0.4)
    j[_NOSE] = head + (yaw * 0.04 * h, 0.015 * h)
    j[_L_EYE] = head + ((0.028 + yaw * 0.035) * h, -0.012 * h)
    j[_R_EYE] = head + ((-0.028 + yaw * 0.035) * h, -0.012 * h)
    j[_L_EAR] = head + ((0.066 + yaw * 0.01) * h, 0.0)
    j[_R_EAR] = head + ((-0.066 + yaw * 0.01) * h, 0.0)
    for side, (s, e, w) in ((1.0, (_L_SHOULDER, _L_ELBOW, _L_WRIST)),
                            (-1.0, (_R_SHOULDER, _R_ELBOW, _R_WRIST))):
        upper = rng.uniform(-0.3, 2.4)                 # radians from hanging down, outwards
        fore = upper + rng.uniform(-1.8, 1.2)
        j[e] = j[s] + 0.17 * h * np.array([side * math.sin(upper), math.cos(upper)])
        j[w] = j[e] + 0.15 * h * np.array([side * math.sin(fore), math.cos(fore)])
    for side, (hp, k, a) in ((1.0, (_L_HIP, _L_KNEE, _L_ANKLE)), (-1.0, (_R_HIP, _R_KNEE, _R_ANKLE))):
        thigh = rng.uniform(-0.15, 0.6)
        shin = thigh + rng.uniform(-0.5, 0.3)
        j[k] = j[hp] + 0.24 * h * np.array([side * math.sin(thigh), math.cos(thigh)])
        j[a] = j[k] + 0.23 * h * np.array([side * math.sin(shin), math.cos(shin)])
    turn = float(np.clip(rng.normal(0.0, 0.2), -0.6, 0.6))
    j = _rotate(j, turn) + pelvis
    head = _rotate(head, turn) + pelvis
    neck = _rotate(neck, turn) + pelvis

    limb_w = max(2.0, 0.05 * h)
    jitter = rng.integers(-25, 26, 3)
    left = tuple(int(c) for c in np.clip(np.array(_LEFT_LIMB) + jitter, 0, 255))
    right = tuple(int(c) for c in np.clip(np.array(_RIGHT_LIMB) + jitter, 0, 255))
    cloth = tuple(int(c) for c in rng.integers(60, 200, 3))
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    parts = [(_bar(j[a], j[b], limb_w), left if a in _LEFT_JOINTS else right) for a, b in _LEGS]
    parts.append((j[[_L_SHOULDER, _R_SHOULDER, _R_HIP, _L_HIP]], cloth))
    parts.append((_bar(neck, head, limb_w), skin))
    parts += [(_bar(j[a], j[b], limb_w), left if a in _LEFT_JOINTS else right) for a, b in _ARMS]
    parts.append((_disc(head, head_r), skin))
    return _Figure(joints=np.rint(j).astype(np.int64), parts=parts,
                   dot_radius=max(2, round(0.022 * h)), face_radius=max(2, round(0.015 * h)))


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #
def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A washed-out texture: tinted base, smooth blobs, optional stripes, grain, grey shapes."""
    base = rng.uniform(50, 210) + rng.uniform(-25, 25, 3)
    gw, gh = (int(v) for v in rng.integers(2, 8, 2))
    blobs = np.clip(rng.normal(0, 35, (gh, gw, 3)) + 128, 0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(blobs).resize((width, height), Image.Resampling.BILINEAR), np.float64)
    img = img - 128 + base
    if rng.random() < 0.5:
        angle, period, phase = rng.uniform(0, math.pi), rng.uniform(8, 40), rng.uniform(0, 2 * math.pi)
        y, x = np.mgrid[0:height, 0:width]
        stripes = np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period + phase)
        img = img + rng.uniform(10, 30) * stripes[..., None]
    img = img + rng.normal(0, 5, (height, width, 1))
    lum = img.mean(axis=-1, keepdims=True)
    img = np.clip(lum + 0.35 * (img - lum), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 8))):
        x0, x1 = sorted(rng.uniform(0, width, 2))
        y0, y1 = sorted(rng.uniform(0, height, 2))
        grey = int(rng.integers(30, 230))
        fill = tuple(int(np.clip(grey + d, 0, 255)) for d in rng.integers(-15, 16, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
    return canvas


def _draw_figure(draw: ImageDraw.ImageDraw, fig: _Figure,
                 labels: Optional[ImageDraw.ImageDraw] = None, first_code: int = 0) -> None:
    """Draw ``fig``; on ``labels`` (an int32 canvas) write 0 under its body and
    ``first_code + j`` under joint ``j``'s dot, so later drawings reveal occlusion."""
    for poly, colour in fig.parts:
        xy = [tuple(p) for p in poly]
        draw.polygon(xy, fill=colour)
        if labels is not None:
            labels.polygon(xy, fill=0)
    for j, (x, y) in enumerate(fig.joints.tolist()):
        r = fig.face_radius if j <= _R_EAR else fig.dot_radius
        box = [x - r, y - r, x + r, y + r]
        draw.ellipse(box, fill=JOINT_COLORS[j], outline=(0, 0, 0) if r >= 3 else None)
        if labels is not None:
            labels.ellipse(box, fill=first_code + j)


def _silhouette_annotation(polys: Sequence[np.ndarray], width: int, height: int) -> Optional[dict]:
    """Segmentation, area and bbox of a figure's silhouette (None if it is off the image).

    The silhouette is the convex hull of the figure's drawn parts, clipped to the image. A
    stick figure's strokes cover far less than a real body of the same size, and COCO's OKS
    scales its tolerance with the segment area (COCO's person areas are whole silhouettes);
    with the strokes' own area, a 1-pixel error on an eye would already score OKS ~0.
    """
    points = np.concatenate(polys)
    clipped = _clip_polygon(points[ConvexHull(points).vertices], width, height)
    if len(clipped) < 3:
        return None
    segmentation = [[round(float(v), 2) for v in clipped.reshape(-1)]]
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    area = float(mask_utils.area(rle))
    if area == 0:
        return None
    return {"segmentation": segmentation, "area": area,
            "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)]}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a 0/1 ``[H, W]`` mask (column-major runs, starting with 0s)."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _draw_image(rng: np.random.Generator, image_id: int, min_size: int, max_size: int,
                max_people: int) -> tuple[Image.Image, list[dict]]:
    """One image and its annotations (without ``id``) from ``rng``."""
    width, height = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    canvas = _background(rng, width, height)
    draw = ImageDraw.Draw(canvas)
    anns: list[dict] = []
    no_keypoints = {"keypoints": [0] * (3 * NUM_JOINTS), "num_keypoints": 0}
    num_people = int(rng.integers(0, max_people + 1))
    if num_people and rng.random() < 0.2:                        # a crowd: a blob of tiny figures
        centre = rng.uniform([0.2 * width, 0.3 * height], [0.8 * width, 0.8 * height])
        radii = rng.uniform([0.1 * width, 0.06 * height], [0.2 * width, 0.12 * height])
        region = Image.new("L", (width, height), 0)
        region_draw = ImageDraw.Draw(region)
        region_draw.ellipse([*(centre - radii), *(centre + radii)], fill=1)
        for _ in range(int(rng.integers(6, 15))):
            offset = _rotate(np.array([rng.uniform(0, 0.8), 0.0]), rng.uniform(0, 2 * math.pi)) * radii
            fig = _make_figure(rng, rng.uniform(12, 28), centre + offset)
            _draw_figure(draw, fig)
            for poly, _ in fig.parts:
                region_draw.polygon([tuple(p) for p in poly], fill=1)
        crowd = np.asarray(region, np.uint8)
        rle = _uncompressed_rle(crowd)
        encoded = mask_utils.frPyObjects(rle, height, width)
        anns.append({"image_id": image_id, "category_id": 1, "iscrowd": 1, "segmentation": rle,
                     "area": float(crowd.sum()), "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
                     **no_keypoints})
    if num_people and rng.random() < 0.3:                        # small people, not keypoint-labelled
        for _ in range(int(rng.integers(1, 3))):
            fig = _make_figure(rng, rng.uniform(10, 20), rng.uniform([0, 0], [width, height]))
            _draw_figure(draw, fig)
            seg = _silhouette_annotation([p for p, _ in fig.parts], width, height)
            if seg is not None:
                anns.append({"image_id": image_id, "category_id": 1, "iscrowd": 0, **seg, **no_keypoints})
    label_img = Image.new("I", (width, height), 0)
    labels = ImageDraw.Draw(label_img)
    figures = []
    for k in range(num_people):
        fig_h = math.exp(rng.uniform(math.log(0.35), math.log(0.95))) * height
        pelvis = rng.uniform([0.05 * width, 0.3 * height], [0.95 * width, 0.8 * height])
        fig = _make_figure(rng, fig_h, pelvis)
        _draw_figure(draw, fig, labels, first_code=1 + k * NUM_JOINTS)
        figures.append(fig)
    if num_people and rng.random() < 0.35:                       # occluders
        for _ in range(int(rng.integers(1, 3))):
            w, h = rng.uniform(0.08, 0.25) * width, rng.uniform(0.08, 0.25) * height
            x0, y0 = rng.uniform(-0.5 * w, width - 0.5 * w), rng.uniform(-0.5 * h, height - 0.5 * h)
            grey = int(rng.integers(40, 220))
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=(grey, grey, grey))
            labels.rectangle([x0, y0, x0 + w, y0 + h], fill=0)
    seen = np.asarray(label_img)
    for k, fig in enumerate(figures):
        seg = _silhouette_annotation([p for p, _ in fig.parts], width, height)
        if seg is None:
            continue
        kpts = []
        for j, (x, y) in enumerate(fig.joints.tolist()):
            if 0 <= x < width and 0 <= y < height:
                kpts += [x, y, 2 if seen[y, x] == 1 + k * NUM_JOINTS + j else 1]
            else:
                kpts += [0, 0, 0]
        anns.append({"image_id": image_id, "category_id": 1, "iscrowd": 0, **seg,
                     "keypoints": kpts, "num_keypoints": sum(1 for v in kpts[2::3] if v > 0)})
    return canvas, anns


# --------------------------------------------------------------------------- #
# MPII form
# --------------------------------------------------------------------------- #
# MPII joints (release order: r-ankle, r-knee, r-hip, l-hip, l-knee, l-ankle, pelvis, thorax,
# upper neck, head top, r-wrist, r-elbow, r-shoulder, l-shoulder, l-elbow, l-wrist) that are a
# COCO joint; the other four (6-9) are built from COCO joints in :func:`mpii_people`.
_MPII_FROM_COCO = {0: _R_ANKLE, 1: _R_KNEE, 2: _R_HIP, 3: _L_HIP, 4: _L_KNEE, 5: _L_ANKLE, 10: _R_WRIST,
                   11: _R_ELBOW, 12: _R_SHOULDER, 13: _L_SHOULDER, 14: _L_ELBOW, 15: _L_WRIST}


def mpii_people(images: Sequence[dict], annotations: Sequence[dict]) -> list[dict]:
    """The keypoint-labelled people of a COCO-form synthetic split in the MPII JSON form.

    One entry per non-crowd person with its two ears, shoulders and hips labelled::

        {"image": file name, "joints": [[x, y] x 16], "joints_vis": [0/1 x 16],
         "center": [x, y], "scale": s, "headbox": [[x1, y1], [x2, y2]]}

    The twelve limb joints are the COCO ones; pelvis and thorax are the midpoints of the hips
    and shoulders; the head is the disc whose centre is the ears' midpoint and whose radius
    is half their distance: head top and upper neck are its points farthest from and nearest
    to the thorax, the head box its bounding square. ``center`` is the person box's centre and
    ``scale`` its larger side / 200 (MPII's person scale is a height in units of 200 px). An
    unlabelled joint is ``[0, 0]`` with ``joints_vis`` 0.
    """
    names = {im["id"]: im["file_name"] for im in images}
    people = []
    for ann in annotations:
        if ann.get("iscrowd", 0) or not ann.get("num_keypoints"):
            continue
        k = np.asarray(ann["keypoints"], np.float64).reshape(NUM_JOINTS, 3)
        needed = (_L_EAR, _R_EAR, _L_SHOULDER, _R_SHOULDER, _L_HIP, _R_HIP)
        if (k[list(needed), 2] == 0).any():
            continue
        joints, vis = np.zeros((16, 2)), np.zeros(16, np.int64)
        for m, c in _MPII_FROM_COCO.items():
            if k[c, 2] > 0:
                joints[m], vis[m] = k[c, :2], 1
        centre = (k[_L_EAR, :2] + k[_R_EAR, :2]) / 2
        radius = max(float(np.linalg.norm(k[_L_EAR, :2] - k[_R_EAR, :2])) / 2, 1.0)
        thorax = (k[_L_SHOULDER, :2] + k[_R_SHOULDER, :2]) / 2
        up = centre - thorax
        up = up / max(float(np.linalg.norm(up)), 1e-6)
        joints[6], joints[7] = (k[_L_HIP, :2] + k[_R_HIP, :2]) / 2, thorax
        joints[8], joints[9] = centre - radius * up, centre + radius * up
        vis[6:10] = 1
        x, y, w, h = ann["bbox"]
        people.append({"image": names[ann["image_id"]], "joints": np.round(joints, 2).tolist(),
                       "joints_vis": vis.tolist(), "center": [x + w / 2, y + h / 2], "scale": max(w, h) / 200,
                       "headbox": np.round([centre - radius, centre + radius], 2).tolist()})
    return people


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
def generate(out_dir: str | Path, num_images: int, seed: int, min_size: int = 256,
             max_size: int = 640, max_people: int = 4, progress: bool = False,
             desc: str = "synthetic", mpii: bool = False) -> Path:
    """Write ``num_images`` images to ``out_dir/images`` and ``out_dir/annotations.json``
    (written last; ``mpii``: ``out_dir/mpii.json`` before it, :func:`mpii_people`); returns the
    COCO annotation file."""
    if num_images < 0 or max_people < 0:
        raise ValueError(f"num_images ({num_images}) and max_people ({max_people}) must be >= 0")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    out_dir = Path(out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(num_images), desc=desc, unit="img", disable=not progress):
        image_id = i + 1
        canvas, anns = _draw_image(np.random.default_rng([seed, i]), image_id, min_size, max_size, max_people)
        name = f"{image_id:06d}.jpg"
        with atomic_open(out_dir / IMAGE_DIR / name, "wb") as f:
            canvas.save(f, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        images.append({"id": image_id, "file_name": name, "width": canvas.width, "height": canvas.height})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, **ann})
    info = {"description": "threempose synthetic stick figures", "version": GENERATOR_VERSION,
            "seed": seed, "min_size": min_size, "max_size": max_size, "max_people": max_people}
    if mpii:
        atomic_write_json(out_dir / MPII_ANNOTATION_FILE, mpii_people(images, annotations), indent=None)
    out = out_dir / ANNOTATION_FILE
    atomic_write_json(out, {"info": info, "licenses": [], "images": images, "annotations": annotations,
                            "categories": [COCO_PERSON_CATEGORY]}, indent=None)
    return out


def _split_seed(seed: int, split: str) -> int:
    """Seed of a split, derived from the config seed (train and val differ)."""
    return int(np.random.SeedSequence([seed, {"train": 0, "val": 1}[split]]).generate_state(1)[0])


def settings_hash(cfg: SyntheticConfig) -> str:
    """Cache key: hash of the generation settings and the generator version."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "cache_dir" and not (k == "format" and v == "coco")}
    settings["version"] = GENERATOR_VERSION
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def ensure_synthetic(cfg: SyntheticConfig, progress: bool = True) -> SyntheticSplits:
    """Generate the train and val splits into ``cfg.cache_dir/<settings hash>/`` on
    first use (a temporary folder renamed into place, so an interrupted run is never
    reused) and return their paths; later calls reuse them."""
    root = Path(cfg.cache_dir).expanduser() / settings_hash(cfg)
    splits = SyntheticSplits(root, root / "train" / IMAGE_DIR, root / "train" / ANNOTATION_FILE,
                             root / "val" / IMAGE_DIR, root / "val" / ANNOTATION_FILE)
    if root.is_dir():
        return splits
    try:
        with staged_dir(root) as tmp:
            for split, count in (("train", cfg.train_images), ("val", cfg.val_images)):
                generate(tmp / split, count, _split_seed(cfg.seed, split), cfg.min_size, cfg.max_size,
                         cfg.max_people, progress=progress, desc=f"synthetic {split}", mpii=cfg.format == "mpii")
    except OSError:
        if not root.is_dir():                # not another process that finished first
            raise
    return splits


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: write a synthetic data set into a new folder ``--out``."""
    d = SyntheticConfig()
    p = argparse.ArgumentParser(prog="python -m threempose.data.synthetic",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--images", type=int, default=d.train_images, help="number of images")
    p.add_argument("--seed", type=int, default=d.seed, help="generation seed")
    p.add_argument("--min-size", type=int, default=d.min_size, help="smallest image side (pixels)")
    p.add_argument("--max-size", type=int, default=d.max_size, help="largest image side (pixels)")
    p.add_argument("--max-people", type=int, default=d.max_people, help="most people per image")
    p.add_argument("--format", choices=("coco", "mpii"), default="coco",
                   help="mpii: also write mpii.json (the MPII JSON form, 16 joints)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be >= 1, got {args.images}")
    if args.max_people < 0:
        p.error(f"--max-people must be >= 0, got {args.max_people}")
    if not 16 <= args.min_size <= args.max_size:
        p.error(f"need 16 <= --min-size <= --max-size, got --min-size {args.min_size} "
                f"and --max-size {args.max_size}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        p.error(f"--out {args.out} exists and is not an empty folder; choose a new folder")
    if args.out.is_dir():
        args.out.rmdir()
    with staged_dir(args.out) as tmp:
        generate(tmp, args.images, args.seed, args.min_size, args.max_size, args.max_people, progress=True,
                 mpii=args.format == "mpii")
    print(f"wrote {args.images} images to {args.out / IMAGE_DIR} and annotations to "
          f"{args.out / ANNOTATION_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
