"""PNFS mode (Pose Neural Fabrics Search, top-down): the parts that do not need the fabric.

* :mod:`~threempose.pnfs.parts` — Table I body-part groupings (P = 1, 3, 5, 8) and the
  merge of shared keypoints;
* :mod:`~threempose.pnfs.vector_head` — vector in pixel: head, squash and its inverse, Eq. 6 loss;
* :mod:`~threempose.pnfs.topdown_data` — person crops, augmentation, targets, ``TopDownConfig``;
* :mod:`~threempose.pnfs.topdown_decode` — decoding, flip test, OKS-NMS, COCO results;
* :mod:`~threempose.pnfs.pckh` — PCKh@0.5 / @0.1 for MPII-style annotations (also a CLI).

The names below are imported on first use, so that ``python -m threempose.pnfs.pckh``
does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "parts": ("merge_part_outputs", "part_groups", "part_names", "parts_per_joint"),
    "vector_head": ("VectorInPixelHead", "expected_length", "part_scores", "pnfs_loss", "squash",
                    "squash_length", "unsquash"),
    "topdown_data": ("TopDownCocoDataset", "TopDownConfig", "TopDownDataError"),
    "topdown_decode": ("coco_results", "decode_crops", "flip_back", "oks_nms"),
    "pckh": ("evaluate_pckh",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'threempose.pnfs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"threempose.pnfs.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
