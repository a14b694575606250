"""Top-down data loaders and inference for PNFS runs: crops in, COCO keypoint results out.

* :func:`build_topdown_loaders` — train (augmented, order fixed by seed and epoch), an
  optional held-out ``arch`` part of the train split (bilevel search) and val crops of the
  ``data`` section's data set (the synthetic set or COCO), with GT boxes or ``pnfs.detections``.
* :func:`predict_keypoints` — the network over crops with flip test (average of the crop's
  scores and the flipped crop's, flipped back), decoded into image keypoints.
* :func:`predict_results` — those keypoints rescored, OKS-NMS'd and written as COCO results
  (:func:`threempose.pnfs.topdown_decode.coco_results`).
* :func:`validation_ap` — COCO OKS AP/AR of a network on the crops of the first ``n`` val
  images, through :func:`threempose.data.coco_eval.evaluate_keypoints`.
* :func:`predict_mpii` — the keypoints of MPII crops as a PCKh predictions list.
* :func:`validation_pckh` — PCKh@0.5 / @0.1 (head-size normalised, :mod:`threempose.pnfs.pckh`)
  of a network on the first ``n`` val people of MPII data (``data.dataset: "mpii"``, or the
  synthetic set with ``data.synthetic.format: "mpii"``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from threempose.config import Config, TopDownConfig
from threempose.data.coco_eval import evaluate_keypoints
from threempose.data.loader import split_paths
from threempose.data.sampler import EpochSampler, held_out_split
from threempose.data.synthetic import ensure_synthetic
from threempose.pnfs.mpii_data import MpiiDataError, TopDownMpiiDataset
from threempose.pnfs.pckh import pckh_table
from threempose.pnfs.topdown_data import TopDownCocoDataset
from threempose.pnfs.topdown_decode import coco_results, decode_crops, flip_back
from threempose.util.threads import single_threaded_worker

# images [N, 3, H, W] -> merged scores [N, 17, H/4, W/4]
ScoreFn = Callable[[Tensor], Tensor]

_ARCH_SPLIT_STREAM = 2 ** 31 + 7      # numpy seed-sequence entry of the train / arch split


@dataclass
class TopDownLoaders:
    """Loaders of one PNFS run. ``train`` / ``arch`` yield crops in an order fixed by (seed,
    epoch) (``loader.sampler.set_epoch(epoch)`` picks the epoch; the augmentation follows it);
    ``val`` holds every val crop, in
    file order; ``val_annotations`` and ``val_image_ids`` are what the evaluator needs."""

    train: DataLoader
    arch: Optional[DataLoader]
    val: DataLoader
    val_annotations: Path
    val_image_ids: list[int]


def mpii_split_paths(cfg: Config, progress: bool = True) -> tuple[Path, Path, Path, Path]:
    """``(train_images, train_annotations, val_images, val_annotations)`` of MPII data: the synthetic
    set's ``mpii.json`` files, or ``data.root/annot/<split>.json`` and ``data.root/images`` (HRNet's
    MPII layout; ``data.train_split`` / ``val_split`` name the files, e.g. ``train`` and ``valid``)."""
    d = cfg.data
    if d.dataset == "synthetic":
        s = ensure_synthetic(d.synthetic, progress=progress)
        return s.train_images, s.mpii_annotations("train"), s.val_images, s.mpii_annotations("val")
    root = Path(d.root)
    paths = (root / "images", root / "annot" / f"{d.train_split}.json", root / "images",
             root / "annot" / f"{d.val_split}.json")
    missing = sorted({str(p) for p in paths if not p.exists()})
    if missing:
        raise MpiiDataError(f"MPII data not found: {', '.join(missing)} missing. Lay MPII out as "
                            f"{root}/images/*.jpg and {root}/annot/{d.train_split}.json, {d.val_split}.json "
                            "(the common JSON form of the MPII annotations), or set data.root")
    return paths


def topdown_datasets(cfg: Config, progress: bool = True) -> tuple[Dataset, Dataset, Path]:
    """``(train crops, val crops, val annotation file)`` of ``cfg.data`` with ``cfg.pnfs.topdown``
    settings (the synthetic set is generated on first use; COCO must be laid out as
    ``data.root/annotations/person_keypoints_<split>.json``, MPII as in :func:`mpii_split_paths`).
    COCO val crops use ``pnfs.detections`` when set, else the annotated boxes; MPII crops come
    from each person's ``center`` and ``scale``."""
    td = cfg.pnfs.topdown
    if is_mpii(cfg):
        train_images, train_ann, val_images, val_ann = mpii_split_paths(cfg, progress)
        return (TopDownMpiiDataset(train_ann, train_images, td, train=True, seed=cfg.run.seed),
                TopDownMpiiDataset(val_ann, val_images, td, train=False), val_ann)
    train_images, train_ann, val_images, val_ann = split_paths(cfg.data, progress)
    train = TopDownCocoDataset(train_ann, train_images, td, train=True, seed=cfg.run.seed)
    val = TopDownCocoDataset(val_ann, val_images, td, train=False, detections=cfg.pnfs.detections)
    return train, val, val_ann


