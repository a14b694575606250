"""Top-down inference with a trained PNFS model: person boxes in, COCO keypoint results out
(or, for an MPII model, MPII people in, PCKh predictions out).

    python -m threempose.pnfs.infer --checkpoint runs/.../model.pt \\
        --annotations person_keypoints_val2017.json --images val2017/ --out results.json
    python -m threempose.pnfs.infer --checkpoint M.pt --annotations A.json --images DIR \\
        --detections COCO_val2017_detections.json --out results.json --evaluate
    python -m threempose.pnfs.infer --checkpoint mpii-model.pt --annotations valid.json \\
        --images mpii/images --out preds.json --evaluate          # PCKh table

Every person box (the annotated ones, or ``--detections``' person boxes scoring at least the
model's ``topdown.detection_threshold``) is cropped as in training (``pnfs.topdown``), run with
flip test (unless ``--no-flip``), decoded (longest vector, quarter offset), rescored and
OKS-NMS'd per image (:func:`threempose.pnfs.topdown_predict.predict_results`). The results file is
what ``python -m threempose.evaluate`` scores; ``--evaluate`` prints that table too (the
annotation file is the ground truth). A model trained on MPII data reads ``--annotations`` as
the MPII JSON (:mod:`threempose.pnfs.mpii_data`; crops from each person's centre and scale)
and writes one 16 x ``[x, y, score]`` prediction per person, in file order, the predictions
file of ``python -m threempose.pnfs.pckh``; ``--evaluate`` prints PNFS Table V's PCKh columns.
``python -m threempose.infer`` runs this when the checkpoint is a PNFS model.

Python API::

    net, cfg = load_pnfs_model("model.pt")
    results = predict_file(net, cfg.pnfs.topdown, "A.json", "images/")     # COCO results list
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from threempose.config import TopDownConfig
from threempose.data.coco_eval import evaluate_keypoints, format_table
from threempose.pnfs.model import PnfsNet, load_pnfs_model
from threempose.pnfs.mpii_data import TopDownMpiiDataset
from threempose.pnfs.pckh import evaluate_pckh
from threempose.pnfs.pckh import format_table as format_pckh_table
from threempose.pnfs.topdown_data import TopDownCocoDataset
from threempose.pnfs.topdown_predict import predict_mpii, predict_results
from threempose.util.cli import check_output_file, entry_point, parse_device
from threempose.util.files import atomic_write_json


def predict_file(net: PnfsNet, cfg: TopDownConfig, annotations: Union[str, Path], images: Union[str, Path],
                 detections: Union[str, Path, None] = None, batch_size: int = 16,
                 device: Union[str, torch.device] = "cpu", num_workers: int = 0) -> list[dict]:
    """COCO keypoint results of ``net`` (eval mode) on the person boxes of ``annotations``
    (or of ``detections``), images read from ``images``."""
    crops = TopDownCocoDataset(annotations, images, cfg, train=False, detections=detections)
    net = net.to(device).eval()
    return predict_results(lambda x: net(x).scores, crops, cfg, batch_size, device, num_workers)


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m threempose.pnfs.infer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a PNFS model.pt (pnfs.search / pnfs.train)")
    parser.add_argument("--annotations", required=True,
                        help="COCO person-keypoints JSON of the images (MPII JSON for an MPII model)")
    parser.add_argument("--images", required=True, help="folder of the annotation file's images")
    parser.add_argument("--detections", help="COCO detection results JSON (default: the annotated boxes)")
    parser.add_argument("--out", required=True, help="where to write the COCO keypoint results JSON")
    parser.add_argument("--no-flip", action="store_true", help="no flip test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--evaluate", action="store_true", help="print the COCO keypoint AP/AR table")
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")
    net, cfg = load_pnfs_model(args.checkpoint, args.device)
    topdown = dataclasses.replace(cfg.pnfs.topdown, flip_test=cfg.pnfs.topdown.flip_test and not args.no_flip)
    if net.dataset == "mpii":
        if args.detections:
            parser.error("--detections: an MPII model crops each annotated person from its centre and scale")
        crops = TopDownMpiiDataset(args.annotations, args.images, topdown, train=False)
        people = predict_mpii(lambda x: net(x).scores, crops, topdown, args.batch_size, args.device)
        score = lambda: format_pckh_table(evaluate_pckh(args.annotations, args.out))  # noqa: E731
    else:
        people = predict_file(net, topdown, args.annotations, args.images, args.detections, args.batch_size,
                              args.device)
        score = lambda: format_table(evaluate_keypoints(args.annotations, args.out))  # noqa: E731
    atomic_write_json(args.out, people, indent=None)
    print(f"wrote {len(people)} people to {args.out}", file=sys.stderr)
    if args.evaluate:
        print(score())
    return 0


if __name__ == "__main__":
    sys.exit(main())
