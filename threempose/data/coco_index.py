"""The annotation index of a COCO person-keypoints file, in flat NumPy arrays.

A DataLoader forks its workers from the process that built the data set. Python
objects (the dicts and lists of a pycocotools index) are copied page by page into
every worker as soon as a worker *reads* them, because reading an object writes
its reference count: a worker's private memory grows over an epoch until it holds
its own copy of the index. :class:`CocoIndex` keeps what a sample needs in a few
NumPy arrays (and one byte buffer of pickled segmentations), whose data pages no
read writes, so all workers share one copy.

What it keeps, per image (sorted by image id, as :class:`CocoKeypoints` indexes them):
file name, width, height; the keypoints of the people the targets are made of
(non-crowd, ``num_keypoints > 0``, in file order); the segmentations of the regions
the loss ignores (:func:`~threempose.data.targets.ignored_by_loss`, in file order).
Nothing else of the file is kept (the evaluator reads the file itself).

The file is parsed with ``json`` and an ``object_hook`` that shrinks each annotation
to a compact record as soon as it is parsed, so the parse never holds the file's
whole tree of Python objects (a COCO train2017-sized file: ~1.2 GiB of them).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from threempose.data.coco_schema import (AnnotationError, annotation_rule, check_categories, check_images,
                                         check_top_level, keypoint_annotation_rule)
from threempose.data.targets import ignored_by_loss
from threempose.util.files import not_json_reason

_HEAD_BYTES = 64


class _Annotation:
    """One parsed annotation, reduced to what the index needs (made by the parse hook), with the
    rules of :mod:`threempose.data.coco_schema` it breaks (checked while parsing, reported after)."""

    __slots__ = ("category_id", "id", "ignored", "image_id", "keypoint_rule", "keypoints", "person",
                 "rle_size", "rule")

    def __init__(self, ann: dict, num_joints: int):
        self.id, self.image_id, self.category_id = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        self.keypoints: bytes | None = None       # float64 [J, 3] of a person (below)
        self.ignored: bytes | None = None         # the pickled segmentation of an ignored region
        self.person = False
        seg = ann.get("segmentation")
        self.rle_size = tuple(seg["size"]) if isinstance(seg, dict) and isinstance(seg.get("size"), list) else None
        self.rule = annotation_rule(ann)          # any annotation's rules; the keypoint category's:
        self.keypoint_rule = keypoint_annotation_rule(ann, num_joints)
        if self.rule is not None or self.keypoint_rule is not None:
            return                                # reported after the parse if its category needs it
        kpts = ann["keypoints"]
        if "num_keypoints" not in ann:
            ann["num_keypoints"] = sum(1 for v in kpts[2::3] if v > 0)
        self.person = not ann.get("iscrowd", 0) and ann["num_keypoints"] > 0
        if self.person:
            self.keypoints = np.asarray(kpts, np.float64).tobytes()
        if ignored_by_loss(ann):
            self.ignored = pickle.dumps(ann["segmentation"], protocol=pickle.HIGHEST_PROTOCOL)

    def where(self, index: int) -> str:
        """How an error names it: ``annotations[7] (id 12)``."""
        return f"annotations[{index}]" + (f" (id {self.id!r})" if self.id is not None else "")

    def broken_rule(self, sizes: dict, keypoint_ids: list) -> str | None:
        """The first rule it breaks, its image (``sizes`` of :func:`check_images`) and category known."""
        if self.rule is not None:
            return self.rule
        rule = annotation_rule({"image_id": self.image_id, "category_id": self.category_id}, sizes)
        if rule is not None or self.category_id not in keypoint_ids:
            return rule
        if self.keypoint_rule is not None:
            return self.keypoint_rule
        size = tuple(sizes[self.image_id][1:])
        if self.rle_size is not None and self.rle_size != size:
            return f": 'segmentation' RLE 'size' {list(self.rle_size)} is not its image's [height, width] {list(size)}"
        return None


def check_json_head(path: Path) -> None:
    """Raise AnnotationError unless ``path`` starts (after white space and a byte-order mark)
    with ``{``: a 2 GB file that is not JSON fails here at once, not after it was read."""
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    reason = not_json_reason(head, complete=len(head) < _HEAD_BYTES)
    if reason is not None:
        raise AnnotationError(f"{path}: not a JSON file ({reason}); expected a JSON annotation file")
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if not text.startswith(b"{"):
        shown = head[:16]
        raise AnnotationError(f"{path}: not a COCO annotation file: it does not start with a JSON "
                              f"object ('{{'), its first bytes are {shown!r}")


class CocoIndex:
    """Flat arrays of a COCO person-keypoints file (see the module docstring).

    Attributes (``N`` images, ``P`` people with keypoints, ``R`` ignored regions):
        image_ids: int64 ``[N]``, ascending.
        sizes: int64 ``[N, 2]`` (width, height) from the file.
        keypoints: float64 ``[P, J, 3]`` (x, y, visibility), grouped by image.
        people_start: int64 ``[N + 1]``: image ``i``'s people are ``keypoints[people_start[i]:people_start[i+1]]``.
        region_start: int64 ``[N + 1]``: likewise into the ignored regions.
        category_id: the id of the person (keypoint) category.
    """

    def __init__(self, image_ids: np.ndarray, sizes: np.ndarray, names: list[str],
                 keypoints: np.ndarray, people_image: np.ndarray, regions: list[bytes],
                 region_image: np.ndarray, category_id: int):
        """From per-image info (sorted by id) and per-person / per-region image indices (sorted)."""
        self.category_id = category_id
        self.image_ids, self.sizes, self.keypoints = image_ids, sizes, keypoints
        self._names, self._name_start = _pack([n.encode() for n in names])
        self._regions, self._region_offsets = _pack(regions)
        n = len(image_ids)
        self.people_start = np.searchsorted(people_image, np.arange(n + 1)).astype(np.int64)
        self.region_start = np.searchsorted(region_image, np.arange(n + 1)).astype(np.int64)

    @classmethod
    def read(cls, path: str | Path, num_joints: int) -> CocoIndex:
        """Parse and check a COCO person-keypoints file.

        Raises:
            FileNotFoundError: no such file.
            AnnotationError: not JSON, not a COCO keypoints file, or a malformed entry (named).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"annotation file not found: {path}")
        check_json_head(path)

        def hook(obj: dict) -> Any:       # an annotation (not an image, a category or an RLE)
            return _Annotation(obj, num_joints) if "image_id" in obj or "category_id" in obj else obj

        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(), object_hook=hook)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AnnotationError(f"{path}: not valid JSON: {e}") from None
        except (KeyError, TypeError) as e:
            raise AnnotationError(f"{path}: not a COCO annotation file: {e!r}") from None
        return cls._from_parsed(path, data, num_joints)

    @classmethod
    def _from_parsed(cls, path: Path, data: Any, num_joints: int) -> CocoIndex:
        def fail(rule: str) -> None:
            raise AnnotationError(f"{path}: {rule}")

        check_top_level(data, fail)
        _, keypoint_ids = check_categories(data["categories"], num_joints, fail)
        images = data["images"]
        sizes = check_images(images, fail)
        order = np.argsort(np.array([img["id"] for img in images], np.int64), kind="stable").tolist()
        ids = np.array([images[i]["id"] for i in order], np.int64)
        wh = np.array([(images[i]["width"], images[i]["height"]) for i in order], np.int64).reshape(-1, 2)
        names = [str(images[i]["file_name"]) for i in order]
        del images, data["images"]

        people, people_id, regions, region_id = [], [], [], []
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, _Annotation):    # not an object, or neither image_id nor category_id
                fail(f"annotations[{i}]" + annotation_rule(ann))
            rule = ann.broken_rule(sizes, keypoint_ids)
            if rule is not None:
                fail(ann.where(i) + rule)
            if ann.category_id != keypoint_ids[0]:
                continue
            if ann.person:
                people.append(ann.keypoints)
                people_id.append(ann.image_id)
            if ann.ignored is not None:
                regions.append(ann.ignored)
                region_id.append(ann.image_id)
        del data
        keypoints = np.frombuffer(b"".join(people), np.float64).reshape(-1, num_joints, 3)
        people_image, people_order = _image_positions(ids, people_id)
        region_image, region_order = _image_positions(ids, region_id)
        return cls(ids, wh, names, keypoints[people_order], people_image,
                   [regions[k] for k in region_order], region_image, keypoint_ids[0])

    def __len__(self) -> int:
        return len(self.image_ids)

    def file_name(self, index: int) -> str:
        """File name of image ``index`` (relative to the image folder)."""
        return self._names[self._name_start[index]:self._name_start[index + 1]].tobytes().decode()

    def size(self, index: int) -> tuple[int, int]:
        """``(width, height)`` of image ``index`` from the file."""
        return int(self.sizes[index, 0]), int(self.sizes[index, 1])

    def people(self, index: int) -> np.ndarray:
        """float64 ``[P, J, 3]``: keypoints of image ``index``'s people (a copy, in file order)."""
        return self.keypoints[self.people_start[index]:self.people_start[index + 1]].copy()

    def ignored_regions(self, index: int) -> list[Any]:
        """Segmentations (polygons or RLE, as in the file) of image ``index``'s ignored regions."""
        return [pickle.loads(self._regions[self._region_offsets[k]:self._region_offsets[k + 1]])
                for k in range(self.region_start[index], self.region_start[index + 1])]

    def nbytes(self) -> int:
        """Bytes held by the arrays (what the workers share)."""
        return sum(a.nbytes for a in (self.image_ids, self.sizes, self.keypoints, self.people_start,
                                      self.region_start, self._names, self._name_start, self._regions,
                                      self._region_offsets))


def _pack(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(buffer uint8 [sum of lengths], offsets int64 [len + 1])`` of byte strings."""
    offsets = np.zeros(len(chunks) + 1, np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    return np.frombuffer(b"".join(chunks), np.uint8), offsets


def _image_positions(ids: np.ndarray, owners: list) -> tuple[np.ndarray, np.ndarray]:
    """For entries owned by image ids ``owners``: ``(image index of each kept entry, sorted;
    the entries' order)``: a stable sort by image, so an image's entries keep their file order;
    entries of ids not in the file's images are dropped."""
    owner = np.asarray(owners, np.int64) if owners else np.zeros(0, np.int64)
    where = np.searchsorted(ids, owner)
    known = (where < len(ids)) & (ids[np.minimum(where, len(ids) - 1)] == owner) if len(ids) else \
        np.zeros(len(owner), bool)
    order = np.flatnonzero(known)[np.argsort(where[known], kind="stable")]
    return where[order], order