def build_topdown_loaders(cfg: Config, *, rank: int = 0, world_size: int = 1,
                          arch_fraction: Optional[float] = None, progress: bool = True) -> TopDownLoaders:
    """The loaders of a PNFS run (module docstring). ``arch_fraction`` holds that part of the
    train crops out as ``arch`` (a split fixed by ``run.seed``)."""
    train_set, val_set, val_ann = topdown_datasets(cfg, progress)
    d, seed = cfg.data, cfg.run.seed
    common = dict(batch_size=d.batch_size, num_workers=d.num_workers, pin_memory=torch.cuda.is_available(),
                  worker_init_fn=single_threaded_worker)
    indices, arch = list(range(len(train_set))), None
    if arch_fraction is not None:
        indices, held_out = held_out_split(len(indices), arch_fraction, seed, _ARCH_SPLIT_STREAM)
        arch = DataLoader(train_set, sampler=EpochSampler(held_out, seed + 1, True, rank, world_size),
                          drop_last=True, **common)
    train = DataLoader(train_set, sampler=EpochSampler(indices, seed, True, rank, world_size),
                       drop_last=True, **common)
    for name, loader in (("train", train), ("arch", arch)):
        if loader is not None and len(loader) == 0:
            raise ValueError(f"{train_set.annotation_file}: the {name} loader gets {len(loader.sampler)} person "
                             f"crops per process, fewer than data.batch_size {d.batch_size}; lower the batch "
                             "size or add images")
    val = DataLoader(val_set, batch_size=d.batch_size, shuffle=False, num_workers=d.num_workers,
                     worker_init_fn=single_threaded_worker)
    image_ids = sorted({s["image_id"] for s in val_set.samples})
    return TopDownLoaders(train, arch, val, val_ann, image_ids)


def crops_of_images(dataset: TopDownCocoDataset, image_ids: Sequence[int]) -> Subset:
    """The crops of ``dataset`` whose image is one of ``image_ids``, in dataset order."""
    wanted = set(image_ids)
    return Subset(dataset, [i for i, s in enumerate(dataset.samples) if s["image_id"] in wanted])


@torch.no_grad()
def predict_keypoints(score_fn: ScoreFn, crops: Dataset, cfg: TopDownConfig, batch_size: int = 16,
                      device: torch.device | str = "cpu", num_workers: int = 0) -> dict[str, np.ndarray]:
    """Run ``score_fn`` over evaluation crops (``train=False`` samples) and decode them.

    Args:
        score_fn: crops ``[N, 3, H, W]`` -> merged scores ``[N, 17, H/4, W/4]``.
        crops: a :class:`TopDownCocoDataset` (or a Subset of one) without augmentation.
        cfg: ``flip_test`` and ``heatmap_stride``.
    Returns:
        ``{"image_ids" [N], "keypoints" [N, 17, 3] (x, y in image pixels, score), "box_scores" [N],
        "areas" [N]}``.
    """
    out = {"image_ids": [], "keypoints": [], "box_scores": [], "areas": []}
    for batch in DataLoader(crops, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            worker_init_fn=single_threaded_worker):
        images = batch["image"].to(device)
        scores = score_fn(images)
        if cfg.flip_test:
            scores = (scores + flip_back(score_fn(images.flip(-1)))) / 2
        out["keypoints"].append(decode_crops(scores.float().cpu(), batch["matrix"].numpy(), cfg.heatmap_stride))
        out["image_ids"].append(batch["image_id"].numpy())
        out["box_scores"].append(batch["box_score"].double().numpy())
        out["areas"].append(batch["area"].double().numpy())
    if not out["keypoints"]:
        joints = len(getattr(crops, "dataset", crops)[0]["joints"]) if len(crops) else 17
        return {"image_ids": np.zeros(0, np.int64), "keypoints": np.zeros((0, joints, 3)),
                "box_scores": np.zeros(0), "areas": np.zeros(0)}
    return {k: np.concatenate(v) for k, v in out.items()}


