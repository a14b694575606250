"""The NVIDIA DALI data backend (``data.backend = "dali"``): the torch backend's batches from a DALI graph.

Python resolves each sample key ``(index, epoch)`` exactly as the torch backend does
(:class:`~threempose.data.coco.CocoKeypoints`: the same skip rule, annotations,
supervision mask and :func:`~threempose.data.augment.draw_params` draw from
``default_rng([seed, epoch, index])``) and feeds DALI, per batch, the encoded image,
the mask, the augmentation parameters and the keypoints (joints renamed with
:func:`~threempose.data.keypoints.flip_index` on flipped samples, people padded to
the batch's most). The graph (:func:`build_pipeline`):

* decodes the image: ``cpu`` (libjpeg-turbo, bit-identical to Pillow's decode) or
  ``mixed`` (nvJPEG on the GPU), EXIF orientation ignored as Pillow's ``open`` does;
* composes the affine of :mod:`threempose.data.augment` with ``fn.transforms``:
  ``T(crop centre + t) . R(rotation) . S(+-zoom, zoom) . T(-source centre)``, the flip
  folded in as the sign of the x zoom;
* warps image and mask with ``fn.warp_affine`` (``cpu`` or ``gpu``) under the matrix
  wrapped in +-0.5 translations (DALI puts (0, 0) at a pixel's corner, threempose at its
  centre), bilinear with the source clamped at its edge, times a nearest-neighbour warp
  filled with 0 outside (of the mask, fed as 1 + mask so it is nonzero everywhere inside):
  the torch/Pillow border rule (clamp within half a pixel of the image, 0 beyond);
* normalises the image (``crop_mirror_normalize``) and moves the keypoints
  (``coord_transform``).

:class:`DaliLoader` then makes the heatmap/joint targets on the run's device with the
torch backend's :func:`~threempose.data.targets.make_targets`, after cutting the padding.
Against the torch backend for the same key: decoded pixels are identical (``cpu``), the
matrix agrees to float32 (~1e-5), keypoints to ~1e-4 px (so a joint within that of a
heatmap-cell boundary may land in the neighbouring cell), images by < 1 grey level
away from the border, masks on all but a few cells where the warped mask is 1/2.

The order of a pass is :class:`~threempose.data.sampler.EpochSampler`'s, so
``set_epoch(epoch, skip_batches)`` resumes a killed run with the same batches (the loader,
not DALI, holds the state, so DALI's own checkpointing is not needed). Images Pillow cannot
open are skipped before DALI sees them; one whose data fails in DALI's decoder (a JPEG cut
after its header) fails the batch, is found with Pillow and skipped from then on, and the
batch runs again: the torch backend's skip rule either way.
"""
from __future__ import annotations

import functools
import math
import types
from collections import deque
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from threempose.config import ConfigError, DataConfig
from threempose.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentParams
from threempose.data.coco import CocoKeypoints, split_key
from threempose.data.keypoints import flip_index
from threempose.data.sampler import warn_skipped
from threempose.data.targets import ignore_mask, make_targets
from threempose.util.threads import usable_cores

AHEAD = 1             # batches scheduled beyond the one being consumed (DALI works on it meanwhile)
_INPUTS = ("encoded", "mask", "to_origin", "zoom", "angle", "to_crop", "points")


def dali_threads(num_workers: int) -> int:
    """DALI CPU threads: ``data.num_workers`` (the CPU share a run gives its data, as for the
    torch backend's workers), at least 1 and at most the usable cores, so DALI's threads do
    not fight torch's on a small machine."""
    return max(1, min(num_workers, usable_cores()))


