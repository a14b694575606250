"""Image in, people out: resize, (flip) forward to an exit, decode.

The thesis' test procedure (§4.1 "Testing"): the short side resized to ``infer.short_side``
keeping the aspect ratio, padded to a multiple of 32, the horizontally flipped input run too
when ``infer.flip_test``, and the chosen exit's heatmaps and tags decoded into people in
original-image coordinates (:func:`threempose.decode.decoder.decode`).

Two entry points:

* :class:`Predictor` -- a trained network with its settings; the API behind ``threempose.infer``::

      predictor = Predictor.from_checkpoint("model.pt", device="cpu", exit="dynamic")
      result = predictor.predict("photo.jpg")        # or an RGB uint8 [H, W, 3] array, a PIL image
      result.people, result.exit, result.gflops

  ``infer.exit`` picks the exit: a layer (``"4"``), ``"final"`` or ``"dynamic"`` (thesis §3.1.4,
  :mod:`threempose.inference.dynamic_exit`). The network really stops at the exit: it runs exit segment by
  exit segment (:meth:`DerivedNet.segment`) and later layers are never computed.
* :func:`predict_people` -- any ``images -> (heatmaps, tags)`` function on one image (the
  search's and training's per-epoch validation use it with the supernet or the last exit).

GFLOPs. ``Prediction.gflops`` is the compute actually spent on the image: the static
multiply-add GFLOPs of everything up to the exit taken (:meth:`DerivedNet.exit_gflops`) at the
image's padded network-input size, **times 2 with flip test** (the network runs on the image
and on its mirror). The thesis' Table 4.3 counts one pass (its dynamic 13.82 GFLOPs is the
exit mix times the single-pass per-exit figures), so halve ours to compare.

Batches. The images of a :meth:`Predictor.predict_batch` call that share a padded input size
run as one batch. With a static exit all of them stop there; with dynamic exits each image is
scored at each EEL on its own and the images that stop leave the batch: the next segment runs
on the carried features of the others only (eval mode: every image is independent, so the
exits and people are those of one image at a time, up to float rounding of batched kernels).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from threempose.config import InferConfig, config_from_dict, load_config
from threempose.data.augment import normalize
from threempose.data.image_io import ImageReadError, read_image, to_rgb
from threempose.data.keypoints import NUM_JOINTS
from threempose.data.keypoints import flip_index as coco_flip_index
from threempose.decode.decoder import DecodeParams, Person, coco_results, decode
from threempose.decode.resize import ResizeInfo, resize_image
from threempose.inference.deploy import optimize_for_inference
from threempose.inference.dynamic_exit import DYNAMIC, ExitScore, resolve_exit, resolve_rules, score_exit, should_exit
from threempose.nas.derived import DerivedNet
from threempose.nas.fabric import Carry

if TYPE_CHECKING:
    from threempose.inference.segments import ExportedSegments

# A network: images [B, 3, H, W] -> the chosen exit's (heatmaps, tags), each [B, J, H/4, W/4].
ExitFn = Callable[[Tensor], tuple[Tensor, Tensor]]
ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]

SIZE_MULTIPLE = 32
# What Predictor.timings splits its time into: exit segments, dynamic-exit scoring, decoding + grouping
PREDICT_PARTS = ("network", "exit scoring", "decode/group")


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #
def load_image(image: ImageLike) -> np.ndarray:
    """An RGB uint8 ``[H, W, 3]`` array from a path, a PIL image (both read by
    :mod:`threempose.data.image_io`: upright, 16-bit scaled, alpha over white) or such an array.

    Raises ImageReadError naming the file (or the array's shape) when it cannot be used.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ImageReadError(f"expected an RGB uint8 image array [H, W, 3], got {image.dtype} "
                                 f"{tuple(image.shape)}")
        return image
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(read_image(image))
    raise TypeError(f"image must be a path, a PIL image or a numpy array, not {type(image).__name__}")


