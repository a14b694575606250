"""A trained threempose network on disk: its genotype, weights and inference settings.

``train`` writes ``model.pt`` with :func:`save_model_file`; ``infer``, ``export``, the
``threempose`` teacher and ``calibrate`` read it with :func:`load_model_file`. The file is
a tagged checkpoint (:mod:`threempose.engine.checkpoint`) holding::

    kind         "model"
    genotype     the genotype as a dict (format threempose.genotype/1)
    num_joints, stem_blocks
    model        DerivedNet.state_dict()
    infer        the run's "infer" config section (thresholds, EELs)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from threempose.engine.checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_checkpoint
from threempose.nas.derived import DerivedNet
from threempose.nas.genotype import Genotype


def save_model_file(path: str | os.PathLike, net: DerivedNet, infer: dict[str, Any]) -> Path:
    """Write ``net`` (weights on the CPU) with its genotype and ``infer`` settings, atomically."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return save_checkpoint(path, {"kind": "model", "genotype": net.genotype.to_dict(),
                                  "num_joints": net.num_joints, "stem_blocks": net.stem_blocks,
                                  "model": state, "infer": infer})


def load_model_file(path: str | os.PathLike, device: torch.device | str = "cpu"
                    ) -> tuple[DerivedNet, dict[str, Any]]:
    """``(network in eval mode on device, infer settings dict)`` from a model file.

    Raises CheckpointError when the file is missing, not a threempose model (e.g. a search
    checkpoint or a HigherHRNet file), or when its weights do not fit its genotype.
    """
    state = load_checkpoint(path, required=("kind",))
    if state["kind"] != "model":
        raise CheckpointError(f"{path} is a threempose {state['kind']!r} checkpoint, not a trained "
                              "model file; use the model.pt that threempose.train writes")
    for key in ("genotype", "num_joints", "stem_blocks", "model", "infer"):
        if key not in state:
            raise CheckpointError(f"{path}: model file lacks {key!r}")
    genotype = Genotype.from_dict(state["genotype"], source=str(path))
    net = DerivedNet(genotype, state["num_joints"], state["stem_blocks"])
    check_state_dict(net, state["model"], f"{path} (weights vs its genotype)")
    net.load_state_dict(state["model"])
    return net.to(device).eval(), state["infer"]
