"""Draw detected people (COCO skeleton and keypoint dots) on an image.

Limbs on the person's left are warm (red to yellow), on the right cool (cyan
to blue), across the body green; each of the 19 limbs has its own colour.
Joint dots are light tints of their side's colour and sit on top of the limbs.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from threempose.data.keypoints import JOINT_NAMES, NUM_JOINTS, SKELETON
from threempose.util.files import atomic_open

# Hue bands (degrees) per body side; limbs of a side are spread evenly over its band.
_HUE_BANDS = {"left": (0.0, 55.0), "right": (190.0, 255.0), "centre": (95.0, 150.0)}
_DOT_COLORS = {"left": (255, 170, 120), "right": (130, 190, 255), "centre": (170, 255, 170)}


def _joint_side(joint: int) -> str:
    name = JOINT_NAMES[joint]
    return "left" if name.startswith("left_") else "right" if name.startswith("right_") else "centre"


def _limb_side(a: int, b: int) -> str:
    sides = {_joint_side(a), _joint_side(b)} - {"centre"}
    return sides.pop() if len(sides) == 1 else "centre"


def _limb_colors(sides: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    """One RGB colour per limb: its side's hue band, split evenly among that side's limbs."""
    sides = list(sides)
    colors = []
    for limb, side in enumerate(sides):
        rank, count = sides[:limb].count(side), sides.count(side)
        low, high = _HUE_BANDS[side]
        hue = low + (high - low) * rank / max(count - 1, 1)
        colors.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue / 360.0, 1.0, 1.0)))
    return tuple(colors)


LIMB_SIDES = tuple(_limb_side(a, b) for a, b in SKELETON)
LIMB_COLORS = _limb_colors(LIMB_SIDES)  # RGB per SKELETON entry
JOINT_COLORS = tuple(_DOT_COLORS[_joint_side(j)] for j in range(NUM_JOINTS))  # RGB per joint

LABEL_TEXT_COLOR = (255, 255, 255)
LABEL_BOX_COLOR = (0, 0, 0)


def draw_people(
    image: Image.Image | np.ndarray,
    people: Sequence[dict | Any],
    score_threshold: float = 0.2,
    show_scores: bool = True,
    radius: int | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` (PIL image or uint8 array [H, W, 3], RGB) with ``people`` drawn.

    A person is ``{"keypoints": ..., "score": float}`` (``score`` optional) or
    just its keypoints: 17 x [x, y, score] or a flat list of 51 (COCO results
    style), x and y in pixels. A joint is drawn when its score (or COCO
    visibility) is above ``score_threshold`` and x, y are finite; a limb when
    both its joints are. ``show_scores`` labels each person with its score
    above its top-left joint. ``radius`` and ``line_width`` (pixels) default
    to a size that scales with the image. The input is not modified.
    """
    canvas = _rgb_copy(image)
    short_side = min(canvas.size)
    radius = radius if radius is not None else max(2, round(short_side / 160))
    line_width = line_width if line_width is not None else max(1, round(short_side / 240))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, short_side // 40))
    for index, person in enumerate(people):
        keypoints, score = _person(person, index)
        shown = np.isfinite(keypoints).all(axis=1) & (keypoints[:, 2] > score_threshold)
        points = [tuple(xy) for xy in keypoints[:, :2].tolist()]
        for limb, (a, b) in enumerate(SKELETON):
            if shown[a] and shown[b]:
                draw.line([points[a], points[b]], fill=LIMB_COLORS[limb], width=line_width)
        for joint in np.flatnonzero(shown):
            x, y = points[joint]
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=JOINT_COLORS[joint])
        if show_scores and score is not None and shown.any():
            left = float(keypoints[shown, 0].min())
            top = float(keypoints[shown, 1].min()) - radius
            text = f"{score:.2f}"
            box = draw.textbbox((left, top), text, font=font, anchor="ld")
            draw.rectangle(box, fill=LABEL_BOX_COLOR)
            draw.text((left, top), text, fill=LABEL_TEXT_COLOR, font=font, anchor="ld")
    return canvas


def save_drawing(
    path: str | os.PathLike,
    image: Image.Image | np.ndarray,
    people: Sequence[dict | Any],
    score_threshold: float = 0.2,
    show_scores: bool = True,
    radius: int | None = None,
    line_width: int | None = None,
) -> Path:
    """Draw ``people`` on ``image`` (see :func:`draw_people`) and write it to ``path`` as PNG.

    The file is written atomically: on any error no file (and no partial file) is left.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: drawings are written as PNG; give a file name ending in .png")
    drawing = draw_people(image, people, score_threshold, show_scores, radius, line_width)
    with atomic_open(path, "wb") as f:
        drawing.save(f, format="PNG")
    return path


def _rgb_copy(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL copy of ``image``, which must be a PIL image or a uint8 [H, W, 3] array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # always a new image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be uint8 of shape [H, W, 3], got {image.dtype} {image.shape}")
        return Image.fromarray(image)  # copies the pixels
    raise TypeError(f"image must be a PIL image or a numpy array, not {type(image).__name__}")


def _person(person: Any, index: int) -> tuple[np.ndarray, float | None]:
    """Keypoints [17, 3] (float64) and the optional score of ``people[index]``."""
    score = None
    if isinstance(person, dict):
        if "keypoints" not in person:
            raise ValueError(f"person {index} has no 'keypoints'")
        score = person.get("score")
        if score is not None and not isinstance(score, (int, float, np.number)):
            raise ValueError(f"person {index}: 'score' must be a number, got {score!r}")
        person = person["keypoints"]
    try:
        keypoints = np.asarray(person, dtype=np.float64)
    except (TypeError, ValueError):
        keypoints = None
    if keypoints is None or keypoints.shape not in ((NUM_JOINTS, 3), (3 * NUM_JOINTS,)):
        got = f"shape {keypoints.shape}" if keypoints is not None else "non-numeric values"
        raise ValueError(f"person {index}: keypoints must be {NUM_JOINTS} x [x, y, score] or a flat "
                         f"list of {3 * NUM_JOINTS} numbers, got {got}")
    return keypoints.reshape(NUM_JOINTS, 3), score
