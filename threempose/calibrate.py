"""Choose the EELs' exit thresholds on a val split (beyond the thesis).

    python -m threempose.calibrate --checkpoint model.pt --config C.json --out infer.json \\
        [--max-ap-drop 0.01] [--max-images N] [--grid 16] [--records records.json] [--device cpu]

1. Every val image of ``C.json``'s data section (synthetic or COCO; the first ``--max-images``
   by id) runs through the whole network once. Per image we record each exit's decoded people
   (COCO results), the GFLOPs each exit would have cost, and each EEL's dynamic-inference score
   (``N`` and Eq. 3.4's confidence, :mod:`threempose.dynamic_exit`). Decoding uses ``C.json``'s
   ``infer`` section; Eq. 3.4's ``c0, c1, c2`` come from its ``infer.eels`` (``1, 1, 1`` for an
   EEL it does not configure). ``--records`` saves all of this as JSON.
2. A threshold setting (one per EEL) sends each image to the exit that the live rule would
   (:func:`threempose.dynamic_exit.choose_exit`: first EEL with ``N = 0`` or ``conf >=
   threshold``, else the last layer); its AP is COCOeval on the mixed results, its cost the
   mean GFLOPs of the exits taken.
3. Candidate thresholds per EEL: up to ``--grid`` of the observed confidences (evenly spaced
   quantiles, always actual values) and ``1.0`` (never: conf < 0.5 < 1). The settings are
   tried from the cheapest up; the first whose AP is at most ``--max-ap-drop`` (absolute,
   AP in [0, 1]) below the last exit's wins. The ``N = 0`` rule is always on (it is part of
   the method); if even the all-``never`` setting drops AP by more than the budget, nothing is
   written and the exit status is 2.
4. ``--out`` gets ``{"infer": {...}}``: ``C.json``'s infer section with ``exit = "dynamic"`` and
   the chosen thresholds (loadable with :func:`threempose.config.load_config`; pass it to
   ``threempose.infer --config``). The trade-off table (Table 4.3's shape: every exit, the
   dynamic rule with ``C.json``'s thresholds and with the calibrated ones) is printed.

GFLOPs count both flip-test passes (see :mod:`threempose.predictor`).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from threempose.atomic import atomic_write_json
from threempose.cli import UserError, check_output_file, entry_point
from threempose.config import DataConfig, EELConfig, InferConfig, load_config
from threempose.data.coco import CocoKeypoints, coco_split_paths
from threempose.data.image_io import read_image
from threempose.data.synthetic import ensure_synthetic
from threempose.dynamic_exit import DYNAMIC, NEVER, ExitScore, choose_exit
from threempose.evaluate import evaluate_keypoints
from threempose.predictor import Predictor, decode_image, image_passes, prepare_image, with_flips

TABLE_METRICS = {"AP": "AP", "AP(M)": "APM", "AP(L)": "APL"}   # column -> COCOeval stat


class CalibrationError(UserError, ValueError):
    """Calibration cannot proceed or meet its budget (the message says why)."""


@dataclass
class ImageRecord:
    """One val image's outcome at every exit.

    image_id: its COCO id; input_size: padded network input (width, height);
    gflops: ``{exit layer: GFLOPs spent if the image stops there}`` (passes counted);
    scores: ``{EEL layer: ExitScore}``; results: ``{exit layer: COCO results entries}``.
    """

    image_id: int
    input_size: tuple[int, int]
    gflops: dict[int, float]
    scores: dict[int, ExitScore]
    results: dict[int, list[dict]]

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "input_size": list(self.input_size),
                "gflops": {str(k): v for k, v in self.gflops.items()},
                "scores": {str(k): s.to_dict() for k, s in self.scores.items()},
                "results": {str(k): v for k, v in self.results.items()}}


def val_split(cfg: DataConfig) -> CocoKeypoints:
    """The val split of a data config (the embedded synthetic set is generated if needed)."""
    if cfg.dataset == "synthetic":
        splits = ensure_synthetic(cfg.synthetic, progress=False)
        images, annotations = splits.val_images, splits.val_annotations
    else:
        images, annotations = coco_split_paths(cfg.root, cfg.val_split)
    return CocoKeypoints(images, annotations, cfg, train=False)


@torch.no_grad()
def collect_records(predictor: Predictor, dataset: CocoKeypoints, image_ids: Sequence[int],
                    progress: bool = True) -> list[ImageRecord]:
    """Run every exit on each image of ``image_ids`` (``predictor`` in dynamic mode: its rules
    give the EEL scores) and record the outcomes."""
    cfg = predictor.cfg
    records = []
    for image_id in tqdm(image_ids, desc="calibrate", unit="img", disable=not progress):
        image = np.asarray(read_image(dataset.image_dir / dataset.coco.imgs[image_id]["file_name"]))
        x, info = prepare_image(image, cfg.short_side, predictor.device)
        exits = predictor.net(with_flips(x, cfg.flip_test))
        scores, results = {}, {}
        for out in exits:
            heatmaps = image_passes(out.heatmaps, 0, 1, cfg.flip_test)
            tags = image_passes(out.tags, 0, 1, cfg.flip_test)
            if out.layer in predictor.rules:
                scores[out.layer] = predictor.score(heatmaps, info, out.layer)
            people = decode_image(heatmaps, tags, predictor.decode_params, info, predictor.flip_index)
            results[out.layer] = [p.to_coco(image_id) for p in people]
        width, height = info.input_size
        records.append(ImageRecord(image_id, info.input_size, predictor.exit_gflops((height, width)),
                                   scores, results))
    return records


def assign_exits(records: Sequence[ImageRecord], thresholds: dict[int, float], final_layer: int) -> tuple[int, ...]:
    """The exit each image takes under ``thresholds`` (``{EEL layer: threshold}``)."""
    return tuple(choose_exit(r.scores, thresholds, final_layer) for r in records)


def mean_gflops(records: Sequence[ImageRecord], exits: Sequence[int]) -> float:
    """Mean GFLOPs per image when image ``i`` stops at ``exits[i]``."""
    return float(np.mean([r.gflops[e] for r, e in zip(records, exits)]))


class SettingEvaluator:
    """COCO AP/AR of per-image exit assignments on the recorded results (cached per assignment)."""

    def __init__(self, coco, records: Sequence[ImageRecord]) -> None:
        self.coco = coco
        self.records = list(records)
        self.image_ids = [r.image_id for r in self.records]
        self._cache: dict[tuple[int, ...], dict[str, float]] = {}

    def stats(self, exits: Sequence[int]) -> dict[str, float]:
        key = tuple(exits)
        if key not in self._cache:
            results = [entry for r, e in zip(self.records, key) for entry in r.results[e]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # "no detections" is a legitimate outcome
                self._cache[key] = evaluate_keypoints(self.coco, results, image_ids=self.image_ids)
        return self._cache[key]

    @property
    def evaluations(self) -> int:
        return len(self._cache)


def candidate_thresholds(records: Sequence[ImageRecord], layer: int, grid: int) -> list[float]:
    """Up to ``grid`` observed confidences at ``layer`` (evenly spaced quantiles of the distinct
    values, always actual values), then :data:`NEVER`; ascending."""
    values = np.unique([r.scores[layer].confidence for r in records
                        if r.scores[layer].confidence is not None])
    if len(values) > grid:
        values = values[np.unique(np.round(np.linspace(0, len(values) - 1, grid)).astype(int))]
    return [float(v) for v in values] + [NEVER]


@dataclass
class Choice:
    """A threshold setting and how it did: thresholds ``{EEL layer: t}``, exits per image,
    mean GFLOPs, COCOeval stats, AP drop vs the last exit."""

    thresholds: dict[int, float]
    exits: tuple[int, ...]
    gflops: float
    stats: dict[str, float]
    ap_drop: float


def search_thresholds(evaluator: SettingEvaluator, eel_layers: Sequence[int], final_layer: int,
                      max_ap_drop: float, grid: int = 16) -> Optional[Choice]:
    """The cheapest threshold setting (mean GFLOPs) whose AP drop vs the last exit is at most
    ``max_ap_drop``; among equally cheap settings the one with the highest thresholds. None when
    no candidate setting meets the budget."""
    records = evaluator.records
    reference = evaluator.stats((final_layer,) * len(records))["AP"]
    candidates = [candidate_thresholds(records, layer, grid) for layer in eel_layers]
    settings = []
    for values in itertools.product(*candidates):
        thresholds = dict(zip(eel_layers, values))
        exits = assign_exits(records, thresholds, final_layer)
        settings.append((mean_gflops(records, exits), tuple(-v for v in values), thresholds, exits))
    settings.sort(key=lambda s: s[:2])
    for gflops, _, thresholds, exits in settings:
        stats = evaluator.stats(exits)
        drop = reference - stats["AP"]
        if drop <= max_ap_drop + 1e-12:
            return Choice(thresholds, exits, gflops, stats, drop)
    return None


def _exit_shares(exits: Sequence[int], layers: Sequence[int]) -> str:
    return "  ".join(f"{layer}: {100.0 * sum(e == layer for e in exits) / len(exits):.1f}%" for layer in layers)


def trade_off_table(evaluator: SettingEvaluator, exit_layers: Sequence[int],
                    dynamic_rows: Sequence[tuple[str, Sequence[int]]]) -> str:
    """Table 4.3's shape: one row per static exit, then the given dynamic assignments."""
    records = evaluator.records
    head = f"{'exit':<24}{'GFLOPs':>10}" + "".join(f"{m:>8}" for m in TABLE_METRICS) + "   exits taken"
    lines = [head, "-" * len(head)]
    rows = [(f"layer {layer}" + (" (final)" if layer == exit_layers[-1] else ""), (layer,) * len(records))
            for layer in exit_layers] + [(name, tuple(exits)) for name, exits in dynamic_rows]
    for name, exits in rows:
        stats = evaluator.stats(exits)
        shares = _exit_shares(exits, exit_layers) if name.startswith("dynamic") else ""
        lines.append(f"{name:<24}{mean_gflops(records, exits):>10.4g}"
                     + "".join(f"{stats[m]:>8.3f}" for m in TABLE_METRICS.values()) + f"   {shares}")
    return "\n".join(lines)


