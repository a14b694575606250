"""COCO person-keypoints data set (pycocotools) with HigherHRNet-style targets.

Standard layout (:func:`coco_split_paths`)::

    root/annotations/person_keypoints_{split}.json
    root/{split}/*.jpg

or any image folder plus annotation file. Each sample is drawn from a key
``(index, epoch)`` (a bare ``index`` means epoch 0): the augmentation is drawn
from ``numpy.random.default_rng([seed, epoch, index])``, so it does not depend
on worker count or order, and a resumed run sees the same samples.

An image that fails to decode is skipped: the next image is returned in its
place and the file is listed in the sample's ``"skipped"`` entry (and in
:attr:`CocoKeypoints.skipped_files` of the process that read it); the loaders
warn once per epoch with the names. When no image of the split can be read, reading
any sample raises :class:`UnreadableSplitError` (one line).

The annotation file is checked while it is read (:class:`~threempose.data.coco_index.CocoIndex`)
against the rules of :mod:`threempose.data.coco_schema` (duplicate image ids or file
names, missing or unknown ``image_id``, malformed keypoints, sizes, areas, segmentations ...).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from threempose.config import DataConfig
from threempose.data.augment import AugmentParams, augment_sample, draw_params, params_affine
from threempose.data.coco_index import CocoIndex
from threempose.data.coco_schema import AnnotationError  # noqa: F401 (re-exported: the data set's error)
from threempose.data.image_io import ImageReadError, read_image
from threempose.data.targets import ignore_mask
from threempose.util.errors import UserError

SampleKey = Union[int, tuple[int, int]]
T = TypeVar("T")
EXIF_ORIENTATION = 0x0112
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableSplitError(UserError, RuntimeError):
    """No image of a split can be read."""


def split_key(key: SampleKey) -> tuple[int, int]:
    """``(index, epoch)`` of a sample key (a bare index means epoch 0)."""
    return (int(key), 0) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))


def coco_split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_file)`` of a split in the standard COCO layout."""
    root = Path(root).expanduser()
    return root / split, root / "annotations" / f"person_keypoints_{split}.json"


