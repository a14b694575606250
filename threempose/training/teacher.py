"""The teacher of the RDM student-teacher loss (thesis §3.4).

``loss.teacher.model`` picks it:

* ``higherhrnet-w32`` - HigherHRNet-W32 with the weights of ``loss.teacher.checkpoint``
  (the official ``pose_higher_hrnet_w32_512.pth`` loads unchanged); its features are the
  ``loss.teacher.layers`` named by :meth:`HigherHRNet.feature_specs`.
* ``threempose`` - a trained threempose network (the ``model.pt`` that ``train`` writes);
  its features are the outputs of all its cells (``loss.teacher.layers`` is not used).

With ``loss.teacher_weight`` 0 there is no teacher and no file is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from threempose.config import ConfigError, LossConfig
from threempose.models.higherhrnet import load_teacher


class Teacher:
    """A frozen network and the features it contributes to the teacher loss."""

    def __init__(self, model: nn.Module, layers: list[str] | None):
        self.model, self.layers = model, layers

    @torch.no_grad()
    def features(self, images: Tensor) -> list[Tensor]:
        """Teacher features of ``images`` ``[B, 3, H, W]``: a list of ``[B, C_i, h_i, w_i]``."""
        if self.layers is not None:
            feats = self.model.features(images, self.layers)
            return [feats[name] for name in self.layers]
        cells: list[Tensor] = []
        for _ in self.model.run(images, self.model.genotype, cell_outputs=cells):
            pass
        return cells


def build_teacher(cfg: LossConfig, device: torch.device) -> Optional[Teacher]:
    """The teacher of ``cfg`` on ``device``, or None when ``cfg.teacher_weight`` is 0."""
    if not cfg.teacher_weight:
        return None
    t = cfg.teacher
    if not t.checkpoint:
        raise ConfigError("loss.teacher_weight is non-zero but loss.teacher.checkpoint is not set: "
                          "point it at pose_higher_hrnet_w32_512.pth (model higherhrnet-w32) or a "
                          "threempose model.pt (model threempose), or set loss.teacher_weight to 0")
    if not Path(t.checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {t.checkpoint} (loss.teacher.checkpoint); "
                                "download HigherHRNet-W32's pose_higher_hrnet_w32_512.pth there, or "
                                "set loss.teacher_weight to 0")
    if t.model == "higherhrnet-w32":
        return Teacher(load_teacher(t, device), list(t.layers))
    from threempose.nas.model_file import load_model_file

    net, _ = load_model_file(t.checkpoint, device)
    for p in net.parameters():
        p.requires_grad_(False)
    return Teacher(net, None)
