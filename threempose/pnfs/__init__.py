"""PNFS mode (Pose Neural Fabrics Search, top-down): a second mode of the threempose stack.

Building blocks:

* :mod:`~threempose.pnfs.parts` — Table I body-part groupings (P = 1, 3, 5, 8) and the
  merge of shared keypoints;
* :mod:`~threempose.pnfs.vector_head` — vector in pixel: head, squash and its inverse, Eq. 6 loss;
* :mod:`~threempose.config` — ``TopDownConfig`` (the config's ``pnfs.topdown`` section);
* :mod:`~threempose.pnfs.topdown_data` — person crops, augmentation, targets;
* :mod:`~threempose.pnfs.mpii_data` — MPII person crops from the common MPII JSON (16 joints);
* :mod:`~threempose.pnfs.topdown_decode` — decoding, flip test, OKS-NMS, COCO results;
* :mod:`~threempose.pnfs.pckh` — PCKh@0.5 / @0.1 for MPII-style annotations (also a CLI).

Networks (on :mod:`threempose.nas`' cells, ops, architecture parameters and samplers):

* :mod:`~threempose.pnfs.cnf` — fabric backbones and part subnetworks as cell fabrics,
  searchable (dense / dyn_egs / argmax) or fixed, and pruning (§III-F);
* :mod:`~threempose.pnfs.backbone` — HRNet stem..stage 3, MobileNet-V2, ResNet-50, or a fabric backbone;
* :mod:`~threempose.pnfs.model` — ``PnfsNet`` (backbone + P part CNFs + heads), architecture
  files, model files, params / GFLOPs per crop.

Runs: :mod:`~threempose.pnfs.jobs` (search and train jobs), :mod:`~threempose.pnfs.topdown_predict`
(loaders, flip-test prediction, validation AP or PCKh), and the commands ``python -m threempose.pnfs.search``,
``.train``, ``.infer``, ``.profile`` (:mod:`~threempose.pnfs.dispatch` lets the main commands run them).

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
    "topdown_data": ("TopDownCocoDataset", "TopDownDataError"),
    "mpii_data": ("MpiiDataError", "TopDownMpiiDataset", "read_mpii_annotations"),
    "topdown_decode": ("coco_results", "decode_crops", "flip_back", "oks_nms"),
    "pckh": ("evaluate_pckh",),
    "cnf": ("FabricArchitecture", "FixedFabric", "PyramidGenotype", "PyramidLayout", "SearchableFabric"),
    "backbone": ("FabricBackbone", "HRNetBackbone", "MobileNetV2Backbone", "ResNet50Backbone"),
    "model": ("PnfsArchitecture", "PnfsNet", "load_pnfs_model", "profile_pnfs", "pruned_network",
              "save_pnfs_model"),
    "jobs": ("PnfsSearchJob", "PnfsTrainJob"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'threempose.pnfs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"threempose.pnfs.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
