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
from typing import Any, Callable, Optional

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


def describe(kind: str, index: int, entry: Any) -> str:
    """``images[3] (id 5)``: how an error names an entry."""
    if isinstance(entry, dict) and "id" in entry:
        return f"{kind}[{index}] (id {entry['id']!r})"
    return f"{kind}[{index}]"


NOT_KEYPOINTS = "not a COCO person-keypoints annotation file"


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

    :class:`~threempose.data.coco_index.CocoIndex` applies the same rules piece by piece while
    it parses a file (:func:`check_top_level`, :func:`check_categories`, :func:`check_images`,
    :func:`annotation_rule`, :func:`keypoint_annotation_rule`).
    """
    def fail(rule: str) -> None:
        raise error(f"{name}: {rule}")

    check_top_level(data, fail)
    category_ids, keypoint_ids = check_categories(data["categories"], num_joints, fail, every_category_keypoints)
    sizes = check_images(data["images"], fail, image_files)
    for i, ann in enumerate(data["annotations"]):
        where = describe("annotations", i, ann)
        rule = annotation_rule(ann, sizes, category_ids if every_category_keypoints else None)
        if rule is None and ann["category_id"] in keypoint_ids:
            rule = keypoint_annotation_rule(ann, num_joints, sizes[ann["image_id"]][1:], evaluation_fields)
        if rule is not None:
            fail(where + rule)
    return keypoint_ids[0]


def check_top_level(data: Any, fail: Callable[[str], None]) -> None:
    """A JSON object with lists ``images``, ``annotations`` and ``categories``."""
    if not isinstance(data, dict):
        fail(f"{NOT_KEYPOINTS} (a JSON object with lists 'images', 'annotations' and 'categories'), "
             f"got a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            fail(f"{NOT_KEYPOINTS}: the '{key}' list is missing")


def check_categories(categories: list, num_joints: int, fail: Callable[[str], None],
                     every_category_keypoints: bool = False) -> tuple[set, list]:
    """``(all category ids, the ids of the J-keypoint categories)``; the rules of ``categories``."""
    category_ids: set = set()
    keypoint_ids = []
    for i, cat in enumerate(categories):
        where = describe("categories", i, cat)
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
                 f"needs {num_joints} ({NOT_KEYPOINTS}?)")
        keypoint_ids.append(cat["id"])
    if not keypoint_ids:
        fail(f"{NOT_KEYPOINTS}: no category has 'keypoints' "
             "(use person_keypoints_*.json, not instances_*.json)")
    return category_ids, keypoint_ids


def check_images(images: list, fail: Callable[[str], None], image_files: bool = True) -> dict:
    """``{image id: (position in images, height, width)}``; the rules of ``images`` (not empty,
    unique ids and file names, sizes)."""
    if not images:
        fail("'images' is empty: the split has no images")
    sizes: dict = {}
    file_names: dict = {}
    for i, img in enumerate(images):
        where = describe("images", i, img)
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
    return sizes


def annotation_rule(ann: Any, image_sizes: Optional[dict] = None,
                    category_ids: Optional[set] = None) -> Optional[str]:
    """The broken rule of any annotation, as text to follow its name (None: it keeps them): an
    object with integer ``image_id`` and ``category_id``; with ``image_sizes``
    (:func:`check_images`) the image must exist, with ``category_ids`` the category."""
    if not isinstance(ann, dict):
        return f": an annotation must be a JSON object, got a JSON {type(ann).__name__}"
    for key in ("image_id", "category_id"):
        if key not in ann:
            return f" lacks '{key}'"
        if not is_int(ann[key]):
            return f": '{key}' must be an integer, got {ann[key]!r}"
    if image_sizes is not None and ann["image_id"] not in image_sizes:
        return f": image_id {ann['image_id']} is not the id of an entry of 'images'"
    if category_ids is not None and ann["category_id"] not in category_ids:
        return f": category_id {ann['category_id']} is not the id of an entry of 'categories'"
    return None


def keypoint_annotation_rule(ann: dict, num_joints: int, size: tuple = (None, None),
                             evaluation_fields: bool = False) -> Optional[str]:
    """The broken rule of an annotation of the keypoint category, as text to follow its name
    (None: it keeps them); ``size``: its image's ``(height, width)`` (None: an RLE's size is not
    compared)."""
    required = ("keypoints", *_EVALUATION_FIELDS) if evaluation_fields else ("keypoints",)
    missing = [k for k in required if k not in ann]
    if missing:
        return f" lacks {', '.join(missing)} (not a COCO person-keypoints annotation?)"
    kpts = ann["keypoints"]
    if not _numbers(kpts, 3 * num_joints):
        got = (f"a JSON {type(kpts).__name__}" if not isinstance(kpts, list)
               else f"{len(kpts)} entries" if len(kpts) != 3 * num_joints
               else "a non-number or non-finite entry")
        return (f": 'keypoints' must be a flat list of {3 * num_joints} finite numbers "
                f"({num_joints} x [x, y, visibility]), got {got}")
    if "num_keypoints" in ann and not (is_int(ann["num_keypoints"]) and ann["num_keypoints"] >= 0):
        return f": 'num_keypoints' must be a non-negative integer, got {ann['num_keypoints']!r}"
    if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
        return f": 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}"
    if "area" in ann and not (is_number(ann["area"]) and ann["area"] > 0):
        return f": 'area' must be a positive number (pixels), got {ann['area']!r}"
    if "bbox" in ann and not (_numbers(ann["bbox"], 4) and ann["bbox"][2] >= 0 and ann["bbox"][3] >= 0):
        return (f": 'bbox' must be 4 numbers [x, y, width, height] with width, height >= 0, "
                f"got {ann['bbox']!r}")
    if "segmentation" in ann:
        rule = _segmentation_rule(ann["segmentation"], size)
        if rule:
            return f": 'segmentation' {rule}"
    return None


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
