"""Top-down person crops for PNFS (§IV-A): boxes, the crop affine, augmentation, targets, Dataset.

One sample is one person box of one image, warped to a ``W x H`` crop
(``384 x 288`` in PNFS's COCO experiments; ``256 x 192`` too):

* the box ``[x, y, w, h]`` (COCO ``bbox``) is widened or heightened about its
  centre to the crop's aspect ratio ``W / H`` and then padded by 1.25
  (:func:`box_to_center_size`, as common top-down code does);
* training draws a scale ``s ~ U[0.7, 1.3]`` of the box size, a rotation
  ``r ~ U[-45, 45]`` degrees and a horizontal flip with probability 1/2 (PNFS
  §IV-A); a flipped sample's joints are renamed with the COCO flip pairs;
* targets are Gaussian score maps at 1/4 of the crop with a per-joint
  visibility weight (1 for a labelled joint, ``v > 0``, whose heatmap cell lies
  inside the map; else 0).

Coordinates. Pixel centres sit at integer coordinates (as in the rest of
threempose). The crop matrix maps the box centre to the crop centre
``((W - 1) / 2, (H - 1) / 2)`` and the padded box's width onto the crop's ``W``
pixels. A crop pixel ``x`` sits at heatmap coordinate ``(x + 0.5) / stride - 0.5``
(each heatmap cell is the centre of its ``stride x stride`` block of crop
pixels); with this convention a horizontally flipped heatmap is exactly the
heatmap of the flipped crop, so flip test needs no shift.

Data sources: any COCO person-keypoints annotation file plus its image folder,
e.g. COCO train2017/val2017 or the embedded synthetic set's files. Training and
``boxes="gt"`` evaluation use the annotated person boxes (not crowd, at least
``min_keypoints`` labelled joints); evaluation can instead use a COCO detection
results file (``[{"image_id", "category_id", "bbox", "score"}, ...]``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from threempose.config import TopDownConfig
from threempose.data.augment import normalize
from threempose.data.coco_schema import check_keypoint_annotations
from threempose.data.image_io import ImageReadError, read_image
from threempose.data.keypoints import NUM_JOINTS, flip_index
from threempose.data.targets import render_heatmaps, target_cells
from threempose.util.errors import UserError
from threempose.util.files import read_json_file


class TopDownDataError(UserError, ValueError):
    """An annotation, detection or image file is malformed or unusable for top-down crops."""


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #
def box_to_center_size(box: Any, aspect_ratio: float, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """Centre and padded size of a person box, fixed to the crop's aspect ratio.

    Args:
        box: ``[x, y, w, h]`` (COCO ``bbox``: top-left corner and size, pixels).
        aspect_ratio: crop ``W / H``.
        padding: factor applied to both sides after the aspect fix.
    Returns:
        ``center`` float64 ``[2]`` = ``(x + w/2, y + h/2)``; ``size`` float64 ``[2]``
        ``(w', h')`` with ``w' / h' = aspect_ratio``: the shorter side (relative to
        the aspect ratio) is lengthened, then both are multiplied by ``padding``.
    """
    x, y, w, h = (float(v) for v in box)
    center = np.array([x + 0.5 * w, y + 0.5 * h])
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h]) * padding


def crop_matrix(center: Any, size: Any, out_width: int, out_height: int,
                rotation: float = 0.0, flip: bool = False) -> np.ndarray:
    """The affine from image pixels to crop pixels.

    ``crop = Flip . T(crop centre) . R(rotation) . S(out_width / size_w) . T(-center)``:
    the box centre lands on ``((W - 1) / 2, (H - 1) / 2)``; a box of ``size`` (aspect
    ``W / H``) fills the crop; ``rotation`` turns the image counter-clockwise on screen
    by that many degrees about the box centre; ``flip`` mirrors the crop (``x -> W - 1 - x``).

    Args:
        center: ``[2]`` box centre (image pixels); size: ``[2]`` box ``(w, h)``.
    Returns:
        float64 ``[2, 3]``.
    """
    zoom = out_width / float(size[0])
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    linear = zoom * np.array([[c, s], [-s, c]])
    crop_center = np.array([(out_width - 1) / 2.0, (out_height - 1) / 2.0])
    matrix = np.concatenate([linear, (crop_center - linear @ np.asarray(center, float))[:, None]], axis=1)
    if flip:
        mirror = np.array([[-1.0, 0.0, out_width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        matrix = (mirror @ np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    return matrix


def invert_matrix(matrix: Any) -> np.ndarray:
    """The inverse of a float ``[2, 3]`` affine (crop -> image for a crop matrix), ``[2, 3]``."""
    full = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def transform_points(points: Any, matrix: Any) -> np.ndarray:
    """Apply a ``[2, 3]`` affine to points ``[..., 2]``; returns float64 ``[..., 2]``."""
    points = np.asarray(points, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def crop_to_heatmap(points: Any, stride: int) -> np.ndarray:
    """Crop pixel ``x`` -> heatmap coordinate ``(x + 0.5) / stride - 0.5`` (any shape)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) / stride - 0.5