def prepare_image(image: np.ndarray, short_side: int, device: torch.device | str
                  ) -> tuple[Tensor, ResizeInfo]:
    """RGB uint8 ``[H, W, 3]`` -> normalised network input ``[1, 3, H', W']`` and its resize info."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    resized, info = resize_image(image, short_side, SIZE_MULTIPLE)
    x = torch.from_numpy(resized).permute(2, 0, 1)[None].to(device)
    return normalize(x), info


def network_inputs(images: Sequence[np.ndarray], short_side: int) -> list[np.ndarray]:
    """RGB uint8 ``[H, W, 3]`` images -> their network inputs as :func:`prepare_image` makes them
    (float32 ``[1, 3, H', W']`` arrays, CPU); e.g. int8 calibration inputs."""
    return [prepare_image(image, short_side, "cpu")[0].numpy() for image in images]


def with_flips(x: Tensor, flip_test: bool) -> Tensor:
    """``[B, 3, H, W]`` -> ``[2B, 3, H, W]`` (the images, then their horizontal mirrors) with flip
    test, else ``x``. Image ``i``'s passes are rows ``i`` and ``B + i`` of the outputs."""
    return torch.cat([x, torch.flip(x, [3])]) if flip_test else x


def image_passes(maps: Tensor, index: int, batch: int, flip_test: bool) -> Tensor:
    """Image ``index``'s rows of an exit output of :func:`with_flips` input: ``[P, J, h, w]``
    (P = 2 with flip test: the image's maps, then the mirror's as produced)."""
    rows = [index, batch + index] if flip_test else [index]
    return maps[rows]


def default_flip_index(num_joints: int) -> Optional[list[int]]:
    """COCO's flip permutation for 17 joints; None (the caller must give one) otherwise."""
    return coco_flip_index() if num_joints == NUM_JOINTS else None


def merged_heatmaps(heatmaps: Tensor, flip_index: Optional[Sequence[int]] = None) -> Tensor:
    """One image's heatmaps as the decoder merges them: ``[P, J, h, w]`` -> ``[J, h, w]``.

    P = 1: the maps; P = 2 (flip test): ``(maps + mirror's maps flipped back with the joints
    permuted) / 2``, as :func:`threempose.decode.decoder.merge_flip` does, kept on the device.
    """
    if heatmaps.dim() != 4 or heatmaps.shape[0] not in (1, 2):
        raise ValueError(f"heatmaps must be [P, J, h, w] with P = 1 or 2, got {tuple(heatmaps.shape)}")
    if heatmaps.shape[0] == 1:
        return heatmaps[0]
    if flip_index is None:
        flip_index = default_flip_index(heatmaps.shape[1])
        if flip_index is None:
            raise ValueError(f"flip_index is needed for {heatmaps.shape[1]} joints (the default is COCO's 17)")
    perm = torch.as_tensor(list(flip_index), device=heatmaps.device)
    return (heatmaps[0] + torch.flip(heatmaps[1][perm], [-1])) / 2


def image_region(maps: Tensor, info: ResizeInfo) -> Tensor:
    """Crop ``[..., h, w]`` maps (covering the padded network input) to the pixels that cover the
    scaled image: the first ``ceil(h * resized_h / input_h)`` rows and likewise columns."""
    (rw, rh), (iw, ih) = info.resized_size, info.input_size
    h, w = maps.shape[-2:]
    return maps[..., :math.ceil(h * rh / ih), :math.ceil(w * rw / iw)]


def decode_image(heatmaps: Tensor, tags: Tensor, cfg: InferConfig | DecodeParams, info: ResizeInfo,
                 flip_index: Optional[Sequence[int]] = None) -> list[Person]:
    """People from one image's passes: heatmaps and tags ``[P, J, h, w]`` (P = 2: the image and
    its mirror, as produced), in original-image coordinates, best first."""
    if heatmaps.shape[0] == 2:
        return decode(heatmaps[0], tags[0], heatmaps[1], tags[1], cfg=cfg, resize=info,
                      flip_index=flip_index)
    return decode(heatmaps[0], tags[0], cfg=cfg, resize=info, flip_index=flip_index)


@torch.no_grad()
def predict_people(exit_fn: ExitFn, image: np.ndarray, cfg: InferConfig,
                   device: torch.device | str = "cpu",
                   flip_index: Sequence[int] | None = None) -> list[Person]:
    """People in one RGB uint8 image ``[H, W, 3]`` (sorted by score, best first)."""
    x, info = prepare_image(image, cfg.short_side, device)
    heatmaps, tags = exit_fn(with_flips(x, cfg.flip_test))
    return decode_image(heatmaps, tags, cfg, info, flip_index)