class CocoKeypoints(Dataset):
    """COCO person keypoints with targets at ``1 / heatmap_stride`` of the input.

    Args:
        image_dir: folder of the images named by the annotation file.
        annotation_file: COCO person-keypoints JSON.
        cfg: input size, stride, sigma, max people, joints, augmentation.
        train: random augmentation (``cfg.augment``); else the centre/resize affine.
        seed: augmentation seed.
        raw: return decoded images and drawn affines for the GPU path
            (:func:`threempose.data.augment_gpu.collate_raw`) instead of targets.

    A sample (``raw=False``), with ``S = cfg.input_size`` and ``h = S / stride``:
        ``image`` float32 ``[3, S, S]`` (ImageNet-normalised); ``heatmaps`` float32
        ``[J, h, h]``; ``mask`` float32 ``[h, h]`` (0 = unsupervised); ``joints`` int64
        ``[max_people, J, 2]`` ((y * h + x, visible)); ``affine`` float64 ``[2, 3]``
        (source pixel -> input pixel); ``flipped`` bool ``[]``; ``image_id`` int64 ``[]``;
        ``skipped`` list of files that failed to decode and were replaced.
    With ``raw=True``: ``image`` uint8 ``[3, H, W]``; ``mask`` uint8 ``[H, W]``;
    ``keypoints`` float64 ``[P, J, 3]`` (people with keypoints, source pixels);
    ``affine``, ``flipped``, ``image_id``, ``skipped`` as above.

    Raises (at construction): FileNotFoundError for a missing image folder,
    annotation file or image file; AnnotationError for a malformed or
    non-keypoint annotation file.
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, cfg: DataConfig, *,
                 train: bool, seed: int = 0, raw: bool = False):
        self.image_dir = Path(image_dir).expanduser()
        self.annotation_file = Path(annotation_file).expanduser()
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir} "
                                    f"(images of {self.annotation_file})")
        self.index = CocoIndex.read(self.annotation_file, cfg.num_joints)
        missing = [name for name in map(self.index.file_name, range(len(self.index)))
                   if not (self.image_dir / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image files of {self.annotation_file} are missing "
                                    f"from {self.image_dir}, e.g. {missing[:3]}")
        self.cfg, self.train, self.seed, self.raw = cfg, train, seed, raw
        self.skipped_files: list[str] = []

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images, ascending (sample ``index`` is image ``image_ids[index]``)."""
        return self.index.image_ids.tolist()

    def image_id(self, index: int) -> int:
        """Id of the ``index``-th image."""
        return int(self.index.image_ids[index])

    @functools.cached_property
    def coco(self) -> COCO:
        """The pycocotools index of the file's person category (built on first use, for evaluation
        in the main process; the samples come from :attr:`index`, which forked workers share)."""
        data = json.loads(self.annotation_file.read_bytes())
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] == self.index.category_id]
        for ann in data["annotations"]:
            ann.setdefault("num_keypoints", sum(1 for v in ann["keypoints"][2::3] if v > 0))
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def __len__(self) -> int:
        return len(self.index)

    def image_path(self, index: int) -> Path:
        """File of the ``index``-th image (images are sorted by id)."""
        return self.image_dir / self.index.file_name(index)

    def annotations(self, index: int) -> tuple[np.ndarray, list[Any]]:
        """Of the ``index``-th image: keypoints ``[P, J, 3]`` float64 (source pixels) of the
        people with keypoints (non-crowd, ``num_keypoints > 0``), and the segmentations of the
        regions the loss ignores (:func:`~threempose.data.targets.ignored_by_loss`)."""
        return self.index.people(index), self.index.ignored_regions(index)

    def decode(self, index: int) -> Image.Image | None:
        """The ``index``-th image (:func:`~threempose.data.image_io.read_image`), or None when it
        cannot be read or its upright size is not the annotation's width x height (its keypoints
        would not fit it; e.g. an EXIF rotation the annotation tool did not apply)."""
        try:
            image = read_image(self.image_path(index))
        except ImageReadError:
            return None
        return image if image.size == self.index.size(index) else None

    def read_encoded(self, index: int) -> tuple[np.ndarray, int, int] | None:
        """The ``index``-th image as encoded bytes for decoders that read files themselves (e.g.
        DALI's): ``(bytes uint8 [n], width, height)``; None where :meth:`decode` gives None.

        A plain 8-bit RGB or grayscale JPEG/PNG with no EXIF rotation is passed as its file; any
        other image (16-bit, alpha, palette, CMYK, EXIF-rotated) goes through :meth:`decode`, the
        one reader, and is passed re-encoded as a lossless PNG, so every backend sees the same
        pixels."""
        path = self.image_path(index)
        try:
            with Image.open(path) as f:
                plain = (f.format in ("JPEG", "PNG") and f.mode in ("RGB", "L")
                         and f.getexif().get(EXIF_ORIENTATION, 1) == 1)
                size = f.size
        except _READ_ERRORS:
            return None
        if plain and size == self.index.size(index):
            return np.fromfile(path, np.uint8), *size
        image = self.decode(index)
        if image is None:
            return None
        png = io.BytesIO()
        image.save(png, "PNG")
        return np.frombuffer(png.getvalue(), np.uint8), *image.size

    def first_readable(self, index: int, read: Callable[[int], Optional[T]]) -> tuple[int, T, list[str]]:
        """``(i, read(i), skipped)``: the first image ``i`` from ``index`` on (wrapping
        around) that ``read`` does not return None for, and the files it skipped."""
        skipped = []
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            value = read(i)
            if value is not None:
                self.skipped_files.extend(skipped)
                return i, value, skipped
            skipped.append(str(self.image_path(i)))
        raise UnreadableSplitError(self.unreadable_message())

    def unreadable_message(self) -> str:
        """The one line of an :class:`UnreadableSplitError`: no image of the split can be read."""
        return (f"none of the {len(self)} images of {self.annotation_file} in {self.image_dir} can be "
                "read (all fail to decode or differ from their annotated width x height)")

    def augment_params(self, index: int, epoch: int) -> AugmentParams:
        """The augmentation of image ``index`` in ``epoch``: drawn from
        ``default_rng([seed, epoch, index])`` when training, else the centre/resize default."""
        if not self.train:
            return AugmentParams()
        return draw_params(np.random.default_rng([self.seed, epoch, index]), self.cfg.augment)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, epoch = split_key(key)
        i, image, skipped = self.first_readable(index, self.decode)
        width, height = image.size
        keypoints, regions = self.annotations(i)
        mask = 1 - ignore_mask(regions, height, width)
        affine = params_affine(self.augment_params(i, epoch), width, height, self.cfg.input_size)
        common = {"image_id": torch.tensor(self.image_id(i)), "skipped": skipped}
        if self.raw:
            return {"image": torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(),
                    "mask": torch.from_numpy(mask), "keypoints": torch.from_numpy(keypoints),
                    "affine": torch.from_numpy(affine.matrix), "flipped": torch.tensor(affine.flipped),
                    **common}
        return {**augment_sample(image, mask, keypoints, affine, self.cfg), **common}