def heatmap_to_crop(points: Any, stride: int) -> np.ndarray:
    """Heatmap coordinate ``u`` -> crop pixel ``(u + 0.5) * stride - 0.5`` (any shape)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * stride - 0.5


def warp_crop(image: Image.Image, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear warp of an RGB image into a ``width x height`` crop (0 outside the image).

    Args:
        image: PIL RGB image; matrix: float64 ``[2, 3]`` image -> crop pixels.
    Returns:
        uint8 ``[height, width, 3]``; crop pixel ``(u, v)`` samples the image at
        ``invert_matrix(matrix) @ (u, v, 1)``.
    """
    inverse = invert_matrix(matrix)
    # Pillow samples output pixel (u, v) at input (a (u + .5) + b (v + .5) + c) - .5 per axis.
    offset = inverse[:, 2] + 0.5 - 0.5 * inverse[:, :2].sum(axis=1)
    coefficients = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    out = image.transform((width, height), Image.Transform.AFFINE, coefficients,
                          resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.array(out)


def heatmap_targets(joints: np.ndarray, cfg: TopDownConfig) -> tuple[Tensor, Tensor]:
    """Gaussian score-map targets and visibility weights for one person in a crop.

    Args:
        joints: ``[17, 3]`` (x, y, visibility) in crop pixels.
        cfg: ``heatmap_stride``, ``sigma``, crop size.
    Returns:
        ``target`` float32 ``[17, h, w]`` (peak 1 at the joint's sub-pixel heatmap
        position, 0 for weight-0 joints); ``weight`` float32 ``[17]``: 1 where the
        joint is labelled (``v > 0``) and its nearest heatmap cell is inside the map.
    """
    height, width = cfg.heatmap_size
    points = torch.as_tensor(joints, dtype=torch.float64).clone()
    points[:, :2] = torch.from_numpy(crop_to_heatmap(points[:, :2].numpy(), cfg.heatmap_stride))
    target = render_heatmaps(points[None, None], height, width, cfg.sigma)[0]
    _, _, valid = target_cells(points, height, width)
    return target, valid.float()


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #
def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return read_json_file(path, TopDownDataError, f"{what} file")


def read_person_keypoints(path: str | Path) -> dict:
    """Load and check a COCO person-keypoints annotation file.

    Returns:
        ``{"images": {id: image dict}, "annotations": {image id: [person annotation, ...]},
        "category_id": int}`` holding only the person-keypoints category's annotations.
    Raises:
        FileNotFoundError naming ``path``; TopDownDataError naming ``path``, the entry and
        the rule when it is not a COCO person-keypoints file
        (:func:`threempose.data.coco_schema.check_keypoint_annotations`) or a person has no box.
    """
    path = Path(path)
    data = _read_json(path, "annotation")
    category_id = check_keypoint_annotations(data, str(path), NUM_JOINTS, error=TopDownDataError)
    images = {img["id"]: img for img in data["images"]}
    people: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for i, ann in enumerate(data["annotations"]):
        if ann["category_id"] != category_id:
            continue
        if "bbox" not in ann:       # the shared check validates a bbox where there is one
            raise TopDownDataError(f"{path}: annotations[{i}] (id {ann.get('id')}) has no 'bbox' "
                                   "[x, y, w, h]; top-down crops need person boxes")
        people[ann["image_id"]].append(ann)
    return {"images": images, "annotations": people, "category_id": category_id}


def read_detections(path: str | Path, images: dict, threshold: float = 0.0,
                    category_id: int = 1) -> list[dict]:
    """Person boxes from a COCO detection results file.

    Args:
        path: JSON list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
        images: the annotation file's ``{id: image}`` (every image_id must be one of them).
        threshold: detections scoring below it are dropped.
        category_id: only detections of this category (the person category) are kept.
    Returns:
        ``[{"image_id", "bbox", "score"}, ...]`` in file order.
    """
    path = Path(path)
    entries = _read_json(path, "detection results")
    if not isinstance(entries, list):
        raise TopDownDataError(f"{path}: detection results must be a JSON list of "
                               "{image_id, category_id, bbox, score} objects")
    boxes = []
    for i, det in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(det, dict) or not all(k in det for k in ("image_id", "bbox", "score")):
            raise TopDownDataError(f"{where} lacks one of image_id, bbox, score")
        if det["image_id"] not in images:
            raise TopDownDataError(f"{where}: image_id {det['image_id']!r} is not an image of the "
                                   "annotation file")
        if not (isinstance(det["bbox"], list) and len(det["bbox"]) == 4 and all(map(_is_number, det["bbox"]))):
            raise TopDownDataError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {det['bbox']!r}")
        if not _is_number(det["score"]):
            raise TopDownDataError(f"{where}: 'score' must be a number, got {det['score']!r}")
        if det.get("category_id", category_id) != category_id or det["score"] < threshold:
            continue
        boxes.append({"image_id": det["image_id"], "bbox": [float(v) for v in det["bbox"]],
                      "score": float(det["score"])})
    return boxes


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clip_box(box: list, width: int, height: int) -> Optional[list[float]]:
    """``box`` clipped to the image ``[0, width] x [0, height]``; None when nothing is left."""
    x1, y1 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x2 = min(float(width), float(box[0]) + float(box[2]))
    y2 = min(float(height), float(box[1]) + float(box[3]))
    return [x1, y1, x2 - x1, y2 - y1] if x2 > x1 and y2 > y1 else None


def _annotated_people(people: dict[int, list[dict]], min_keypoints: int) -> list[dict]:
    """``{"image_id", "bbox", "score": 1, "keypoints"}`` of every non-crowd person with at
    least ``min_keypoints`` labelled joints, in file order."""
    return [{"image_id": ann["image_id"], "bbox": ann["bbox"], "score": 1.0, "keypoints": ann["keypoints"]}
            for anns in people.values() for ann in anns
            if not ann.get("iscrowd", 0) and sum(1 for v in ann["keypoints"][2::3] if v > 0) >= min_keypoints]


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #
class TopDownCocoDataset(Dataset):
    """Person crops of a COCO person-keypoints file (COCO or the synthetic set).

    Args:
        annotation_file: COCO person-keypoints JSON.
        image_dir: folder holding the images' ``file_name``.
        cfg: crop size, augmentation and target settings.
        train: draw PNFS augmentation (otherwise the plain box crop).
        detections: a COCO detection results file; its person boxes (score >=
            ``cfg.detection_threshold``) replace the annotated ones (evaluation).
        seed: the augmentation of sample ``i`` in epoch ``e`` is drawn from
            ``numpy.random.default_rng([seed, e, i])``, independent of workers and order.

    A sample is a dict: ``image`` float32 ``[3, H, W]`` (ImageNet-normalised);
    ``target`` float32 ``[17, h, w]``; ``target_weight`` float32 ``[17]``; ``joints``
    float32 ``[17, 3]`` (crop pixels, renamed when flipped; zeros for detections);
    ``matrix`` float64 ``[2, 3]`` image -> crop; ``flipped`` bool; ``image_id`` int;
    ``box`` float64 ``[4]``; ``box_score`` float (1 for annotated boxes); ``area``
    float (padded box area, image pixels^2, used by OKS-NMS).
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, cfg: TopDownConfig,
                 train: bool = True, detections: str | Path | None = None, seed: int = 0) -> None:
        if detections is not None and train:
            raise ValueError("TopDownCocoDataset: detection boxes are for evaluation; pass train=False")
        self.cfg, self.train, self.seed, self.epoch = cfg, train, seed, 0
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        coco = read_person_keypoints(self.annotation_file)
        self.images = coco["images"]
        if detections is not None:
            boxes = read_detections(detections, self.images, cfg.detection_threshold, coco["category_id"])
            candidates = [dict(box, keypoints=None) for box in boxes]
        else:
            candidates = _annotated_people(coco["annotations"], cfg.min_keypoints)
        self.samples = []
        for candidate in candidates:
            image = self.images[candidate["image_id"]]
            box = _clip_box(candidate["bbox"], image["width"], image["height"])
            if box is not None:
                self.samples.append(dict(candidate, bbox=box))
        if not self.samples:
            source = detections if detections is not None else self.annotation_file
            raise TopDownDataError(f"{source}: no usable person box (non-crowd, positive size inside "
                                   f"the image, >= {cfg.min_keypoints} labelled keypoints for annotations)")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _load_image(self, image_id: int) -> Image.Image:
        path = self.image_dir / self.images[image_id]["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (image_id {image_id} of "
                                    f"{self.annotation_file})")
        try:
            return read_image(path)
        except ImageReadError as e:
            raise TopDownDataError(f"{path}: cannot decode image: {e.reason}") from None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key``: an index (augmented as in the epoch of :meth:`set_epoch`) or an
        ``(index, epoch)`` pair, as :class:`threempose.data.sampler.EpochSampler` yields."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        sample = self.samples[index]
        keypoints = None
        if sample["keypoints"] is not None:
            keypoints = np.asarray(sample["keypoints"], dtype=np.float64).reshape(NUM_JOINTS, 3)
        crop = person_crop(self._load_image(sample["image_id"]), sample["bbox"], keypoints, flip_index(),
                           self.cfg, augmentation_draw(self.cfg, self.train, self.seed, epoch, index))
        return {**crop, "image_id": sample["image_id"], "box_score": sample["score"]}


def augmentation_draw(cfg: TopDownConfig, train: bool, seed: int, epoch: int, index: int) -> tuple[float, float, bool]:
    """``(scale, rotation, flip)`` of sample ``index`` in ``epoch`` (PNFS §IV-A): drawn from
    ``numpy.random.default_rng([seed, epoch, index])``; ``(1, 0, False)`` when not ``train``."""
    if not train:
        return 1.0, 0.0, False
    rng = np.random.default_rng([seed, epoch, index])
    scale, rotation, coin = rng.uniform(cfg.scale_min, cfg.scale_max), rng.uniform(-1, 1), rng.random()
    return float(scale), float(rotation * cfg.rotation), bool(cfg.flip and coin < 0.5)


def person_crop(image: Image.Image, box: Any, keypoints: Optional[np.ndarray], flip_perm: list[int],
                cfg: TopDownConfig, augmentation: tuple[float, float, bool]) -> dict[str, Any]:
    """One person's training / evaluation crop, the part of a sample both data sets share.

    Args:
        image: the whole image; box: ``[x, y, w, h]`` (image pixels).
        keypoints: ``[J, 3]`` (x, y, visibility) in image pixels, or None (a detection: zeros).
        flip_perm: the data set's left/right permutation of its ``J`` joints.
        augmentation: ``(scale, rotation, flip)`` (:func:`augmentation_draw`).
    Returns:
        ``image`` float32 ``[3, H, W]`` (ImageNet-normalised), ``target`` ``[J, h, w]``,
        ``target_weight`` ``[J]``, ``joints`` ``[J, 3]`` (crop pixels, renamed when flipped),
        ``matrix`` float64 ``[2, 3]`` image -> crop, ``flipped``, ``box`` float64 ``[4]``,
        ``area`` (padded box area, image pixels^2).
    """
    scale, rotation, flip = augmentation
    center, size = box_to_center_size(box, cfg.input_width / cfg.input_height, cfg.box_padding)
    matrix = crop_matrix(center, size * scale, cfg.input_width, cfg.input_height, rotation, flip)
    crop = warp_crop(image, matrix, cfg.input_width, cfg.input_height)
    joints = np.zeros((len(flip_perm), 3))
    if keypoints is not None:
        joints = np.concatenate([transform_points(keypoints[:, :2], matrix), keypoints[:, 2:]], axis=1)
        if flip:
            joints = joints[flip_perm]
    target, weight = heatmap_targets(joints, cfg)
    return {
        "image": normalize(torch.from_numpy(crop).permute(2, 0, 1)),
        "target": target,
        "target_weight": weight,
        "joints": torch.from_numpy(joints).float(),
        "matrix": torch.from_numpy(matrix),
        "flipped": flip,
        "box": torch.tensor(box, dtype=torch.float64),
        "area": float(size[0] * size[1]),
    }
