"""Export a trained network as exit segments: ``torch.export`` programs and ONNX models.

    python -m threempose.export --checkpoint model.pt --out DIR [--format pt2,onnx]

The directory's format and the ONNX / torch.export details: :mod:`threempose.inference.segments`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from threempose.inference.segments import FORMATS, SIZE_MULTIPLE, check_export_dir, export_segments
from threempose.util.cli import entry_point


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m threempose.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model.pt written by threempose.train")
    p.add_argument("--out", required=True, help="directory to write (segments and threempose.json)")
    p.add_argument("--format", default=",".join(FORMATS),
                   help=f"comma-separated subset of {','.join(FORMATS)} (default: both)")
    args = p.parse_args(argv)
    from threempose.nas.model_file import load_model_file

    check_export_dir(args.out)
    net, infer = load_model_file(args.checkpoint)
    out = export_segments(net, args.out, infer, [f.strip() for f in args.format.split(",") if f.strip()])
    layers = net.genotype.exit_layers
    print(f"exported {args.checkpoint} -> {out}: {len(layers)} segments ending at exits {layers} "
          f"({args.format}); input [B, 3, H, W], H and W multiples of {SIZE_MULTIPLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