# --------------------------------------------------------------------------- #
# The predictor
# --------------------------------------------------------------------------- #
@dataclass
class Prediction:
    """One image's result.

    people: the people found, best first (:class:`Person`: keypoints float64 ``[J, 3]`` (x, y,
        score) in original-image pixels, person score).
    exit: the fabric layer whose exit produced ``people``.
    gflops: multiply-add GFLOPs spent on the image (flip test counted: 2 passes).
    input_size: the padded network input (width, height).
    scores: dynamic inference only: ``{EEL layer: ExitScore}`` for every EEL reached.
    """

    people: list[Person]
    exit: int
    gflops: float
    input_size: tuple[int, int]
    scores: dict[int, ExitScore] = field(default_factory=dict)

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO keypoint results entries for this image."""
        return coco_results(self.people, image_id)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly record: exit, gflops, people (count), input_size, confidences."""
        return {"exit": self.exit, "gflops": self.gflops, "people": len(self.people),
                "input_size": list(self.input_size),
                "scores": {str(k): s.to_dict() for k, s in self.scores.items()}}


def infer_settings(base: dict[str, Any], config: str | os.PathLike | None = None,
                   **overrides: Any) -> InferConfig:
    """A validated InferConfig: ``base`` (a model file's ``infer`` dict), replaced by the ``infer``
    section of ``config`` when given (its defaults fill the keys it leaves out), then
    ``overrides`` (InferConfig field names; ``eels`` as EELConfig objects or dicts).

    Raises ConfigError for unknown keys or bad values.
    """
    settings = dict(base)
    source = "model file infer settings"
    if config is not None:
        settings = dataclasses.asdict(load_config(config).infer)
        source = str(config)
    if overrides:
        overrides = dict(overrides)
        if "eels" in overrides:
            overrides["eels"] = [dataclasses.asdict(e) if dataclasses.is_dataclass(e) else dict(e)
                                 for e in overrides["eels"]]
        settings.update(overrides)
        source += " + overrides"
    return config_from_dict({"infer": settings}, source).infer


