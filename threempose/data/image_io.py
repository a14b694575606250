"""The one image reader of threempose: any Pillow image to the 8-bit RGB a viewer would show.

Training (the COCO loaders), validation, calibration and inference all read images through
:func:`read_image` (a file) or :func:`to_rgb` (an opened Pillow image), so a picture means the
same thing everywhere:

* the EXIF orientation tag is applied (phones store portraits as rotated landscapes), as
  image viewers and browsers show the picture;
* 16-bit images (``I;16*``, and ``I`` with values in 0..65535) are scaled to 8 bits
  (``round(v * 255 / 65535)``), not clipped at 255 - Pillow's plain ``convert("RGB")`` turns
  them white;
* images with transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent
  colour) are composited over white, as a viewer shows them on a white page;
* palette, grayscale, bilevel, CMYK and YCbCr images convert with Pillow's conversions;
* what has no faithful 8-bit RGB meaning (floating point ``F``, 32-bit values beyond 16
  bits, other modes) is an :class:`ImageReadError`, never a silently wrong picture.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from threempose.util.errors import UserError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
CONVERTIBLE_MODES = ("RGB", "RGBX", "L", "1", "P", "CMYK", "YCbCr")
BACKGROUND = (255, 255, 255)          # what transparent pixels become


class ImageReadError(UserError, ValueError):
    """An input is not a usable image (missing, not an image, corrupt, no faithful RGB form,
    wrong array shape); ``reason`` is the message without the file name."""

    def __init__(self, message: str, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB Pillow image, upright (see the module docstring).

    Raises :class:`ImageReadError` for a mode without a faithful 8-bit RGB form."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    if mode in CONVERTIBLE_MODES:
        return image.convert("RGB")
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(f"32-bit integer image with values in [{values.min()}, {values.max()}]: "
                                 "no faithful 8-bit form (16-bit images are scaled)")
        eight = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    raise ImageReadError(f"{mode} image: no faithful 8-bit RGB form; convert it to RGB first")


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode the file ``path`` into an upright 8-bit RGB Pillow image (:func:`to_rgb`).

    Raises :class:`ImageReadError` naming the file when it is missing, not an image, corrupt
    or has no faithful RGB form."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file", "no such file")
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except ImageReadError as e:
        raise ImageReadError(f"{path}: {e.reason}", e.reason) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = "not an image" if isinstance(e, UnidentifiedImageError) else f"unreadable ({e})"
        raise ImageReadError(f"{path}: {reason}", reason) from None
