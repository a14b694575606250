"""Image in, people out: resize, (flip) forward, decode.

:func:`predict_people` runs any network that maps ``[1, 3, H, W]`` images to
exit outputs (``.heatmaps``/``.tags`` ``[1, J, H/4, W/4]``) on one image, the
thesis' test procedure (§4.1 "Testing"): the short side resized to
``infer.short_side`` keeping the aspect ratio, padded to a multiple of 32, the
flipped image run too when ``infer.flip_test``, and the outputs decoded into
people in original-image coordinates (:func:`threempose.decode.decoder.decode`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from threempose.config import InferConfig
from threempose.data.augment import normalize
from threempose.decode.decoder import Person, decode
from threempose.decode.resize import ResizeInfo, resize_image

# A network: images [B, 3, H, W] -> the chosen exit's (heatmaps, tags), each [B, J, H/4, W/4].
ExitFn = Callable[[Tensor], tuple[Tensor, Tensor]]

SIZE_MULTIPLE = 32


def prepare_image(image: np.ndarray, short_side: int, device: torch.device | str
                  ) -> tuple[Tensor, ResizeInfo]:
    """RGB uint8 ``[H, W, 3]`` -> normalised network input ``[1, 3, H', W']`` and its resize info."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    resized, info = resize_image(image, short_side, SIZE_MULTIPLE)
    x = torch.from_numpy(resized).permute(2, 0, 1)[None].to(device)
    return normalize(x), info


@torch.no_grad()
def predict_people(exit_fn: ExitFn, image: np.ndarray, cfg: InferConfig,
                   device: torch.device | str = "cpu",
                   flip_index: Sequence[int] | None = None) -> list[Person]:
    """People in one RGB uint8 image ``[H, W, 3]`` (sorted by score, best first)."""
    x, info = prepare_image(image, cfg.short_side, device)
    if cfg.flip_test:
        heatmaps, tags = exit_fn(torch.cat([x, torch.flip(x, [3])]))
        return decode(heatmaps[0], tags[0], heatmaps[1], tags[1], cfg=cfg, resize=info,
                      flip_index=flip_index)
    heatmaps, tags = exit_fn(x)
    return decode(heatmaps[0], tags[0], cfg=cfg, resize=info, flip_index=flip_index)
