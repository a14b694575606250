"""Choosing the EELs' exit thresholds on a val split: per-image records of every exit, the
threshold search and the trade-off table. The library behind ``python -m threempose.calibrate``
(its docstring describes the method).

Memory does not grow with the people found: each image's record (every exit's people, its
EEL scores and GFLOPs) goes to a :class:`~threempose.util.journal.Journal` on disk as it is
produced (:func:`record_exits`); :class:`SettingEvaluator` reads the journal back once, keeps
per image only its scores and GFLOPs and, per exit, the few arrays COCOeval pools
(:class:`threempose.data.coco_eval.ImageMatches`), and scores every threshold setting from those."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from threempose.config import DataConfig, EELConfig, InferConfig
from threempose.data.coco import CocoKeypoints, coco_split_paths
from threempose.data.coco_eval import PerImageKeypointEval
from threempose.data.sampler import warn_skipped
from threempose.data.synthetic import ensure_synthetic
from threempose.inference.dynamic_exit import NEVER, ExitScore, choose_exit
from threempose.inference.predictor import Predictor, decode_image, image_passes, prepare_image, with_flips
from threempose.util.errors import UserError
from threempose.util.files import atomic_open
from threempose.util.journal import Journal, journal_path

TABLE_METRICS = {"AP": "AP", "AP(M)": "APM", "AP(L)": "APL"}   # column -> COCOeval stat


class CalibrationError(UserError, ValueError):
    """Calibration cannot proceed or meet its budget (the message says why)."""


@dataclass
class ImageRecord:
    """One val image's outcome at every exit.

    image_id: its COCO id; input_size: padded network input (width, height);
    gflops: ``{exit layer: GFLOPs spent if the image stops there}`` (passes counted);
    scores: ``{EEL layer: ExitScore}``; results: ``{exit layer: COCO results entries}`` (None
    in :attr:`SettingEvaluator.records`: the people stay on disk, their matches in the evaluator).
    """

    image_id: int
    input_size: tuple[int, int]
    gflops: dict[int, float]
    scores: dict[int, ExitScore]
    results: Optional[dict[int, list[dict]]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (a journal line; an entry of ``--records``)."""
        assert self.results is not None, "a record without its results is not written"
        return {"image_id": self.image_id, "input_size": list(self.input_size),
                "gflops": {str(k): v for k, v in self.gflops.items()},
                "scores": {str(k): s.to_dict() for k, s in self.scores.items()},
                "results": {str(k): v for k, v in self.results.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageRecord":
        return cls(d["image_id"], tuple(d["input_size"]), {int(k): v for k, v in d["gflops"].items()},
                   {int(k): ExitScore(v["detected"], v["confidence"]) for k, v in d["scores"].items()},
                   {int(k): v for k, v in d["results"].items()})


def val_split(cfg: DataConfig) -> CocoKeypoints:
    """The val split of a data config (the embedded synthetic set is generated if needed)."""
    if cfg.dataset == "synthetic":
        splits = ensure_synthetic(cfg.synthetic, progress=False)
        images, annotations = splits.val_images, splits.val_annotations
    else:
        images, annotations = coco_split_paths(cfg.root, cfg.val_split)
    return CocoKeypoints(images, annotations, cfg, train=False)


def journal_header(checkpoint: str | Path, dataset: CocoKeypoints, infer: InferConfig, max_images: int) -> dict:
    """What the records of a run depend on, for :class:`~threempose.util.journal.Journal`'s
    resume check: the model file's and the val annotation file's SHA-256 (contents, not
    paths), the infer settings (the EELs' thresholds left out: records do not depend on them),
    ``--max-images``."""
    def sha256(path: str | Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    settings = json.loads(json.dumps(dataclasses.asdict(infer)))
    for eel in settings["eels"]:
        del eel["threshold"]
    return {"records": "calibrate", "checkpoint_sha256": sha256(checkpoint),
            "val_annotations_sha256": sha256(dataset.annotation_file), "max_images": max_images,
            "infer": settings}


def records_journal(out: str | Path, header: dict) -> Journal:
    """The journal of calibrate's per-image records (:meth:`ImageRecord.to_dict` lines, keyed by image id)."""
    return Journal(journal_path(out), key=lambda entry: entry["image_id"], header=header)


@torch.no_grad()
def record_exits(predictor: Predictor, dataset: CocoKeypoints, image_ids: Sequence[int], journal: Journal,
                 progress: bool = True) -> None:
    """Run every exit on each image of ``image_ids`` that ``journal`` does not hold yet
    (``predictor`` in dynamic mode: its rules give the EEL scores) and append its
    :class:`ImageRecord` to ``journal`` as it finishes. The progress bar counts the images the
    journal held as done (its ETA is for the rest). Images that cannot be read are left out
    (as per-epoch validation leaves them out), with one warning naming them; none readable
    (in the journal either) is a :class:`CalibrationError`."""
    cfg = predictor.cfg
    skipped = []
    index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    todo = [i for i in image_ids if i not in journal.done]
    for image_id in tqdm(todo, desc="calibrate", unit="img", disable=not progress, total=len(image_ids),
                         initial=len(image_ids) - len(todo)):
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
        journal.add(ImageRecord(image_id, info.input_size, predictor.exit_gflops((height, width)),
                                scores, results).to_dict())
    if not journal.done:
        raise CalibrationError(f"none of the {len(image_ids)} val images of {dataset.annotation_file} "
                               "can be read")
    if skipped:
        warn_skipped(skipped, "calibration image reads failed to decode and were left out")


def journal_records(journal: Journal) -> Iterable[ImageRecord]:
    """The records of ``journal``, read one line at a time."""
    return (ImageRecord.from_dict(entry) for entry in journal.entries())


def write_records(path: str | Path, head: dict[str, Any], journal: Journal) -> None:
    """``--records``: ``head``'s fields, then ``records``, the journal's lines, streamed into
    ``path`` (written atomically)."""
    with atomic_open(path) as f:
        f.write(json.dumps(head)[:-1] + (", " if head else "") + '"records": [')
        for i, entry in enumerate(journal.entries()):
            f.write((", " if i else "") + json.dumps(entry))
        f.write("]}\n")


def assign_exits(records: Sequence[ImageRecord], thresholds: dict[int, float], final_layer: int) -> tuple[int, ...]:
    """The exit each image takes under ``thresholds`` (``{EEL layer: threshold}``)."""
    return tuple(choose_exit(r.scores, thresholds, final_layer) for r in records)


def mean_gflops(records: Sequence[ImageRecord], exits: Sequence[int]) -> float:
    """Mean GFLOPs per image when image ``i`` stops at ``exits[i]``."""
    return float(np.mean([r.gflops[e] for r, e in zip(records, exits)]))


class SettingEvaluator:
    """COCO AP/AR of per-image exit assignments (cached per assignment).

    ``records`` is read once (a journal's records, a list): each image's people at every exit
    are matched against the ground truth (:meth:`PerImageKeypointEval.match`) and dropped;
    ``self.records`` keeps the rest of each record (``results`` None). A setting's stats pool
    the matches of the exits it assigns (:meth:`PerImageKeypointEval.stats`), equal to
    COCOeval on the mixed results."""

    def __init__(self, coco, records: Iterable[ImageRecord]) -> None:
        self.per_image = PerImageKeypointEval(coco)
        self.records: list[ImageRecord] = []
        self._matches: list[dict[int, tuple]] = []       # per record: {exit layer: matches}
        for r in records:
            self._matches.append({layer: self.per_image.match(r.image_id, people)
                                  for layer, people in r.results.items()})
            self.records.append(dataclasses.replace(r, results=None))
        self.image_ids = [r.image_id for r in self.records]
        self._cache: dict[bytes, dict[str, float]] = {}

    def stats(self, exits: Sequence[int]) -> dict[str, float]:
        key = hashlib.blake2b(np.asarray(exits, dtype=np.int64).tobytes(), digest_size=16).digest()
        if key not in self._cache:
            self._cache[key] = self.per_image.stats({r.image_id: m[e] for r, m, e in
                                                     zip(self.records, self._matches, exits, strict=True)})
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
    settings = []                      # the exits per image are assigned again when scored (not held)
    for values in itertools.product(*candidates):
        thresholds = dict(zip(eel_layers, values))
        settings.append((mean_gflops(records, assign_exits(records, thresholds, final_layer)),
                         tuple(-v for v in values), thresholds))
    settings.sort(key=lambda s: s[:2])
    for gflops, _, thresholds in settings:
        exits = assign_exits(records, thresholds, final_layer)
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