def import_dali() -> types.SimpleNamespace:
    """``nvidia.dali``'s ``Pipeline``, ``fn`` and ``types``; ConfigError naming the extra when it is missing."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as dali_types
    except ImportError as e:
        raise ConfigError(f'data.backend is "dali" but NVIDIA DALI is not installed ({e}); install it '
                          'with pip install -e ".[dali]", or set data.backend to "torch"') from None
    return types.SimpleNamespace(Pipeline=dali.Pipeline, fn=fn, types=dali_types)


def decode(d: types.SimpleNamespace, encoded, gpu: bool):
    """The graph's decode (``d`` from :func:`import_dali`): RGB uint8 ``HWC`` from file bytes; ``cpu``
    (libjpeg-turbo, Pillow's decode) or ``mixed`` (nvJPEG); EXIF orientation ignored, as by Pillow's open."""
    return d.fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=d.types.RGB,
                               adjust_orientation=False)


def build_pipeline(cfg: DataConfig, batch_size: int, gpu: bool, num_threads: int,
                   device_id: Optional[int] = None):
    """The DALI graph of the module docstring (built), fed by name (:data:`_INPUTS`).

    Inputs per sample: ``encoded`` uint8 ``[n]`` (the file); ``mask`` uint8 ``[H, W, 1]``, 1 +
    the supervision mask (so that its nearest-neighbour warp filled with 0 is the inside test);
    ``to_origin`` float32 ``[2]`` (minus the source centre); ``zoom`` float32 ``[2]``
    (``(-zoom if flipped else zoom, zoom)``); ``angle`` float32 ``[]`` (DALI's angle, minus
    the rotation); ``to_crop`` float32 ``[2]`` (crop centre + translation); ``points``
    float32 ``[P * J, 2]`` (source pixels).
    Outputs per sample (on the GPU where ``gpu``): ``image`` float32 ``[3, S, S]``
    normalised; ``mask`` float32 ``[h, h]`` of 0/1; ``affine`` float32 ``[2, 3]`` (CPU); ``points``
    float32 ``[P * J, 2]`` in crop pixels (CPU).
    """
    d = import_dali()
    fn, t = d.fn, d.types
    size, hm = cfg.input_size, cfg.input_size // cfg.heatmap_stride
    pipe = d.Pipeline(batch_size=batch_size, num_threads=num_threads,
                      device_id=device_id if gpu else None, prefetch_queue_depth=1)
    with pipe:
        encoded, mask, to_origin, zoom, angle, to_crop, points = (
            fn.external_source(name=n, dtype=t.UINT8 if n in ("encoded", "mask") else t.FLOAT,
                               layout="HWC" if n == "mask" else None)
            for n in _INPUTS)
        affine = fn.transforms.translation(offset=to_origin)
        affine = fn.transforms.scale(affine, scale=zoom)
        affine = fn.transforms.rotation(affine, angle=angle)
        affine = fn.transforms.translation(affine, offset=to_crop)
        corner = fn.transforms.combine(fn.transforms.translation(offset=[-0.5, -0.5]), affine)
        corner = fn.transforms.translation(corner, offset=[0.5, 0.5])        # DALI's pixel-corner origin
        corner_hm = fn.transforms.scale(corner, scale=[1.0 / cfg.heatmap_stride] * 2)

        image = decode(d, encoded, gpu)
        if gpu:
            mask = mask.gpu()

        def warp(src, matrix, out):                 # bilinear, the source clamped at its edge
            return fn.warp_affine(src, matrix=matrix, size=[out, out], inverse_map=False,
                                  interp_type=t.INTERP_LINEAR, dtype=t.FLOAT)

        def inside(matrix, out):                    # where the source point is within half a pixel
            return fn.warp_affine(mask, matrix=matrix, size=[out, out], inverse_map=False,
                                  interp_type=t.INTERP_NN, fill_value=0) > 0

        image = warp(image, corner, size) * inside(corner, size)
        image = fn.crop_mirror_normalize(image, dtype=t.FLOAT, output_layout="CHW",
                                         mean=[m * 255.0 for m in IMAGENET_MEAN],
                                         std=[s * 255.0 for s in IMAGENET_STD])
        mask = (warp(mask, corner_hm, hm) - 1.0) * inside(corner_hm, hm) > 0.5
        points = fn.coord_transform(points, MT=affine)
        pipe.set_outputs(image, fn.cast(fn.squeeze(mask, axes=[2]), dtype=t.FLOAT), affine, points)
    pipe.build()
    return pipe


def dali_loader_factory(cfg: DataConfig, device: torch.device, gpu: bool):
    """``make(dataset, sampler, drop_last=...)`` -> a :class:`DaliLoader` of ``cfg``'s batch size
    and threads (``build_loaders``' switch); ConfigError at once when DALI is not installed."""
    import_dali()
    threads = dali_threads(cfg.num_workers)

    def make(dataset: CocoKeypoints, sampler, *, drop_last: bool) -> DaliLoader:
        return DaliLoader(dataset, sampler, batch_size=cfg.batch_size, drop_last=drop_last, device=device,
                          gpu=gpu, num_threads=threads)
    return make


class _Sample(NamedTuple):
    """One resolved sample key: the image read (``index``, file bytes, size) and its labels."""

    index: int
    encoded: np.ndarray
    width: int
    height: int
    keypoints: np.ndarray           # [P, J, 3] source pixels, joints renamed on flipped samples
    regions: list[Any]              # segmentations of the regions the loss ignores
    params: AugmentParams
    skipped: list[str]


class DaliLoader:
    """What :class:`~threempose.data.loader.PoseDataLoader` is for the torch backend, on DALI:
    batches of an :class:`~threempose.data.sampler.EpochSampler`'s keys, ready on ``device``
    (:meth:`~threempose.data.loader.DataLoaders.prepare`'s move to the device is a no-op).

    Args:
        dataset: the split (its ``cfg``, ``train`` and ``seed`` set the augmentation).
        sampler: the order of each pass.
        batch_size, drop_last: as for a DataLoader.
        device: where batches go.
        gpu: ``mixed`` decode and ``gpu`` warp on ``device`` (a CUDA device), else DALI's CPU operators.
        num_threads: DALI CPU threads (:func:`dali_threads`).

    A batch: ``image`` float32 ``[B, 3, S, S]``; ``heatmaps`` float32 ``[B, J, h, h]``; ``mask``
    float32 ``[B, h, h]``; ``joints`` int64 ``[B, max_people, J, 2]``; ``affine`` float64
    ``[B, 2, 3]``; ``flipped`` bool ``[B]``; ``image_id`` int64 ``[B]`` (the torch backend's).
    """

    def __init__(self, dataset: CocoKeypoints, sampler, *, batch_size: int, drop_last: bool,
                 device: torch.device, gpu: bool, num_threads: int):
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.device = torch.device(device)
        if gpu and self.device.type != "cuda":
            raise ConfigError(f'data.backend "dali" with data.augment.device "gpu" needs a CUDA run device, '
                              f'got {self.device}; use "auto" or "cpu"')
        device_id = None
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._build = functools.partial(build_pipeline, dataset.cfg, batch_size, gpu, num_threads, device_id)
        self.pipe = self._build()
        self._in_flight = 0                     # batches scheduled and not yet collected
        self._pass = 0                          # passes started (the latest one owns the pipeline)
        self.skipped_files: list[str] = []
        self.undecodable: set[int] = set()      # images whose header reads but whose data does not decode

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Order of ``epoch``; skip its first ``skip_batches`` batches (resume part-way)."""
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _resolve(self, key: tuple[int, int]) -> _Sample:
        """One key as CocoKeypoints resolves it (skip rule, annotations, draw), joints renamed if flipped."""
        ds = self.dataset
        index, epoch = split_key(key)
        i, (encoded, width, height), skipped = ds.first_readable(
            index, lambda k: None if k in self.undecodable else ds.read_encoded(k))
        keypoints, regions = ds.annotations(i)
        params = ds.augment_params(i, epoch)
        if params.flip:
            keypoints = keypoints[:, flip_index(ds.cfg.num_joints)]
        return _Sample(i, encoded, width, height, keypoints, regions, params, skipped)

    def _feed(self, keys: list[tuple[int, int]]) -> dict[str, Any]:
        """Feed the pipeline the batch of ``keys`` and schedule it; returns what its outputs are
        completed with: ``visible`` float64 ``[B, P, J]`` (P: the batch's most people, at least 1),
        ``flipped``, ``image_id``, ``skipped``; and ``keys``, ``indices`` (the images read) to
        feed it again after a failure."""
        cfg = self.dataset.cfg
        samples = [self._resolve(key) for key in keys]
        people = max(1, max(len(s.keypoints) for s in samples))
        centre = (cfg.input_size - 1) / 2
        feed: dict[str, list[np.ndarray]] = {n: [] for n in _INPUTS}
        visible = np.zeros((len(samples), people, cfg.num_joints))
        for b, s in enumerate(samples):
            padded = np.zeros((people, cfg.num_joints, 3), np.float32)
            padded[: len(s.keypoints)] = s.keypoints
            visible[b] = padded[..., 2]
            zoom = s.params.zoom(s.width, s.height, cfg.input_size)
            tx, ty = s.params.translation
            feed["encoded"].append(s.encoded)
            feed["mask"].append((1 - ignore_mask(s.regions, s.height, s.width))[..., None] + 1)
            feed["to_origin"].append(np.array([-(s.width - 1) / 2, -(s.height - 1) / 2], np.float32))
            feed["zoom"].append(np.array([-zoom if s.params.flip else zoom, zoom], np.float32))
            feed["angle"].append(np.array(-s.params.rotation, np.float32))
            feed["to_crop"].append(np.array([centre + tx, centre + ty], np.float32))
            feed["points"].append(np.ascontiguousarray(padded[..., :2].reshape(-1, 2)))
        for name, data in feed.items():
            self.pipe.feed_input(name, data)
        self.pipe.schedule_run()
        self._in_flight += 1
        return {"keys": keys, "indices": [s.index for s in samples], "visible": visible,
                "skipped": [f for s in samples for f in s.skipped],
                "flipped": torch.tensor([s.params.flip for s in samples]),
                "image_id": torch.tensor([self.dataset.image_id(s.index) for s in samples])}

    def _recover(self, pending: deque, error: Exception) -> None:
        """The graph failed on ``pending[0]``: Pillow decodes the pending batches' images in full, the
        ones it cannot decode are skipped from now on (as the torch backend skips them), and the
        pending batches run again on a new pipeline (DALI's is unusable after an error). Re-raises
        ``error`` when every image decodes (then it was not the data)."""
        bad = {i for fed in pending for i in fed["indices"] if self.dataset.decode(i) is None}
        if not bad:
            raise error
        self.undecodable |= bad
        self.pipe, self._in_flight = self._build(), 0
        for k, fed in enumerate(list(pending)):
            pending[k] = self._feed(fed["keys"])

    def _to_torch(self, tensors) -> Tensor:
        """A DALI TensorList of equal shapes as one tensor on ``self.device``."""
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        from nvidia.dali.tensors import TensorListGPU
        if isinstance(tensors, TensorListGPU):
            dense = tensors.as_tensor()
            out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=self.device)
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
            return out
        return torch.from_numpy(tensors.as_array()).to(self.device)

    def _collect(self, fed: dict[str, Any]) -> dict[str, Tensor]:
        """The next pipeline outputs as tensors on the device: ``image``, ``mask``, ``affine``
        float64, ``keypoints`` float64 ``[B, P, J, 3]`` (crop pixels, visibility), ``flipped``,
        ``image_id``."""
        image, mask, affine, points = self.pipe.outputs()
        self._in_flight -= 1
        visible = torch.from_numpy(fed["visible"])
        xy = torch.from_numpy(points.as_array()).double().view(*visible.shape, 2)
        return {"image": self._to_torch(image), "mask": self._to_torch(mask),
                "affine": self._to_torch(affine).double(),
                "keypoints": torch.cat([xy, visible[..., None]], dim=-1).to(self.device),
                "flipped": fed["flipped"].to(self.device), "image_id": fed["image_id"].to(self.device)}

    def augment(self, keys: list[tuple[int, int]]) -> dict[str, Tensor]:
        """The graph's outputs for one batch of sample keys (:meth:`_collect`; not during a pass)."""
        return self._collect(self._feed(keys))

    def _with_targets(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """A training batch: the heatmaps and joints of ``out``'s keypoints replace them."""
        cfg = self.dataset.cfg
        heatmaps, joints = make_targets(out.pop("keypoints"), cfg.heatmap_stride,
                                        cfg.input_size // cfg.heatmap_stride, cfg.sigma, cfg.max_people)
        return {**out, "heatmaps": heatmaps, "joints": joints}

    def _drain(self) -> None:
        """Drop the batches scheduled but not collected (a pass left early); a pipeline that failed
        cannot be drained and is replaced."""
        try:
            while self._in_flight:
                self._in_flight -= 1
                self.pipe.outputs()
        except RuntimeError:
            self.pipe, self._in_flight = self._build(), 0

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """One pass. A new pass takes over the pipeline: an earlier, unfinished one then fails if resumed."""
        self._pass += 1
        me = self._pass
        self._drain()
        keys = list(self.sampler)
        batches = [keys[k: k + self.batch_size] for k in range(0, len(keys), self.batch_size)][: len(self)]
        pending: deque = deque()
        skipped: list[str] = []

        def owned() -> None:
            if self._pass != me:
                raise RuntimeError("a newer pass over this DaliLoader started; this one cannot go on")

        def ready() -> dict[str, Tensor]:
            owned()
            try:
                out = self._collect(pending[0])
            except RuntimeError as e:                # e.g. a JPEG truncated after its header
                self._recover(pending, e)
                out = self._collect(pending[0])
            skipped.extend(pending.popleft()["skipped"])
            return self._with_targets(out)

        try:
            for batch in batches:
                owned()
                pending.append(self._feed(batch))
                if len(pending) > AHEAD:
                    yield ready()
            while pending:
                yield ready()
        finally:
            if self._pass == me:
                self._drain()
            if skipped:
                self.skipped_files += skipped
                warn_skipped(skipped)
