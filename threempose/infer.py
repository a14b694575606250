"""Run a trained network on images: COCO keypoint results, drawings and a summary.

    python -m threempose.infer --checkpoint runs/train-.../model.pt --images DIR_OR_FILE \\
        --out results.json [--exit 4|7|final|dynamic] [--dynamic] [--draw OUT_DIR] \\
        [--batch N] [--device cpu|cuda] [--config infer.json] [--annotations A.json] [--no-optimize] [--benchmark] [--resume]
    python -m threempose.infer --runtime onnxruntime --onnx EXPORT_DIR --images ... (the same options)

Runtimes: ``torch`` (default) runs the network of ``--checkpoint``; ``onnxruntime`` runs the ONNX
exit segments of an export directory (``python -m threempose.export``; the export carries the
model's infer settings), with the same exit rule, batching and decoding.

Batches: ``--batch N`` images per call; with dynamic exits every image leaves the batch at its
own exit (:mod:`threempose.inference.predictor`). The next images are read and resized in a background
thread meanwhile; ``--benchmark`` prints images/s and where the time went.

Settings: the model file's ``infer`` section, or the ``infer`` section of ``--config`` (e.g. what
``threempose.calibrate`` writes; its defaults fill the keys it leaves out); ``--exit`` /
``--dynamic`` override ``infer.exit``.

The network runs inference-optimized (:mod:`threempose.inference.deploy`: BatchNorm folded into the
convolutions, channels-last, oneDNN fusion on the CPU); ``--no-optimize`` runs it as trained. On
the CPU the process keeps the memory it frees for the next batch
(:func:`threempose.util.heap.keep_freed_memory`: large activations are not faulted in anew each
batch; the thesis net at 512, batch 8: fp32 ~25% and bf16 ~20% faster), so its RSS stays near
its peak.

Inputs: one image file, or every regular, non-hidden file directly in a directory (sorted by
name; subdirectories are not searched). Files that cannot be read as images are skipped and
listed at the end; the run goes on.

Outputs (written atomically when the run finishes; nothing is written on an error). While it
runs, each image's results go to the journal ``OUT.partial`` as the image finishes (memory stays
flat over thousands of images); a killed run leaves it, and ``--resume`` continues after the
images it holds (:mod:`threempose.inference.result_journal`). The progress bar shows the ETA.

* ``--out results.json``: COCO keypoint results (a JSON list of ``{"image_id", "category_id",
  "keypoints": 51 numbers, "score"}``), scored by ``python -m threempose.evaluate
  --annotations A.json --results results.json`` when the ids are A's.
* ``results.images.json`` beside it: per image the file, image id, exit taken, GFLOPs spent,
  people found and (dynamic) the EEL confidences; the skipped files and the summary.
* ``--draw OUT_DIR``: one PNG per image with its people drawn (``<file stem>.png``; when two
  inputs share a stem, ``<file name with '.' -> '_'>.png``).

Image ids: with ``--annotations A.json`` (a COCO file), the id of A's image whose ``file_name``
has the same base name (inputs A does not list are skipped). Without it, a stable id from the
file name: the number itself when the stem is all ASCII digits (at most 18; COCO's ``000000000139.jpg`` -> 139),
else the first 48 bits of the SHA-1 of the file name; two inputs with the same id are an error.

GFLOPs count both flip-test passes (see :mod:`threempose.inference.predictor`). Exit status: 0 when at
least one image was processed, 2 with ``error: ...`` on bad input (missing or empty input,
not a threempose checkpoint, weights that do not fit the genotype, bad settings).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from threempose.inference.dynamic_exit import DYNAMIC
from threempose.inference.folder_run import InferInputError, check_drawing_targets, image_ids, list_images, run
from threempose.inference.predictor import Predictor
from threempose.inference.quantize import PRECISIONS, calibration_images, check_precision
from threempose.inference.result_journal import ResultJournal
from threempose.pnfs.dispatch import pnfs_main
from threempose.util.cli import check_output_dir, check_output_file, entry_point, parse_device
from threempose.util.heap import keep_freed_memory


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m threempose.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a model.pt written by threempose.train (the torch runtime)")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch",
                   help="torch: the PyTorch network of --checkpoint; onnxruntime: the ONNX exit segments "
                        "of --onnx DIR (python -m threempose.export), same exits and decoding")
    p.add_argument("--onnx", metavar="DIR", help="an export directory (with --runtime onnxruntime)")
    p.add_argument("--images", required=True, help="an image file or a directory of images")
    p.add_argument("--out", required=True, help="COCO results JSON to write")
    p.add_argument("--exit", help="exit to use: an EEL layer (e.g. 4, 7), final or dynamic "
                                  "(default: the settings' infer.exit)")
    p.add_argument("--dynamic", action="store_true", help="same as --exit dynamic")
    p.add_argument("--draw", metavar="OUT_DIR", help="write a PNG per image with its people drawn")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (with dynamic exits "
                                                        "each image leaves the batch at its own exit)")
    p.add_argument("--device", type=parse_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--config", help="a JSON config whose infer section replaces the model file's")
    p.add_argument("--annotations", help="COCO annotations: take image ids from them")
    p.add_argument("--no-optimize", action="store_true",
                   help="run the network as trained: no BatchNorm folding, channels-last or oneDNN "
                        "fusion (threempose.inference.deploy; on by default, same people up to float rounding)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run: skip the images whose results its journal (OUT.partial) holds")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp32 (default for --checkpoint), bf16 or int8 (needs --calibration-images); with "
                        "--onnx the export's own precision (default)")
    p.add_argument("--calibration-images", metavar="DIR", help="--precision int8: real images to calibrate on")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--benchmark", action="store_true",
                   help="print images/s and the time split: image loading, network, exit scoring, decoding")
    args = p.parse_args(argv)
    if args.runtime == "torch" and (args.checkpoint is None or args.onnx is not None):
        p.error("the torch runtime needs --checkpoint (and no --onnx; use --runtime onnxruntime for that)")
    if args.runtime == "onnxruntime" and (args.onnx is None or args.checkpoint is not None):
        p.error("--runtime onnxruntime needs --onnx DIR (the export holds the network and its infer settings) "
                "and no --checkpoint")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.dynamic and args.exit not in (None, DYNAMIC):
        p.error(f"--dynamic contradicts --exit {args.exit}")
    return args


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    if (pnfs := pnfs_main("infer", argv)) is not None:     # a top-down PNFS config / model
        return pnfs()
    args = parse_args(argv)
    if args.runtime == "onnxruntime" or str(args.device).startswith("cpu"):
        keep_freed_memory()             # module docstring: each batch reuses the last one's pages
    out = check_output_file(args.out, "--out")
    per_image = check_output_file(out.with_suffix(".images.json"), "--out (per-image summary)")
    draw_dir = check_output_dir(args.draw, "--draw") if args.draw else None
    files = list_images(args.images)
    if draw_dir is not None:
        check_drawing_targets(draw_dir, files)
    ids, skipped = image_ids(files, args.annotations)
    overrides = {"exit": DYNAMIC if args.dynamic else args.exit} if (args.dynamic or args.exit) else {}
    if args.runtime == "onnxruntime":
        predictor = Predictor.from_export(args.onnx, "onnxruntime", config=args.config, precision=args.precision,
                                          **overrides)
    else:
        precision = args.precision or "fp32"
        check_precision(precision, args.calibration_images, args.device)
        calib = calibration_images(args.calibration_images) if precision == "int8" else None
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, config=args.config,
                                              optimize=not args.no_optimize, precision=precision,
                                              calibration_images=calib, **overrides)
    journal = ResultJournal(out)
    if args.resume and not journal.path.is_file():
        print(f"--resume: no journal {journal.path} of an earlier run; starting from the first image",
              file=sys.stderr)
    journal.open(resume=args.resume)
    try:
        summary = run(predictor, files, ids, journal, args.batch, draw_dir, progress=not args.no_progress)
    finally:
        journal.close()                 # a killed or failed run keeps its journal for --resume
    summary.skipped = skipped + summary.skipped
    if not summary.overall["images"]:
        journal.discard()
        print(summary.text(), file=sys.stderr)
        raise InferInputError(f"no image of {args.images} could be processed; nothing written")
    people = journal.finish(per_image, {
        "checkpoint": str(args.checkpoint or args.onnx), "runtime": args.runtime,
        "exit": str(predictor.cfg.exit), "flip_test": predictor.cfg.flip_test, "summary": summary.totals()},
        summary.skipped)
    print(summary.text())
    if args.benchmark:
        print(summary.timing_text())
    print(f"results: {out} ({people} people), per image: {out.with_suffix('.images.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