class Predictor:
    """A derived network and its test-time settings (see the module docstring).

    Args:
        net: the network (moved to ``device``, put in eval mode), or exported exit segments
            (:func:`threempose.inference.segments.load_segments`: onnxruntime or torch.export programs; CPU).
        cfg: test-time settings (``exit``, ``eels``, decoding); defaults to InferConfig().
        device: "cpu", "cuda", "cuda:1", ... (a ValueError when CUDA is not available).
        flip_index: joint permutation of a horizontal flip (COCO's for 17 joints by default).
        optimize: run the inference-optimized copy of ``net``
            (:func:`threempose.inference.deploy.optimize_for_inference`: BatchNorm folded, channels-last,
            oneDNN fusion on the CPU; the same people up to float rounding). ``self.net`` is the
            network that runs; ``net`` itself is left as it is.
        precision: ``"fp32"``; ``"bf16"`` (the optimized copy in bfloat16, exits' maps in
            float32); ``"int8"`` (``net`` exported and quantized to int8 onnxruntime segments,
            :mod:`threempose.inference.quantize`, calibrated on ``calibration_images``). For
            exported segments it must be the export's own precision.
        calibration_images: int8 only: RGB uint8 ``[H, W, 3]`` arrays
            (:func:`~threempose.inference.quantize.calibration_images` reads a folder).

    Raises ConfigError when ``cfg.exit`` is not an exit of the network, or (dynamic) when
    ``cfg.eels`` does not configure exactly the network's EELs.
    """

    def __init__(self, net: DerivedNet | ExportedSegments, cfg: InferConfig | None = None,
                 device: torch.device | str = "cpu",
                 flip_index: Optional[Sequence[int]] = None, optimize: bool = True,
                 precision: str = "fp32", calibration_images: Optional[Sequence[np.ndarray]] = None) -> None:
        from threempose.inference.quantize import check_precision, quantize_network

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
        self.cfg = cfg if cfg is not None else InferConfig()
        side = self.cfg.short_side
        if isinstance(net, nn.Module):
            check_precision(precision, calibration_images if precision == "int8" else None, str(self.device))
        self.precision = precision
        if isinstance(net, nn.Module) and precision == "int8":
            self.net = quantize_network(net, dataclasses.asdict(self.cfg), network_inputs(calibration_images, side))
        elif isinstance(net, nn.Module):
            if precision == "bf16" and not optimize:
                raise ValueError("precision bf16 runs the optimized network; leave optimize on")
            dtype = torch.bfloat16 if precision == "bf16" else None
            self.net = (optimize_for_inference(net, input_size=(side, side), device=self.device, dtype=dtype)
                        if optimize else net.to(self.device).eval())
        elif self.device.type != "cpu":
            raise ValueError(f"exported segments run on the CPU (onnxruntime's CPU provider), not {device!r}; "
                             "use --device cpu")
        else:
            exported = net.meta.get("precision", "fp32")
            if precision != exported:
                raise ValueError(f"the export holds {exported} segments, not {precision}; export with "
                                 f"--precision {precision}")
            self.net = net
        self.exit_layers = list(net.genotype.exit_layers)
        self.eel_layers = self.exit_layers[:-1]
        self.mode = resolve_exit(self.cfg.exit, self.exit_layers)
        self.rules = resolve_rules(self.cfg.eels, self.eel_layers) if self.mode == DYNAMIC else {}
        self.decode_params = DecodeParams.from_config(self.cfg)
        self.flip_index = list(flip_index) if flip_index is not None else default_flip_index(net.num_joints)
        if self.cfg.flip_test and self.flip_index is None:
            raise ValueError(f"flip test needs flip_index for a {net.num_joints}-joint network")
        self._gflops: dict[tuple[int, int], dict[int, float]] = {}
        self.timings: collections.Counter[str] = collections.Counter()   # seconds per PREDICT_PARTS

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu",
                        config: str | os.PathLike | None = None, optimize: bool = True,
                        precision: str = "fp32", calibration_images: Optional[Sequence[np.ndarray]] = None,
                        **infer_overrides: Any) -> "Predictor":
        """A predictor for a ``model.pt`` written by ``threempose.train``.

        Settings: the model file's ``infer`` section, replaced by ``config``'s (a JSON config
        such as ``threempose.calibrate`` writes) when given, then ``infer_overrides`` (e.g.
        ``exit="dynamic"``, ``flip_test=False``); ``optimize``, ``precision`` and
        ``calibration_images`` as in :class:`Predictor`. Raises CheckpointError for a file that is not
        a threempose model or whose weights do not fit its genotype, ConfigError for bad settings.
        """
        from threempose.nas.model_file import load_model_file

        net, infer = load_model_file(path, "cpu")
        return cls(net, infer_settings(infer, config, **infer_overrides), device, optimize=optimize,
                   precision=precision, calibration_images=calibration_images)

    @classmethod
    def from_export(cls, path: str | os.PathLike, runtime: str = "onnxruntime",
                    config: str | os.PathLike | None = None, threads: Optional[int] = None,
                    precision: Optional[str] = None, **infer_overrides: Any) -> "Predictor":
        """A predictor running an export directory (``python -m threempose.export``) in
        ``runtime`` (``"onnxruntime"`` or ``"torch.export"``), on the CPU; settings as in
        :meth:`from_checkpoint`, from the export's copy of the model's ``infer`` section.
        ``precision``: None (the export's own), else checked against it."""
        from threempose.inference.segments import load_segments

        segments = load_segments(path, runtime, threads)
        return cls(segments, infer_settings(segments.infer, config, **infer_overrides), "cpu",
                   precision=precision or segments.meta.get("precision", "fp32"))

    @property
    def passes(self) -> int:
        """Network passes per image: 2 with flip test, else 1."""
        return 2 if self.cfg.flip_test else 1

    def exit_gflops(self, input_hw: tuple[int, int]) -> dict[int, float]:
        """``{exit layer: GFLOPs spent on one image}`` at a padded input ``(H, W)`` (passes counted)."""
        key = tuple(int(v) for v in input_hw)
        if key not in self._gflops:
            self._gflops[key] = {k: v * self.passes for k, v in self.net.exit_gflops(key).items()}
        return self._gflops[key]

    def predict(self, image: ImageLike) -> Prediction:
        """The people in one image (a path, a PIL image or RGB uint8 ``[H, W, 3]``)."""
        return self.predict_batch([image])[0]

    def prepare(self, image: ImageLike) -> tuple[Tensor, ResizeInfo]:
        """Read and resize one image: the network input ``[1, 3, H', W']`` (on the CPU) and its
        resize info. Thread-safe (``threempose.infer`` runs it in a background loader)."""
        return prepare_image(load_image(image), self.cfg.short_side, "cpu")

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageLike]) -> list[Prediction]:
        """:meth:`predict` for several images, in order (see :meth:`predict_prepared`)."""
        return self.predict_prepared([self.prepare(im) for im in images])

    @torch.no_grad()
    def predict_prepared(self, prepared: Sequence[tuple[Tensor, ResizeInfo]]) -> list[Prediction]:
        """Predictions for :meth:`prepare`'s outputs, in order. The images that share a padded
        input size run as one batch; with dynamic exits each image leaves the batch at its own
        exit (:meth:`_predict_group`)."""
        results: list[Optional[Prediction]] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, info) in enumerate(prepared):
            groups.setdefault(info.input_size, []).append(i)
        for indices in groups.values():
            batch = torch.cat([prepared[i][0] for i in indices]).to(self.device)
            for i, prediction in zip(indices, self._predict_group(batch, [prepared[i][1] for i in indices])):
                results[i] = prediction
        return results

    def score(self, heatmaps: Tensor, info: ResizeInfo, layer: int) -> ExitScore:
        """Dynamic-inference score of one image's exit ``[P, J, h, w]`` heatmaps at EEL ``layer``
        (flip-merged and cropped to the image, :mod:`threempose.inference.dynamic_exit`)."""
        merged = image_region(merged_heatmaps(heatmaps, self.flip_index), info)
        return score_exit(merged, self.rules[layer], self.cfg.detection_threshold)

    def _predict_group(self, batch: Tensor, infos: Sequence[ResizeInfo]) -> list[Prediction]:
        """Run ``batch`` ``[B, 3, H, W]`` (one padded size) segment by segment. A static exit stops
        every image at ``self.mode``; dynamic inference scores each image at each EEL and drops the
        ones that stop from the batch (their carried features are no longer computed on)."""
        flip = self.cfg.flip_test
        results: list[Optional[Prediction]] = [None] * len(infos)
        scores: list[dict[int, ExitScore]] = [{} for _ in infos]
        active = list(range(len(infos)))              # the batch's images still running, in row order
        start: Tensor | Carry = with_flips(batch, flip)
        while True:
            with self._timed("network"):
                out, carry = self.net.segment(start)
            n = len(active)
            if self.mode == DYNAMIC and carry is not None:
                with self._timed("exit scoring"):
                    for row, i in enumerate(active):
                        scores[i][out.layer] = self.score(image_passes(out.heatmaps, row, n, flip), infos[i], out.layer)
                    stop = [should_exit(scores[i][out.layer], self.rules[out.layer].threshold) for i in active]
            else:
                stop = [carry is None or out.layer == self.mode] * n
            for row, i in enumerate(active):
                if not stop[row]:
                    continue
                nothing = out.layer in scores[i] and scores[i][out.layer].detected == 0
                with self._timed("decode/group"):
                    people = [] if nothing else decode_image(
                        image_passes(out.heatmaps, row, n, flip), image_passes(out.tags, row, n, flip),
                        self.decode_params, infos[i], self.flip_index)
                results[i] = self._prediction(people, out.layer, infos[i], scores[i])
            keep = [row for row in range(n) if not stop[row]]
            if not keep:
                return results
            if len(keep) < n:
                rows = keep + [n + row for row in keep] if flip else keep      # with_flips' row layout
                carry = carry.select(torch.tensor(rows, device=out.heatmaps.device))
                active = [active[row] for row in keep]
            start = carry

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Add the wall time of the block to ``self.timings[part]`` (seconds; CUDA synchronised)."""
        begin = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[part] += time.perf_counter() - begin

    def _prediction(self, people: list[Person], layer: int, info: ResizeInfo,
                    scores: Optional[dict[int, ExitScore]] = None) -> Prediction:
        width, height = info.input_size
        return Prediction(people, layer, self.exit_gflops((height, width))[layer], info.input_size,
                          scores or {})
