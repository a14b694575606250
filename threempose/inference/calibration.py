"""Choosing the EELs' exit thresholds on a val split: per-image records of every exit, the
threshold search and the trade-off table. The library behind ``python -m threempose.calibrate``
(its docstring describes the method)."""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from threempose.config import DataConfig, EELConfig, InferConfig
from threempose.data.coco import CocoKeypoints, coco_split_paths
from threempose.data.coco_eval import evaluate_keypoints
from threempose.data.sampler import warn_skipped
from threempose.data.synthetic import ensure_synthetic
from threempose.inference.dynamic_exit import NEVER, ExitScore, choose_exit
from threempose.inference.predictor import Predictor, decode_image, image_passes, prepare_image, with_flips
from threempose.util.errors import UserError

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
    give the EEL scores) and record the outcomes. Images that cannot be read are left out (as
    per-epoch validation leaves them out), with one warning naming them; none readable is a
    :class:`CalibrationError`."""
    cfg = predictor.cfg
    records, skipped = [], []
    index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    for image_id in tqdm(image_ids, desc="calibrate", unit="img", disable=not progress):
        decoded = dataset.decode(index_of[image_id])
        if decoded is None:
            skipped.append(str(dataset.image_path(index_of[image_id])))
            continue
        image = np.asarray(decoded)
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
    if not records:
        raise CalibrationError(f"none of the {len(image_ids)} val images of {dataset.annotation_file} "
                               "can be read")
    if skipped:
        warn_skipped(skipped, "calibration image reads failed to decode and were left out")
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
