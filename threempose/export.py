"""Export a trained network as exit segments: ``torch.export`` programs and ONNX models.

    python -m threempose.export --checkpoint model.pt --out DIR [--format pt2,onnx]
    python -m threempose.export --checkpoint model.pt --out DIR --precision int8 --calibration-images DIR
    python -m threempose.export --checkpoint model.pt --out DIR --precision bf16 --format pt2

Precisions: fp32; bf16 (``.pt2`` programs in bfloat16); int8 (onnxruntime QDQ ONNX segments
calibrated on real images: :mod:`threempose.inference.quantize`).

The directory's format and the ONNX / torch.export details: :mod:`threempose.inference.segments`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from threempose.inference.predictor import network_inputs
from threempose.inference.quantize import PRECISIONS, calibration_images, check_precision, export_int8
from threempose.inference.segments import FORMATS, SIZE_MULTIPLE, check_export_dir, export_segments
from threempose.util.cli import entry_point


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m threempose.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model.pt written by threempose.train")
    p.add_argument("--out", required=True, help="directory to write (segments and threempose.json)")
    p.add_argument("--format", help=f"comma-separated subset of {','.join(FORMATS)} (default: both; pt2 for "
                                    "bf16, onnx for int8)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default), bf16 (.pt2 only) or int8 (ONNX, needs --calibration-images)")
    p.add_argument("--calibration-images", metavar="DIR", help="int8: a folder of real images to calibrate on")
    args = p.parse_args(argv)
    from threempose.nas.model_file import load_model_file

    default = {"fp32": ",".join(FORMATS), "bf16": "pt2", "int8": "onnx"}[args.precision]
    formats = [f.strip() for f in (args.format or default).split(",") if f.strip()]
    if args.precision == "int8" and formats != ["onnx"]:
        raise ValueError("int8 exports hold onnxruntime ONNX segments only; leave out --format or use onnx")
    check_precision(args.precision, args.calibration_images)
    check_export_dir(args.out)
    images = calibration_images(args.calibration_images) if args.precision == "int8" else None
    net, infer = load_model_file(args.checkpoint)
    if args.precision == "int8":
        out = export_int8(net, args.out, infer, network_inputs(images, int(infer.get("short_side", 512))))
    else:
        out = export_segments(net, args.out, infer, formats, precision=args.precision)
    layers = net.genotype.exit_layers
    print(f"exported {args.checkpoint} -> {out}: {len(layers)} segments ending at exits {layers} "
          f"({','.join(formats)}, {args.precision}); input [B, 3, H, W], H and W multiples of {SIZE_MULTIPLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
