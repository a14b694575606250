"""Export a trained network as exit segments: ``torch.export`` programs and ONNX models.

    python -m threempose.export --checkpoint model.pt --out DIR [--format pt2,onnx]
    python -m threempose.export --checkpoint model.pt --out DIR --precision int8 --calibration-images DIR
    python -m threempose.export --from-export FP32_DIR --out DIR --precision int8 --calibration-images DIR
    python -m threempose.export --checkpoint model.pt --out DIR --precision bf16 --format pt2

Precisions: fp32; bf16 (``.pt2`` programs in bfloat16); int8 (onnxruntime QDQ ONNX segments
calibrated on real images: :mod:`threempose.inference.quantize`), from the checkpoint (a float32
ONNX export made on the way) or, with ``--from-export``, from a float32 export you already have
(quantization only: ~25 s instead of ~70 s for the thesis net at 512 on a 2-core CPU).

The directory's format and the ONNX / torch.export details: :mod:`threempose.inference.segments`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from threempose.inference.predictor import network_inputs
from threempose.inference.quantize import (PRECISIONS, calibration_images, check_precision, export_int8,
                                           quantize_export)
from threempose.inference.segments import FORMATS, SIZE_MULTIPLE, check_export_dir, export_segments, read_metadata
from threempose.util.cli import entry_point


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m threempose.export", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a model.pt written by threempose.train")
    source.add_argument("--from-export", metavar="DIR",
                        help="int8 only: quantize this float32 export (with ONNX segments) instead of "
                             "exporting a checkpoint again")
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
    if args.from_export and args.precision != "int8":
        raise ValueError("--from-export quantizes a float32 export: use it with --precision int8")
    check_precision(args.precision, args.calibration_images)
    out = check_export_dir(args.out)
    if args.from_export:
        meta = read_metadata(args.from_export)
        if out.resolve() == Path(args.from_export).resolve():
            raise ValueError("--out must differ from --from-export (the float32 export is kept as it is)")
    images = calibration_images(args.calibration_images) if args.precision == "int8" else None
    if args.from_export:
        inputs = network_inputs(images, int(meta.get("infer", {}).get("short_side", 512)))
        out = quantize_export(args.from_export, out, inputs)
        layers = meta["exit_layers"]
    else:
        net, infer = load_model_file(args.checkpoint)
        if args.precision == "int8":
            out = export_int8(net, out, infer, network_inputs(images, int(infer.get("short_side", 512))))
        else:
            out = export_segments(net, out, infer, formats, precision=args.precision)
        layers = net.genotype.exit_layers
    print(f"exported {args.checkpoint or args.from_export} -> {out}: {len(layers)} segments ending at exits {layers} "
          f"({','.join(formats)}, {args.precision}); input [B, 3, H, W], H and W multiples of {SIZE_MULTIPLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
