"""MPII person crops for PNFS (PNFS §IV-B: all of Tables II-VI are on MPII).

Annotation file: the common JSON form of the MPII annotations (the conversion HRNet and
SimpleBaseline ship as ``mpii/annot/{train,valid}.json``): a JSON list, one object per person::

    {"image": "015601864.jpg",            # file name in the image folder
     "joints": [[x, y] x 16],              # pixels, MPII release order (threempose.pnfs.pckh.MPII_JOINT_NAMES)
     "joints_vis": [0/1 x 16],             # 1 = annotated
     "center": [x, y], "scale": s,         # person centre; s * 200 px = the person's height
     "headbox": [[x1, y1], [x2, y2]]}      # optional here; PCKh needs it

PNFS footnote 3 numbers MPII's joints head top, upper neck, thorax, l/r shoulder, elbow,
wrist, hip, knee, ankle, pelvis (0-15); :func:`threempose.pnfs.parts.part_groups` maps Table I's
MPII column, written in that numbering, onto the release order used here, so files are read
as they are. The crop box is the square of side ``200 * scale`` around ``center`` (MPII's
convention; HRNet's MPII loader does the same), widened to the crop's aspect ratio and padded
by ``pnfs.topdown.box_padding`` like the COCO boxes.

Bad input (a missing key, a joint count other than 16, ``joints_vis`` of another length, a
non-positive ``scale``) raises :class:`MpiiDataError` naming the file, the entry and the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from threempose.config import TopDownConfig
from threempose.data.image_io import ImageReadError, read_image
from threempose.pnfs.pckh import MPII_FLIP_INDEX, NUM_MPII_JOINTS
from threempose.pnfs.topdown_data import TopDownDataError, augmentation_draw, person_crop
from threempose.util.files import read_json_file

MPII_SCALE_UNIT = 200.0        # MPII's person scale is a height in units of 200 pixels
_REQUIRED = ("image", "joints", "joints_vis", "center", "scale")


class MpiiDataError(TopDownDataError):
    """An MPII annotation file is missing or an entry is malformed."""


def _numbers(value: Any, shape: tuple[int, ...], where: str, key: str, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape or not np.isfinite(array).all():
        got = list(array.shape) if array is not None else "non-numeric values"
        raise MpiiDataError(f"{where}: '{key}' must be {what} (finite numbers of shape {list(shape)}), got {got}")
    return array


def read_mpii_annotations(path: str | Path) -> list[dict[str, Any]]:
    """The people of an MPII JSON file (module docstring), checked.

    Returns:
        one dict per person: ``image`` str, ``joints`` float64 ``[16, 2]``, ``visible`` bool
        ``[16]``, ``center`` float64 ``[2]``, ``scale`` float, ``headbox`` float64 ``[2, 2]`` or None.
    Raises:
        MpiiDataError: missing / unreadable file, not a non-empty list, or a bad entry.
    """
    raw = read_json_file(path, MpiiDataError, "MPII annotation file")
    if not isinstance(raw, list) or not raw:
        raise MpiiDataError(f"{path}: an MPII annotation file must be a non-empty JSON list of people")
    people = []
    for i, entry in enumerate(raw):
        where = f"{path}: person {i}"
        if not isinstance(entry, dict):
            raise MpiiDataError(f"{where} is not a JSON object")
        missing = [k for k in _REQUIRED if k not in entry]
        if missing:
            raise MpiiDataError(f"{where} lacks {', '.join(repr(k) for k in missing)} (an MPII person has "
                                f"{', '.join(_REQUIRED)})")
        if not isinstance(entry["image"], str) or not entry["image"]:
            raise MpiiDataError(f"{where}: 'image' must be a file name, got {entry['image']!r}")
        joints = _numbers(entry["joints"], (NUM_MPII_JOINTS, 2), where, "joints", f"{NUM_MPII_JOINTS} [x, y] pairs")
        visible = _numbers(entry["joints_vis"], (NUM_MPII_JOINTS,), where, "joints_vis",
                           f"{NUM_MPII_JOINTS} flags, one per joint") > 0
        center = _numbers(entry["center"], (2,), where, "center", "[x, y]")
        scale = entry["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
            raise MpiiDataError(f"{where}: 'scale' must be a positive number (person height / 200), got {scale!r}")
        headbox = entry.get("headbox")
        if headbox is not None:
            headbox = _numbers(headbox, (2, 2), where, "headbox", "two corners [[x1, y1], [x2, y2]]")
        people.append({"image": entry["image"], "joints": joints, "visible": visible, "center": center,
                       "scale": float(scale), "headbox": headbox})
    return people


class TopDownMpiiDataset(Dataset):
    """Person crops of an MPII JSON file: the MPII twin of
    :class:`~threempose.pnfs.topdown_data.TopDownCocoDataset`, with the same sample dict and
    augmentation (PNFS §IV-A), 16 joints in MPII release order.

    Args:
        annotation_file: MPII JSON (module docstring).
        image_dir: folder holding the ``image`` files.
        cfg: crop size, augmentation and target settings.
        train: draw PNFS augmentation (otherwise the plain box crop).
        seed: the augmentation of sample ``i`` in epoch ``e`` is drawn from
            ``numpy.random.default_rng([seed, e, i])``.

    A sample: ``image`` float32 ``[3, H, W]``; ``target`` ``[16, h, w]``; ``target_weight``
    ``[16]``; ``joints`` ``[16, 3]`` (crop pixels, visibility); ``matrix`` ``[2, 3]`` image ->
    crop; ``flipped``; ``image_id`` (the person's index in the file); ``box`` ``[4]``;
    ``box_score`` 1.0; ``area`` (padded box area).
    """

    def __init__(self, annotation_file: str | Path, image_dir: str | Path, cfg: TopDownConfig,
                 train: bool = True, seed: int = 0) -> None:
        self.cfg, self.train, self.seed, self.epoch = cfg, train, seed, 0
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.people = read_mpii_annotations(self.annotation_file)
        self.samples = [{"image_id": i, "bbox": self.box(p)} for i, p in enumerate(self.people)]

    @staticmethod
    def box(person: dict[str, Any]) -> list[float]:
        """``[x, y, w, h]``: the square of side ``200 * scale`` around ``center``."""
        side = MPII_SCALE_UNIT * person["scale"]
        (cx, cy) = person["center"]
        return [cx - side / 2, cy - side / 2, side, side]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.people)

    def _load_image(self, name: str) -> Image.Image:
        path = self.image_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path} (named in {self.annotation_file})")
        try:
            return read_image(path)
        except ImageReadError as e:
            raise MpiiDataError(f"{path}: cannot decode image: {e.reason}") from None

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key``: an index (augmented as in the epoch of :meth:`set_epoch`) or an
        ``(index, epoch)`` pair."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        person = self.people[index]
        keypoints = np.concatenate([person["joints"], person["visible"][:, None].astype(np.float64)], axis=1)
        crop = person_crop(self._load_image(person["image"]), self.samples[index]["bbox"], keypoints,
                           list(MPII_FLIP_INDEX), self.cfg, augmentation_draw(self.cfg, self.train, self.seed,
                                                                              epoch, index))
        return {**crop, "image_id": index, "box_score": 1.0}