def predict_results(score_fn: ScoreFn, crops: Dataset, cfg: TopDownConfig, batch_size: int = 16,
                    device: torch.device | str = "cpu", num_workers: int = 0) -> list[dict]:
    """COCO keypoint results of ``score_fn`` on ``crops``: :func:`predict_keypoints`, then
    rescoring and per-image OKS-NMS (``cfg.keypoint_threshold``, ``cfg.oks_nms_threshold``)."""
    pred = predict_keypoints(score_fn, crops, cfg, batch_size, device, num_workers)
    return coco_results(pred["image_ids"].tolist(), pred["keypoints"], pred["box_scores"], pred["areas"],
                        cfg.keypoint_threshold, cfg.oks_nms_threshold)


def validation_ap(score_fn: ScoreFn, loaders: TopDownLoaders, cfg: TopDownConfig, count: int,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """COCO OKS AP/AR (the ten COCOeval numbers) of ``score_fn`` on the crops of the first
    ``count`` val images (all when ``count <= 0``), plus ``crops`` (how many were scored)."""
    ids = loaders.val_image_ids if count <= 0 else loaders.val_image_ids[:count]
    crops = crops_of_images(loaders.val.dataset, ids)
    results = predict_results(score_fn, crops, cfg, loaders.val.batch_size, device, loaders.val.num_workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # "no detections" early in a search is expected
        stats = evaluate_keypoints(loaders.val_annotations, results, image_ids=ids)
    return {**stats, "crops": float(len(crops))}


def is_mpii(cfg: Config) -> bool:
    """Whether ``cfg``'s data are MPII people (16 joints): ``data.dataset: "mpii"`` or the synthetic
    set in its MPII format."""
    d = cfg.data
    return d.dataset == "mpii" or (d.dataset == "synthetic" and d.synthetic.format == "mpii")


def validation_pckh(score_fn: ScoreFn, loaders: TopDownLoaders, cfg: TopDownConfig, count: int,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """PCKh (PNFS Table V's columns, percent) of ``score_fn`` on the first ``count`` val people of
    MPII data (all when ``count <= 0``), plus ``crops``. Needs every val person's ``headbox``."""
    ids = loaders.val_image_ids if count <= 0 else loaders.val_image_ids[:count]
    dataset = loaders.val.dataset
    people = [dataset.people[i] for i in ids]
    if any(p["headbox"] is None for p in people):
        raise MpiiDataError(f"{dataset.annotation_file}: PCKh needs a 'headbox' for every val person")
    pred = predict_keypoints(score_fn, Subset(dataset, ids), cfg, loaders.val.batch_size, device,
                             loaders.val.num_workers)
    table = pckh_table(pred["keypoints"][:, :, :2], np.stack([p["joints"] for p in people]),
                       np.stack([p["visible"] for p in people]), np.stack([p["headbox"] for p in people]))
    return {"PCKh@0.5": table["Mean"], "PCKh@0.1": table["Mean@0.1"],
            **{k: table[k] for k in ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle")},
            "crops": float(len(ids))}


def predict_mpii(score_fn: ScoreFn, crops: TopDownMpiiDataset, cfg: TopDownConfig, batch_size: int = 16,
                 device: torch.device | str = "cpu", num_workers: int = 0) -> list[list[list[float]]]:
    """One prediction per person of an MPII crop set (``train=False``), in file order: 16 x
    ``[x, y, score]`` in image pixels, the predictions file :mod:`threempose.pnfs.pckh` reads."""
    pred = predict_keypoints(score_fn, crops, cfg, batch_size, device, num_workers)
    return pred["keypoints"].round(3).tolist()
