"""Network outputs -> people in original-image coordinates -> COCO results.

The HigherHRNet / Associative Embedding test procedure (thesis §4.1 "Testing"):

1. flip test: average the heatmaps of the image and of its horizontally flipped
   copy (flipped back, joints permuted with the flip pairs) and concatenate their
   tags along the tag dimension (L -> 2L), as HigherHRNet does;
2. optionally project both to the network-input resolution (HigherHRNet's
   ``PROJECT2IMAGE``, bilinear; the tags only where they are read,
   :mod:`~threempose.decode.projection`);
3. heatmap NMS by max-pooling and the top-k candidates per joint
   (:mod:`~threempose.decode.heatmap_nms`);
4. grouping by tags with an optimal assignment per joint
   (:mod:`~threempose.decode.grouping`, C++ when built);
5. person score = mean of the J grouped joint values (0 for missing joints),
   taken before refinement as in HigherHRNet;
6. quarter-pixel adjustment and refinement of missing joints in a window
   around each person (:mod:`~threempose.decode.adjust`);
7. mapping to original-image coordinates (:mod:`~threempose.decode.resize`).

A predictor calls::

    people = decode(heatmaps, tags, flip_heatmaps, flip_tags, cfg=config.infer, resize=info)
    results += coco_results(people, image_id)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from threempose.config import InferConfig
from threempose.data.keypoints import NUM_JOINTS, flip_index as coco_flip_index
from threempose.decode.adjust import adjust_people, refine_people, refine_windows
from threempose.decode.grouping import MAX_ASSIGNMENT_SIZE, Backend, GroupingParams, group_people
from threempose.decode.heatmap_nms import top_k_candidates
from threempose.decode.projection import ProjectedTags
from threempose.decode.resize import ResizeInfo


@dataclass(frozen=True)
class DecodeParams(GroupingParams):
    """Everything the decoder needs: the grouping settings plus

    top_k: candidates per joint type (HigherHRNet: MAX_NUM_PEOPLE = 30).
    nms_kernel: max-pool window of the heatmap NMS (odd; HigherHRNet-W32 at 512: 5,
        applied at the input resolution).
    adjust: quarter-pixel adjustment of grouped joints.
    refine: fill missing joints from a window of the maps around each person.
    project_to_input: upsample heatmaps and tags to the network-input resolution
        before NMS (HigherHRNet's PROJECT2IMAGE); needs ``resize``. With False the
        maps are decoded at their own resolution (16x fewer pixels at stride 4).
    """

    top_k: int = 30
    nms_kernel: int = 5
    adjust: bool = True
    refine: bool = True
    project_to_input: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.top_k <= MAX_ASSIGNMENT_SIZE:
            raise ValueError(f"top_k must be in 1..{MAX_ASSIGNMENT_SIZE}, got {self.top_k}")
        if self.nms_kernel < 1 or self.nms_kernel % 2 == 0:
            raise ValueError(f"nms_kernel must be an odd positive size, got {self.nms_kernel}")

    @classmethod
    def from_config(cls, cfg: InferConfig, **overrides) -> "DecodeParams":
        """Parameters from an :class:`InferConfig`: every field with the same name
        as a config attribute takes the config's value; ``overrides`` win."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown decode parameter(s) {unknown}; known: {sorted(names)}")
        values = {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}
        values.update(overrides)
        return cls(**values)


@dataclass
class Person:
    """One decoded person.

    keypoints: float64 [J, 3] (x, y, score) — x, y in original-image pixel
        coordinates (COCO convention; decoding-map coordinates when no
        ``resize`` was given), score = heatmap value; (0, 0, 0) = not found.
    score: the person score, mean of the J grouped joint values (missing = 0).
    tag: float64 [L] the mean tag of the grouped joints (L = 2 x the network's
        tag dimension with flip test).
    """

    keypoints: np.ndarray
    score: float
    tag: np.ndarray

    def to_coco(self, image_id: int, category_id: int = 1) -> dict:
        """A COCO keypoint results entry: image_id, category_id, keypoints (3J floats), score."""
        return {"image_id": int(image_id), "category_id": int(category_id),
                "keypoints": [float(v) for v in self.keypoints.reshape(-1)],
                "score": float(self.score)}


def coco_results(people: Sequence[Person], image_id: int, category_id: int = 1) -> list[dict]:
    """COCO results entries for one image (a list to extend and dump as JSON)."""
    return [p.to_coco(image_id, category_id) for p in people]


# --------------------------------------------------------------------------- #
# Flip test and projection
# --------------------------------------------------------------------------- #
def _as_array(x, name: str) -> np.ndarray:
    arr = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else \
        np.asarray(x, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity (check the network output)")
    return arr


def _check_maps(heatmaps, tags, which: str) -> tuple[np.ndarray, np.ndarray]:
    """[J, h, w] heatmaps and [J, h, w(, L)] tags -> float32 [J, h, w] and [J, L, h, w]."""
    hm = _as_array(heatmaps, f"{which}heatmaps")
    tg = _as_array(tags, f"{which}tags")
    if hm.ndim != 3:
        raise ValueError(f"{which}heatmaps must be [J, h, w] (one image), got shape {hm.shape}")
    if tg.ndim == 3:
        tg = tg[..., None]
    if tg.ndim != 4 or tg.shape[:3] != hm.shape:
        raise ValueError(f"{which}tags must be [J, h, w] or [J, h, w, L] at the heatmaps' "
                         f"resolution {hm.shape}, got {tg.shape}")
    return hm, tg.transpose(0, 3, 1, 2)


def merge_flip(heatmaps, tags, flip_heatmaps=None, flip_tags=None,
               flip_index: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Combine the outputs for an image and for its horizontal flip.

    heatmaps: [J, h, w]; tags: [J, h, w] or [J, h, w, L] (NumPy or torch).
    flip_heatmaps, flip_tags: the network's outputs for the horizontally flipped
        input, as produced (not flipped back); both or neither.
    flip_index: joint permutation for the flip (default: COCO's for J = 17).
    Returns (heatmaps float32 [J, h, w], tag maps float32 [J, L', h, w] — channel-first,
    the layout the rest of the decoder uses) with L' = 2L with flip (the image's
    tags first), L without.
    """
    hm, tg = _check_maps(heatmaps, tags, "")
    if (flip_heatmaps is None) != (flip_tags is None):
        raise ValueError("give both flip_heatmaps and flip_tags for the flip test, or neither")
    if flip_heatmaps is None:
        return hm, np.ascontiguousarray(tg)
    fhm, ftg = _check_maps(flip_heatmaps, flip_tags, "flip_")
    if fhm.shape != hm.shape or ftg.shape != tg.shape:
        raise ValueError(f"flipped outputs {fhm.shape}/{ftg.shape} do not match {hm.shape}/{tg.shape}")
    num_joints = hm.shape[0]
    if flip_index is None:
        if num_joints != NUM_JOINTS:
            raise ValueError(f"flip_index is needed for {num_joints} joints (the default is COCO's 17)")
        flip_index = coco_flip_index()
    perm = np.asarray(flip_index, dtype=np.int64)
    if sorted(perm.tolist()) != list(range(num_joints)):
        raise ValueError(f"flip_index {perm.tolist()} is not a permutation of 0..{num_joints - 1}")
    fhm = fhm[perm, :, ::-1]
    ftg = ftg[perm, :, :, ::-1]
    return (hm + fhm) / 2, np.concatenate([tg, ftg], axis=1)


def project_maps(heatmaps: np.ndarray, tags: np.ndarray,
                 size: tuple[int, int]) -> tuple[np.ndarray, ProjectedTags]:
    """Bilinear (align_corners=False) resampling of heatmaps [J, h, w] and tag maps
    [J, L, h, w] to size (width, height): float32 [J, H, W], and the tags as
    :class:`ProjectedTags` (computed only where the decoder reads them)."""
    width, height = size
    hm = F.interpolate(torch.from_numpy(np.ascontiguousarray(heatmaps))[None], size=(height, width),
                       mode="bilinear", align_corners=False)[0]
    return hm.numpy(), ProjectedTags(tags, size)


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #
def _params(cfg: Union[InferConfig, DecodeParams, None]) -> DecodeParams:
    if cfg is None:
        return DecodeParams()
    if isinstance(cfg, DecodeParams):
        return cfg
    if isinstance(cfg, InferConfig):
        return DecodeParams.from_config(cfg)
    raise TypeError(f"cfg must be an InferConfig, a DecodeParams or None, got {type(cfg).__name__}")


def decode(heatmaps, tags, flip_heatmaps=None, flip_tags=None, *,
           cfg: Union[InferConfig, DecodeParams, None] = None,
           resize: Optional[ResizeInfo] = None,
           flip_index: Optional[Sequence[int]] = None,
           backend: Backend = "auto") -> list[Person]:
    """Decode one image's network outputs into people (see the module docstring).

    heatmaps: [J, h, w]; tags: [J, h, w] or [J, h, w, L] at the same resolution
        (NumPy or torch; a batch is decoded one image at a time).
    flip_heatmaps, flip_tags: raw outputs for the horizontally flipped network
        input (flip the padded input tensor, e.g. ``torch.flip(x, [3])``), or None.
    cfg: an InferConfig (top_k, detection_threshold, tag_threshold, adjust and
        refine are read; other settings keep DecodeParams' defaults), a
        DecodeParams, or None for the defaults.
    resize: how the original image became the network input; keypoints come back
        in original-image coordinates. Without it they stay in decoding-map
        coordinates (and ``project_to_input`` must be False).
    flip_index: joint permutation of a horizontal flip (default COCO's).
    backend: grouping backend, "auto" | "native" | "reference" ("reference" also
        runs the NumPy NMS instead of the C++ one).
    Returns people sorted by score, highest first.
    """
    params = _params(cfg)
    hm, tg = merge_flip(heatmaps, tags, flip_heatmaps, flip_tags, flip_index)
    if params.project_to_input:
        if resize is None:
            raise ValueError("project_to_input needs resize=ResizeInfo (the network-input size); "
                             "pass it or use DecodeParams(project_to_input=False)")
        hm, tg = project_maps(hm, tg, resize.input_size)
    else:
        tg = ProjectedTags(tg, (hm.shape[2], hm.shape[1]))
    cands = top_k_candidates(hm, tg, params.top_k, params.nms_kernel,
                             "reference" if backend == "reference" else "auto")
    grouped = group_people(cands.vals, cands.tags, cands.locs, params, backend)  # [P, J, 3 + L]
    scores = grouped[..., 2].astype(np.float64).mean(axis=1)
    xy = adjust_people(grouped, hm) if params.adjust else grouped[..., :2].astype(np.float64)
    keypoints = np.concatenate([xy, grouped[..., 2:3].astype(np.float64)], axis=-1)
    if params.refine:
        windows = refine_windows(grouped, (hm.shape[2], hm.shape[1]))
        keypoints = refine_people(keypoints, grouped[..., 3:], hm, tg, windows)
    people = []
    for p in range(grouped.shape[0]):
        kp = keypoints[p]
        found = kp[:, 2] > 0
        if resize is not None:
            kp[:, :2] = resize.map_to_original(kp[:, :2], (hm.shape[2], hm.shape[1]))
        kp[~found] = 0.0
        tag = grouped[p, grouped[p, :, 2] > 0, 3:].astype(np.float64).mean(axis=0)
        people.append(Person(keypoints=kp, score=float(scores[p]), tag=tag))
    people.sort(key=lambda person: -person.score)
    return people
