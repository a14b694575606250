"""Export a trained network with all its exits to TorchScript (decoding stays in Python/C++).

    python -m threempose.export --checkpoint model.pt --out model.ts [--input-size 512 | WxH]

The file holds a traced :class:`ExitsModule`: ``images [B, 3, H, W]`` (normalised as
:func:`threempose.predictor.prepare_image` does) ``-> (heatmaps, tags)``, each ``[E, B, J, H/4,
W/4]`` with one row per exit in layer order (every EEL, then the last layer). Its metadata
(``threempose.json`` extra file: exit layers, input size, joints, the model's infer settings
and genotype) is read back with :func:`load_exported`.

Input size. The fabric computes its feature sizes in Python from the input size, so the trace
bakes in the ``H x W`` it was traced at (the batch size stays free). A scripted check traced
into the module makes any other size fail with a clear error (``torch.jit.Error``: "traced for
input [B, 3, H, W], got ...") instead of giving wrong maps. Export once per input size you serve (e.g. 512 x 512 for square crops, or the padded
sizes ``threempose.predictor`` produces). The trace runs the whole network: every exit is
computed (no early exit).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from threempose.atomic import atomic_open
from threempose.cli import check_output_file, entry_point
from threempose.nas.derived import DerivedNet
from threempose.profile import parse_input_size

META_FILE = "threempose.json"
FORMAT = "threempose-exits/1"


@torch.jit.script
def _check_input(images: Tensor, height: int, width: int) -> Tensor:
    """``images`` unchanged if ``[B, 3, height, width]``; a RuntimeError naming both sizes otherwise."""
    if images.dim() != 4 or images.size(1) != 3 or images.size(2) != height or images.size(3) != width:
        raise RuntimeError("threempose export: this TorchScript module was traced for input [B, 3, "
                           + str(height) + ", " + str(width) + "], got " + str(images.shape)
                           + "; pad the image to that size or export again with --input-size")
    return images


class ExitsModule(nn.Module):
    """Every exit of a DerivedNet as two stacked tensors (see the module docstring).

    ``forward(images [B, 3, H, W]) -> (heatmaps [E, B, J, H/4, W/4], tags [E, B, J, H/4, W/4])``.
    """

    def __init__(self, net: DerivedNet, input_hw: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        images = _check_input(images, self.input_hw[0], self.input_hw[1])
        exits = self.net(images)
        return torch.stack([e.heatmaps for e in exits]), torch.stack([e.tags for e in exits])


def export_torchscript(net: DerivedNet, path: str | os.PathLike, input_hw: tuple[int, int],
                       infer: Optional[dict[str, Any]] = None) -> Path:
    """Trace ``net`` (eval mode, on the CPU) at ``input_hw = (H, W)`` and save it atomically.

    Returns the path. ``infer`` (the model's infer settings) is stored in the metadata.
    """
    net = net.cpu().eval()
    module = ExitsModule(net, input_hw).eval()
    example = torch.zeros(1, 3, *module.input_hw)
    with torch.no_grad(), warnings.catch_warnings():
        # Python-side size arithmetic is expected to be frozen into the trace (module docstring).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    meta = {"format": FORMAT, "exit_layers": list(net.genotype.exit_layers), "input_hw": list(module.input_hw),
            "num_joints": net.num_joints, "outputs": ["heatmaps [E, B, J, H/4, W/4]", "tags [E, B, J, H/4, W/4]"],
            "infer": infer or {}, "genotype": net.genotype.to_dict()}
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.jit.save(traced, f, _extra_files={META_FILE: json.dumps(meta)})
    return path


def load_exported(path: str | os.PathLike, device: str | torch.device = "cpu"
                  ) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """``(module, metadata)`` of a file written by :func:`export_torchscript`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    extra = {META_FILE: ""}
    module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    try:
        meta = json.loads(extra[META_FILE])
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a TorchScript file but not a threempose export (no {META_FILE})")
    return module, meta


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m threempose.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model.pt written by threempose.train")
    p.add_argument("--out", required=True, help="TorchScript file to write (e.g. model.ts)")
    p.add_argument("--input-size", type=parse_input_size, default=(512, 512),
                   help="traced input size: N (square) or WxH (default 512)")
    args = p.parse_args(argv)
    from threempose.model_file import load_model_file

    check_output_file(args.out, "--out")
    net, infer = load_model_file(args.checkpoint)
    path = export_torchscript(net, args.out, args.input_size, infer)
    h, w = args.input_size
    print(f"exported {args.checkpoint} -> {path}: exits {net.genotype.exit_layers}, input [B, 3, {h}, {w}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