def calibration_rules(infer: InferConfig, eel_layers: Sequence[int]) -> tuple[list[EELConfig], list[str]]:
    """One EELConfig per network EEL (the configured one, or c0 = c1 = c2 = 1) and notes."""
    configured = {e.layer: e for e in infer.eels}
    notes = [f"infer.eels has no entry for EEL {layer}: using c0 = c1 = c2 = 1"
             for layer in eel_layers if layer not in configured]
    unused = sorted(set(configured) - set(eel_layers))
    if unused:
        notes.append(f"infer.eels entries for layers {unused} are not EELs of this network: dropped")
    return [configured.get(layer, EELConfig(layer=layer)) for layer in eel_layers], notes


def saturation_notes(records: Sequence[ImageRecord], eel_layers: Sequence[int]) -> list[str]:
    """Notes for EELs where most detected images have conf = 0.5 (the sigmoid rounded to 1)."""
    notes = []
    for layer in eel_layers:
        conf = [r.scores[layer].confidence for r in records if r.scores[layer].confidence is not None]
        saturated = sum(c >= 0.5 for c in conf)
        if conf and saturated * 2 > len(conf):
            notes.append(f"EEL {layer}: {saturated} of {len(conf)} detected images have conf = 0.5 (the "
                         "sigmoid saturates); the confidence cannot rank them -- lower c0 to spread them")
    return notes


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m threempose.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model.pt written by threempose.train")
    p.add_argument("--config", required=True, help="config with the data section (val split) and infer settings")
    p.add_argument("--out", required=True, help="inference config JSON to write ({\"infer\": ...})")
    p.add_argument("--max-ap-drop", type=float, default=0.01,
                   help="largest AP loss vs the last exit, absolute (AP in [0, 1]; default 0.01)")
    p.add_argument("--max-images", type=int, default=0, help="use the first N val images (default all)")
    p.add_argument("--grid", type=int, default=16, help="candidate thresholds per EEL (default 16)")
    p.add_argument("--records", help="also write the per-image records (confidences, per-exit results)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.max_ap_drop < 0 or args.grid < 1 or args.max_images < 0:
        p.error("--max-ap-drop must be >= 0, --grid >= 1 and --max-images >= 0")
    return args


def calibrate(args: argparse.Namespace) -> int:
    from threempose.model_file import load_model_file

    check_output_file(args.out, "--out")
    cfg = load_config(args.config)
    net, _ = load_model_file(args.checkpoint)
    exit_layers = list(net.genotype.exit_layers)
    eel_layers, final = exit_layers[:-1], exit_layers[-1]
    if not eel_layers:
        raise CalibrationError(f"{args.checkpoint} has no early exit to calibrate (exits: {exit_layers})")
    eels, notes = calibration_rules(cfg.infer, eel_layers)
    infer = dataclasses.replace(cfg.infer, exit=DYNAMIC, eels=eels)
    predictor = Predictor(net, infer, args.device)
    dataset = val_split(cfg.data)
    ids = dataset.image_ids[:args.max_images] if args.max_images else dataset.image_ids
    if not ids:
        raise CalibrationError(f"{args.config}: the val split has no images")
    records = collect_records(predictor, dataset, ids, progress=not args.no_progress)
    evaluator = SettingEvaluator(dataset.coco, records)
    reference = evaluator.stats((final,) * len(records))["AP"]
    if reference < 0:
        raise CalibrationError(f"{args.config}: the val images hold no annotated person; AP is undefined")
    configured = {e.layer: e.threshold for e in eels}
    choice = search_thresholds(evaluator, eel_layers, final, args.max_ap_drop, args.grid)
    if args.records:
        atomic_write_json(args.records, {
            "exit_layers": exit_layers, "eel_layers": eel_layers, "max_ap_drop": args.max_ap_drop,
            "thresholds": {str(k): v for k, v in (choice.thresholds if choice else {}).items()},
            "records": [r.to_dict() for r in records]}, indent=None)
    dynamic_rows = [("dynamic (config)", assign_exits(records, configured, final))]
    if choice is not None:
        dynamic_rows.append(("dynamic (calibrated)", choice.exits))
    print(f"calibration on {len(records)} val images of {args.config} (flip test "
          f"{'on: GFLOPs count both passes' if infer.flip_test else 'off'})")
    print(trade_off_table(evaluator, exit_layers, dynamic_rows))
    for note in notes + saturation_notes(records, eel_layers):
        print(f"note: {note}")
    if choice is None:
        raise CalibrationError(f"no threshold setting keeps the AP drop within {args.max_ap_drop}: the N = 0 "
                               "rule alone (an EEL that detects nothing stops the image) costs more; "
                               "nothing written")
    chosen = [dataclasses.replace(e, threshold=choice.thresholds[e.layer]) for e in eels]
    atomic_write_json(args.out, {"infer": dataclasses.asdict(dataclasses.replace(infer, eels=chosen))})
    final_gflops = mean_gflops(records, (final,) * len(records))
    print("chosen thresholds: " + ", ".join(
        f"EEL {layer}: {t:.6g}" + (" (never)" if t == NEVER else "") for layer, t in choice.thresholds.items()))
    print(f"AP {choice.stats['AP']:.4f} vs {reference:.4f} at the last exit (drop {choice.ap_drop:.4f} <= "
          f"{args.max_ap_drop}); GFLOPs {choice.gflops:.4g} vs {final_gflops:.4g} "
          f"({100.0 * (1 - choice.gflops / final_gflops):.1f}% saved); {evaluator.evaluations} settings scored")
    print(f"wrote {args.out}")
    return 0


@entry_point(also=(ValueError,))
def main(argv: Optional[Sequence[str]] = None) -> int:
    return calibrate(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
