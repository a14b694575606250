"""The one check of a COCO person-keypoints annotation set, shared by training data and evaluation.

:func:`check_keypoint_annotations` enforces the schema COCO tools rely on, and stops at the
first entry that breaks a rule with one line naming the file, the entry and the rule::

    person_keypoints_val.json: annotations[7] (id 12): image_id 99 is not the id of an entry of 'images'

Rules (``J`` joints; "number" means an int or float, not a bool, and finite):

* the file is a JSON object with lists ``images``, ``annotations`` and ``categories``;
* ``categories``: objects with an integer ``id`` (no duplicates); at least one has a
  ``keypoints`` list of ``J`` names (with ``every_category_keypoints``, all of them do);
* ``images``: not empty; objects with an integer ``id``, a non-empty string ``file_name``
  and positive integer ``width`` and ``height``; **no two share an id or a file name**
  (pycocotools would keep only the last of them, silently giving one image another's people);
* ``annotations``: objects with an integer ``image_id`` that is the id of an image and an
  integer ``category_id`` (with ``every_category_keypoints``, that of a category); those of a
  keypoint category also: ``keypoints`` a flat list of ``3 J`` numbers, and where present (all
  required with ``evaluation_fields``) ``num_keypoints`` a non-negative integer, ``iscrowd``
  0 or 1, ``area`` a positive number, ``bbox`` 4 numbers with non-negative width and height,
  ``segmentation`` polygons (a list of flat lists of an even number of numbers) or an RLE
  (``{"size": [height, width] of its image, "counts": a string or non-negative integers}``).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

from threempose.util.errors import UserError

_EVALUATION_FIELDS = ("id", "num_keypoints", "area", "bbox", "iscrowd")


class AnnotationError(UserError, ValueError):
    """An annotation file is malformed or is not a COCO person-keypoints file."""


def is_int(value: Any) -> bool:
    """An integer (a Python or numpy int), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (int or float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(values: Any, length: Optional[int] = None) -> bool:
    """A flat list of finite numbers (of ``length`` entries when given)."""
    return (isinstance(values, list) and (length is None or len(values) == length)
            and all(is_number(v) for v in values))


def _describe(kind: str, index: int, entry: Any) -> str:
    """``images[3] (id 5)``: how an error names an entry."""
    if isinstance(entry, dict) and "id" in entry:
        return f"{kind}[{index}] (id {entry['id']!r})"
    return f"{kind}[{index}]"


def check_keypoint_annotations(data: Any, name: str, num_joints: int, *,
                               evaluation_fields: bool = False, every_category_keypoints: bool = False,
                               image_files: bool = True, error: type[Exception] = AnnotationError) -> int:
    """Check ``data`` (a parsed annotation file called ``name``) against the module's rules.

    Args:
        data: the parsed JSON.
        name: the file (or object) named in error messages.
        num_joints: ``J``, the keypoints per person.
        evaluation_fields: require the fields COCOeval reads (``id``, ``num_keypoints``,
            ``area``, ``bbox``, ``iscrowd``) on every keypoint annotation.
        every_category_keypoints: every category must be a ``J``-keypoint one and every
            annotation's ``category_id`` one of them (COCOeval scores all categories).
        image_files: every image needs ``file_name``, ``width`` and ``height`` (to be read);
            False (evaluation): they are checked only where present.
        error: the exception type raised (an :class:`AnnotationError` by default).
    Returns:
        The id of the first keypoint category (the person category).
    Raises:
        ``error`` with one line: ``"<name>: <entry>: <rule>"``.
    """
    def fail(rule: str) -> None:
        raise error(f"{name}: {rule}")

    not_keypoints = "not a COCO person-keypoints annotation file"
    if not isinstance(data, dict):
        fail(f"{not_keypoints} (a JSON object with lists 'images', 'annotations' and 'categories'), "
             f"got a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            fail(f"{not_keypoints}: the '{key}' list is missing")

    category_ids: set = set()
    keypoint_ids = []
    for i, cat in enumerate(data["categories"]):
        where = _describe("categories", i, cat)
        if not isinstance(cat, dict) or not is_int(cat.get("id")):
            fail(f"{where}: a category must be an object with an integer 'id'")
        if cat["id"] in category_ids:
            fail(f"{where}: duplicate category id {cat['id']}")
        category_ids.add(cat["id"])
        names = cat.get("keypoints")
        if names is None and not every_category_keypoints:
            continue
        if not (isinstance(names, list) and len(names) == num_joints):
            count = f"{len(names)}" if isinstance(names, list) else "no"
            fail(f"{where}: category {cat.get('name')!r} has {count} 'keypoints' names, "
                 f"needs {num_joints} ({not_keypoints}?)")
        keypoint_ids.append(cat["id"])
    if not keypoint_ids:
        fail(f"{not_keypoints}: no category has 'keypoints' "
             "(use person_keypoints_*.json, not instances_*.json)")

    if not data["images"]:
        fail("'images' is empty: the split has no images")
    sizes: dict = {}
    file_names: dict = {}
    for i, img in enumerate(data["images"]):
        where = _describe("images", i, img)
        if not isinstance(img, dict):
            fail(f"{where}: an image must be a JSON object, got a JSON {type(img).__name__}")
        if not is_int(img.get("id")):
            fail(f"{where}: 'id' must be an integer, got {img.get('id')!r}")
        for key in ("file_name", "width", "height"):
            if key not in img and not image_files:
                continue                   # COCOeval reads ids only
            if key == "file_name" and not (isinstance(img.get(key), str) and img[key]):
                fail(f"{where}: 'file_name' must be a non-empty string, got {img.get(key)!r}")
            if key != "file_name" and not (is_int(img.get(key)) and img[key] > 0):
                fail(f"{where}: '{key}' must be a positive integer (pixels), got {img.get(key)!r}")
        if img["id"] in sizes:
            fail(f"{where}: duplicate image id {img['id']} (also images[{sizes[img['id']][0]}]); "
                 "ids must be unique")
        if img.get("file_name") in file_names:
            fail(f"{where}: duplicate file_name {img['file_name']!r} (also images[{file_names[img['file_name']]}])")
        if "file_name" in img:
            file_names[img["file_name"]] = i
        sizes[img["id"]] = (i, img.get("height"), img.get("width"))

    for i, ann in enumerate(data["annotations"]):
        where = _describe("annotations", i, ann)
        if not isinstance(ann, dict):
            fail(f"{where}: an annotation must be a JSON object, got a JSON {type(ann).__name__}")
        for key in ("image_id", "category_id"):
            if key not in ann:
                fail(f"{where} lacks '{key}'")
            if not is_int(ann[key]):
                fail(f"{where}: '{key}' must be an integer, got {ann[key]!r}")
        if ann["image_id"] not in sizes:
            fail(f"{where}: image_id {ann['image_id']} is not the id of an entry of 'images'")
        if every_category_keypoints and ann["category_id"] not in category_ids:
            fail(f"{where}: category_id {ann['category_id']} is not the id of an entry of 'categories'")
        if ann["category_id"] in keypoint_ids:
            _check_keypoint_annotation(ann, where, num_joints, sizes[ann["image_id"]][1:],
                                       evaluation_fields, fail)
    return keypoint_ids[0]


def _check_keypoint_annotation(ann: dict, where: str, num_joints: int, size: tuple[int, int],
                               evaluation_fields: bool, fail) -> None:
    """The rules of one annotation of the keypoint category; ``size``: its image's ``(height, width)``."""
    required = ("keypoints", *_EVALUATION_FIELDS) if evaluation_fields else ("keypoints",)
    missing = [k for k in required if k not in ann]
    if missing:
        fail(f"{where} lacks {', '.join(missing)} (not a COCO person-keypoints annotation?)")
    kpts = ann["keypoints"]
    if not _numbers(kpts, 3 * num_joints):
        got = (f"a JSON {type(kpts).__name__}" if not isinstance(kpts, list)
               else f"{len(kpts)} entries" if len(kpts) != 3 * num_joints
               else "a non-number or non-finite entry")
        fail(f"{where}: 'keypoints' must be a flat list of {3 * num_joints} finite numbers "
             f"({num_joints} x [x, y, visibility]), got {got}")
    if "num_keypoints" in ann and not (is_int(ann["num_keypoints"]) and ann["num_keypoints"] >= 0):
        fail(f"{where}: 'num_keypoints' must be a non-negative integer, got {ann['num_keypoints']!r}")
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        fail(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
    if "area" in ann and not (is_number(ann["area"]) and ann["area"] > 0):
        fail(f"{where}: 'area' must be a positive number (pixels), got {ann['area']!r}")
    if "bbox" in ann and not (_numbers(ann["bbox"], 4) and ann["bbox"][2] >= 0 and ann["bbox"][3] >= 0):
        fail(f"{where}: 'bbox' must be 4 numbers [x, y, width, height] with width, height >= 0, "
             f"got {ann['bbox']!r}")
    if "segmentation" in ann:
        rule = _segmentation_rule(ann["segmentation"], size)
        if rule:
            fail(f"{where}: 'segmentation' {rule}")


def _segmentation_rule(seg: Any, size: tuple[int, int]) -> Optional[str]:
    """The broken rule of a segmentation (None when it is a valid polygon list or RLE)."""
    if isinstance(seg, list):
        for k, polygon in enumerate(seg):
            if not (_numbers(polygon) and len(polygon) % 2 == 0):
                return (f"polygon {k} must be a flat list of an even number of numbers "
                        "[x1, y1, x2, y2, ...]")
        return None
    if isinstance(seg, dict):
        if not (isinstance(seg.get("size"), list) and len(seg["size"]) == 2
                and all(is_int(v) for v in seg["size"])):
            return "RLE needs 'size': [height, width] (integers)"
        if None not in size and tuple(seg["size"]) != size:
            return f"RLE 'size' {seg['size']} is not its image's [height, width] {list(size)}"
        counts = seg.get("counts")
        if not (isinstance(counts, str) or (isinstance(counts, list)
                                            and all(is_int(c) and c >= 0 for c in counts))):
            return "RLE needs 'counts': a string or a list of non-negative integers"
        return None
    return f"must be a list of polygons or an RLE object, got a JSON {type(seg).__name__}"
