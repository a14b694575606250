"""DataLoaders from a :class:`~threempose.config.DataConfig`.

Usage::

    data = build_loaders(cfg.data, seed=cfg.run.seed, device=device)
    for epoch in range(start_epoch, epochs):
        data.train.set_epoch(epoch)                  # same order on a resumed run
        for batch in data.train:
            batch = data.prepare(batch)              # on device: image, heatmaps, mask, joints, ...
    evaluate_keypoints(data.val_annotations, results, image_ids=data.val_image_ids)

The sample order of an epoch depends on ``(seed, epoch)`` only, and so does every
sample's augmentation (see :mod:`threempose.data.coco`), whatever the worker count.
``data.backend`` picks what feeds the run: ``torch`` (DataLoaders) or ``dali``
(:mod:`threempose.data.dali_pipeline`, the same batches from an NVIDIA DALI graph);
``data.augment.device`` picks where the warp runs: ``cpu`` (torch: Pillow, per
sample, in the workers; dali: DALI's CPU operators), ``gpu`` (torch: the batched
torch path on ``device``, normally a GPU; dali: nvJPEG decode and the GPU warp),
``auto`` (``gpu`` when ``device`` is CUDA). Nothing downstream of
:meth:`DataLoaders.prepare` can tell the backends apart.

Torch loader workers (:func:`worker_options`) are forked from the process that built the
data sets and share its pages: each runs single-threaded, freezes the Python objects it
inherited and mmaps its large buffers (:func:`loader_worker_init`), and before collating
every 4th batch hands its free heap pages back to the system (:class:`HeapReleasingCollate`);
glibc only, nothing to set. Its private memory so stays near its working set over an epoch
instead of creeping.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from threempose.config import DataConfig
from threempose.data.augment_gpu import augment_batch, collate_raw
from threempose.data.coco import CocoKeypoints, UnreadableSplitError, coco_split_paths
from threempose.data.sampler import EpochSampler, held_out_split, warn_skipped
from threempose.data.synthetic import ensure_synthetic
from threempose.util.heap import mmap_large_buffers, release_free_heap
from threempose.util.threads import single_threaded_worker

if TYPE_CHECKING:
    from threempose.data.dali_pipeline import DaliLoader


_ARCH_SPLIT_STREAM = 2**31   # numpy seed-sequence entry of the train/arch split (epochs use [seed, epoch])
Collate = Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
RELEASE_EVERY = 4            # batches between a loader worker's heap releases (HeapReleasingCollate)


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack CPU-path samples; ``skipped`` becomes one flat list of file names."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "skipped"}
    batch["skipped"] = [name for s in samples for name in s["skipped"]]
    return batch


class PoseDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` that strips each batch's
    ``skipped`` list and warns once per pass, naming the images that failed to decode.
    A split none of whose images can be read raises a one-line
    :class:`~threempose.data.coco.UnreadableSplitError` (also from a worker)."""

    def __init__(self, dataset: CocoKeypoints, sampler: EpochSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.skipped_files: list[str] = []

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Order of ``epoch``; skip its first ``skip_batches`` batches (resume part-way)."""
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skipped: list[str] = []
        try:
            for batch in super().__iter__():
                skipped += batch.pop("skipped")
                yield batch
        except UnreadableSplitError:       # from a worker, its message carries the worker's traceback
            raise UnreadableSplitError(self.dataset.unreadable_message()) from None
        finally:
            if skipped:
                self.skipped_files += skipped
                warn_skipped(skipped)


def loader_worker_init(worker_id: int = 0) -> None:
    """A torch loader worker's ``worker_init_fn``: single-threaded
    (:func:`~threempose.util.threads.single_threaded_worker`); the Python objects it
    inherited from the parent frozen (``gc.freeze``): the cyclic collector then never walks
    them, which would write every inherited object's GC header and so copy nearly every page
    of the parent's Python heap into the worker (private memory growing over an epoch); and
    its buffers of 128 KiB or more mmapped, so they go back to the system when freed
    (:func:`~threempose.util.heap.mmap_large_buffers`; glibc only): at 512 px a sample's
    buffers otherwise stay in the worker's heap, which creeps by hundreds of MiB."""
    single_threaded_worker(worker_id)
    gc.freeze()
    mmap_large_buffers()


class HeapReleasingCollate:
    """The ``collate_fn`` of a loader with workers: every ``every``-th batch first hands the
    worker's free heap pages back to the system (:func:`~threempose.util.heap.release_free_heap`,
    glibc ``malloc_trim``; nothing elsewhere), then each batch is collated with ``collate``.

    glibc keeps a worker's freed heap memory resident, and its short-lived buffers land in free
    chunks all over the heap (:mod:`threempose.util.heap`): without the release, a worker's
    private memory creeps from ~20 to ~70 MiB over its first hundreds of batches (COCO-sized
    set, 128 px) while its live memory stays flat. Each release costs the re-faulting of the
    pages the next batches use again: per batch 12 % (128 px) to 28 % (512 px) more worker CPU,
    every 4th batch (``RELEASE_EVERY``) 6-8 % (README, "Scale")."""

    def __init__(self, collate: Collate, every: int = RELEASE_EVERY):
        self.collate, self.every, self.batches = collate, every, 0

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.batches % self.every == 0:
            release_free_heap()
        self.batches += 1
        return self.collate(samples)


def worker_options(num_workers: int, collate: Collate) -> dict[str, Any]:
    """The DataLoader arguments of a loader with ``num_workers`` workers (0: the main process)
    collating with ``collate``: ``num_workers``, ``collate_fn`` (a :class:`HeapReleasingCollate`
    in workers) and ``worker_init_fn`` (:func:`loader_worker_init`)."""
    if not num_workers:
        return {"num_workers": 0, "collate_fn": collate, "worker_init_fn": None}
    return {"num_workers": num_workers, "collate_fn": HeapReleasingCollate(collate),
            "worker_init_fn": loader_worker_init}


Loader = Union[PoseDataLoader, "DaliLoader"]


@dataclass
class DataLoaders:
    """Loaders of one run and what an evaluator needs.

    ``train`` (augmented, shuffled, last partial batch dropped), ``val`` (centre/resize,
    in image-id order), ``arch`` (a held-out part of the train split for architecture
    parameters, augmented; None unless asked for). ``val_annotations``, ``val_images``:
    the val split's COCO file and image folder; ``val_image_ids``: its image ids.
    ``gpu_augment``: the loaders yield raw batches that :meth:`prepare` warps (the torch
    backend's GPU path); DaliLoaders yield finished batches on ``device``.
    """

    train: Loader
    val: Loader
    arch: Optional[Loader]
    val_annotations: Path
    val_images: Path
    val_image_ids: list[int]
    gpu_augment: bool
    cfg: DataConfig
    device: torch.device

    def prepare(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """A loader batch as training tensors on ``device``: ``image`` float32 ``[B, 3, S, S]``,
        ``heatmaps`` float32 ``[B, J, h, h]``, ``mask`` float32 ``[B, h, h]``, ``joints`` int64
        ``[B, max_people, J, 2]``, ``affine`` float64 ``[B, 2, 3]``, ``flipped`` bool ``[B]``,
        ``image_id`` int64 ``[B]`` (warped here on the torch backend's GPU path)."""
        if self.gpu_augment:
            return augment_batch(batch, self.cfg, self.device)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def split_paths(cfg: DataConfig, progress: bool) -> tuple[Path, Path, Path, Path]:
    """``(train_images, train_annotations, val_images, val_annotations)`` of ``cfg``."""
    if cfg.dataset == "synthetic":
        s = ensure_synthetic(cfg.synthetic, progress=progress)
        return s.train_images, s.train_annotations, s.val_images, s.val_annotations
    train_images, train_ann = coco_split_paths(cfg.root, cfg.train_split)
    val_images, val_ann = coco_split_paths(cfg.root, cfg.val_split)
    missing = [p for p in (train_ann, train_images, val_ann, val_images) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"COCO data not found: {', '.join(str(p) for p in missing)} missing. Lay COCO out as "
            f"{cfg.root}/annotations/person_keypoints_{cfg.train_split}.json, "
            f"{cfg.root}/{cfg.train_split}/*.jpg "
            f"(and likewise for {cfg.val_split}), or set data.root; configs/search-small.json uses the "
            "embedded synthetic data set (data.dataset = \"synthetic\") and needs no download.")
    return train_images, train_ann, val_images, val_ann


def build_loaders(cfg: DataConfig, *, seed: int = 0, device: torch.device | str = "cpu",
                  rank: int = 0, world_size: int = 1, arch_fraction: Optional[float] = None,
                  progress: bool = True) -> DataLoaders:
    """Train and val loaders (and ``arch`` when ``arch_fraction`` is given) for ``cfg``.

    Args:
        cfg: the data section of a config.
        seed: order and augmentation seed (``run.seed``).
        device: where :meth:`DataLoaders.prepare` puts batches (and warps, on the GPU path).
        rank, world_size: this process's shard of every epoch (distributed runs).
        arch_fraction: part of the train split held out as ``arch`` (``search.arch_val_fraction``);
            the split is fixed by ``seed``.
        progress: show a progress bar while the synthetic data set is generated.
    Raises:
        FileNotFoundError: COCO files missing (the message shows the expected layout).
        ConfigError: ``data.backend`` is ``dali`` and DALI is not installed (names the extra).
    """
    device = torch.device(device)
    gpu = cfg.augment.device == "gpu" or (cfg.augment.device == "auto" and device.type == "cuda")
    dali = cfg.backend == "dali"
    if dali:
        from threempose.data.dali_pipeline import dali_loader_factory
        make_loader = dali_loader_factory(cfg, device, gpu)          # ConfigError when DALI is missing
    else:
        make_loader = _torch_loader_factory(cfg, device, gpu)
    train_images, train_ann, val_images, val_ann = split_paths(cfg, progress)
    raw = gpu and not dali
    train_set = CocoKeypoints(train_images, train_ann, cfg, train=True, seed=seed, raw=raw)
    val_set = CocoKeypoints(val_images, val_ann, cfg, train=False, seed=seed, raw=raw)

    indices = list(range(len(train_set)))
    arch = None
    if arch_fraction is not None:
        indices, held_out = held_out_split(len(indices), arch_fraction, seed, _ARCH_SPLIT_STREAM)
        arch = make_loader(train_set, EpochSampler(held_out, seed + 1, True, rank, world_size), drop_last=True)
    train = make_loader(train_set, EpochSampler(indices, seed, True, rank, world_size), drop_last=True)
    for name, loader in (("train", train), ("arch", arch)):
        if loader is not None and len(loader) == 0:
            raise ValueError(f"{train_ann}: the {name} loader gets {len(loader.sampler)} images per "
                             f"process, fewer than data.batch_size {cfg.batch_size}; lower the batch size "
                             "or add images")
    val = make_loader(val_set, EpochSampler(range(len(val_set)), seed, False, rank, world_size), drop_last=False)
    return DataLoaders(train=train, val=val, arch=arch, val_annotations=val_ann, val_images=val_images,
                       val_image_ids=list(val_set.image_ids), gpu_augment=raw, cfg=cfg, device=device)


LoaderFactory = Callable[..., Loader]   # (dataset, sampler, drop_last=...) -> a loader of that split


def _torch_loader_factory(cfg: DataConfig, device: torch.device, gpu: bool) -> LoaderFactory:
    """PoseDataLoaders collating per-sample CPU augmentations, or raw samples for the GPU path."""
    def make(dataset: CocoKeypoints, sampler: EpochSampler, *, drop_last: bool) -> PoseDataLoader:
        return PoseDataLoader(dataset, sampler, batch_size=cfg.batch_size, pin_memory=device.type == "cuda",
                              drop_last=drop_last,
                              **worker_options(cfg.num_workers, collate_raw if gpu else collate_samples))
    return make
