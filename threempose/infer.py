"""Run a trained network on images: COCO keypoint results, drawings and a summary.

    python -m threempose.infer --checkpoint runs/train-.../model.pt --images DIR_OR_FILE \\
        --out results.json [--exit 4|7|final|dynamic] [--dynamic] [--draw OUT_DIR] \\
        [--batch N] [--device cpu|cuda] [--config infer.json] [--annotations A.json] [--no-optimize] [--benchmark]
    python -m threempose.infer --runtime onnxruntime --onnx EXPORT_DIR --images ... (the same options)

Runtimes: ``torch`` (default) runs the network of ``--checkpoint``; ``onnxruntime`` runs the ONNX
exit segments of an export directory (``python -m threempose.export``; the export carries the
model's infer settings), with the same exit rule, batching and decoding.

Batches: ``--batch N`` images per call; with dynamic exits every image leaves the batch at its
own exit (:mod:`threempose.predictor`). The next images are read and resized in a background
thread meanwhile; ``--benchmark`` prints images/s and where the time went.

Settings: the model file's ``infer`` section, or the ``infer`` section of ``--config`` (e.g. what
``threempose.calibrate`` writes; its defaults fill the keys it leaves out); ``--exit`` /
``--dynamic`` override ``infer.exit``.

The network runs inference-optimized (:mod:`threempose.deploy`: BatchNorm folded into the
convolutions, channels-last, oneDNN fusion on the CPU); ``--no-optimize`` runs it as trained.

Inputs: one image file, or every regular, non-hidden file directly in a directory (sorted by
name; subdirectories are not searched). Files that cannot be read as images are skipped and
listed at the end; the run goes on.

Outputs (written atomically when the run finishes; nothing is written on an error):

* ``--out results.json``: COCO keypoint results (a JSON list of ``{"image_id", "category_id",
  "keypoints": 51 numbers, "score"}``), scored by ``python -m threempose.evaluate
  --annotations A.json --results results.json`` when the ids are A's.
* ``results.images.json`` beside it: per image the file, image id, exit taken, GFLOPs spent,
  people found and (dynamic) the EEL confidences; the skipped files and the summary.
* ``--draw OUT_DIR``: one PNG per image with its people drawn (``<file stem>.png``; when two
  inputs share a stem, ``<file name with '.' -> '_'>.png``).

Image ids: with ``--annotations A.json`` (a COCO file), the id of A's image whose ``file_name``
has the same base name (inputs A does not list are skipped). Without it, a stable id from the
file name: the number itself when the stem is all digits (COCO's ``000000000139.jpg`` -> 139),
else the first 48 bits of the SHA-1 of the file name; two inputs with the same id are an error.

GFLOPs count both flip-test passes (see :mod:`threempose.predictor`). Exit status: 0 when at
least one image was processed, 2 with ``error: ...`` on bad input (missing or empty input,
not a threempose checkpoint, weights that do not fit the genotype, bad settings).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from threempose.atomic import atomic_write_json
from threempose.cli import UserError, check_output_dir, check_output_file, entry_point
from threempose.draw import save_drawing
from threempose.dynamic_exit import DYNAMIC
from threempose.pnfs.dispatch import pnfs_main
from threempose.predictor import PREDICT_PARTS, ImageReadError, Prediction, Predictor, load_image


class InferInputError(UserError, ValueError):
    """Bad command-line input: missing or empty image path, bad annotations, id clashes."""


@dataclass
class RunSummary:
    """What a run did: per-image records, skipped files, totals."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)       # seconds per part (:func:`run`)

    def totals(self) -> dict[str, Any]:
        n = len(self.records)
        exits = collections.Counter(r["exit"] for r in self.records)
        return {"images": n, "skipped": len(self.skipped),
                "people": sum(r["people"] for r in self.records),
                "exits": {str(k): exits[k] for k in sorted(exits)},
                "mean_gflops": sum(r["gflops"] for r in self.records) / n if n else 0.0,
                "images_per_s": n / self.seconds if self.seconds > 0 else 0.0}

    def timing_text(self) -> str:
        """``--benchmark``: images/s and where the wall time went. The loader's time runs in a
        background thread, overlapped with the rest; "waiting for images" is the part of it the
        network had to wait for."""
        t = self.totals()
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
        main = sum(v for k, v in self.timings.items() if k != "load (background)")
        return (f"benchmark: {t['images']} images in {self.seconds:.2f} s = {t['images_per_s']:.2f} images/s; "
                f"{parts}; other (records, drawings) {max(self.seconds - main, 0.0):.2f} s")

    def text(self) -> str:
        t = self.totals()
        lines = [f"images: {t['images']} processed, {t['skipped']} skipped",
                 f"people found: {t['people']}",
                 "exits taken: " + ", ".join(f"layer {k}: {v}" for k, v in t["exits"].items()),
                 f"mean GFLOPs per image: {t['mean_gflops']:.4g} (flip-test passes included)",
                 f"speed: {t['images_per_s']:.2f} images/s"]
        if self.skipped:
            lines.append("skipped files:")
            lines += [f"  {s['file']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def list_images(path: str | Path) -> list[Path]:
    """The input files: ``[path]`` for a file, the sorted regular non-hidden files of a directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InferInputError(f"--images {path}: no such file or directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InferInputError(f"--images {path}: the directory holds no files")
    return files


def name_image_id(name: str) -> int:
    """A stable COCO image id from a file name (see the module docstring)."""
    stem = Path(name).stem
    if stem.isdigit():
        return int(stem)
    return int(hashlib.sha1(Path(name).name.encode("utf-8")).hexdigest()[:12], 16)


def image_ids(files: Sequence[Path], annotations: Optional[str | Path]) -> tuple[dict[Path, int], list[dict]]:
    """``({file: image id}, skipped)``: ids from the annotations' file names, or from the names."""
    if annotations is None:
        ids = {f: name_image_id(f.name) for f in files}
        owners: dict[int, Path] = {}
        for f, i in ids.items():
            if i in owners:
                raise InferInputError(f"{owners[i].name} and {f.name} get the same image id {i}; rename one "
                                      "or pass --annotations with their COCO ids")
            owners[i] = f
        return ids, []
    by_name = _annotation_ids(Path(annotations))
    ids = {f: by_name[f.name] for f in files if f.name in by_name}
    skipped = [{"file": str(f), "reason": f"not an image of {annotations}"} for f in files if f not in ids]
    return ids, skipped


def _annotation_ids(path: Path) -> dict[str, int]:
    """``{file base name: image id}`` of a COCO annotation file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InferInputError(f"--annotations {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InferInputError(f"--annotations {path}: not a readable JSON file ({e})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not all(isinstance(im, dict) and isinstance(im.get("id"), int)
                                               and isinstance(im.get("file_name"), str) for im in images):
        raise InferInputError(f"--annotations {path}: not a COCO annotation file (needs an 'images' "
                              "list of {id, file_name})")
    return {Path(im["file_name"]).name: im["id"] for im in images}


def drawing_names(files: Sequence[Path]) -> dict[Path, str]:
    """PNG names for ``--draw`` (see the module docstring)."""
    stems = collections.Counter(f.stem for f in files)
    return {f: (f.stem if stems[f.stem] == 1 else f.name.replace(".", "_")) + ".png" for f in files}


class BackgroundLoader:
    """Reads and resizes the images of ``chunks`` in a background thread, at most ``prefetch``
    chunks ahead, while the caller runs the network on the previous ones.

    Iterating yields, per chunk, ``(files, arrays, prepared, skipped)``: the readable files,
    their RGB arrays (only with ``keep_arrays``, for drawing; else None), the predictor's
    prepared inputs and ``{"file", "reason"}`` for the unreadable ones. ``seconds`` is the
    thread's busy time (reading + resizing). An unexpected error in the thread is raised by
    the iteration; leaving the ``with`` block stops the thread.
    """

    def __init__(self, predictor: Predictor, chunks: Sequence[Sequence[Path]], keep_arrays: bool,
                 prefetch: int = 2) -> None:
        self.predictor = predictor
        self.chunks = list(chunks)
        self.keep_arrays = keep_arrays
        self.seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="threempose-infer-loader", daemon=True)

    def __enter__(self) -> "BackgroundLoader":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        while self._thread.is_alive():            # unblock a put() waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)

    def __iter__(self):
        for _ in self.chunks:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def _work(self) -> None:
        try:
            for chunk in self.chunks:
                start = time.perf_counter()
                files, arrays, prepared, skipped = [], [], [], []
                for f in chunk:
                    try:
                        image = load_image(f)
                    except ImageReadError as e:
                        skipped.append({"file": str(f), "reason": e.reason})
                        continue
                    files.append(f)
                    arrays.append(image)
                    prepared.append(self.predictor.prepare(image))
                self.seconds += time.perf_counter() - start
                if not self._put((files, arrays if self.keep_arrays else None, prepared, skipped)):
                    return
        except BaseException as e:                # handed to the consumer, raised there
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def run(predictor: Predictor, files: Sequence[Path], ids: dict[Path, int], batch: int = 1,
        draw_dir: Optional[Path] = None, progress: bool = True) -> RunSummary:
    """Predict every file of ``ids`` (in ``files`` order), ``batch`` images per call, reading and
    resizing the next images in a :class:`BackgroundLoader` meanwhile; unreadable files go to
    ``summary.skipped``. Drawings are written as images finish. ``summary.timings`` splits the
    wall time (see :meth:`RunSummary.timing_text`)."""
    summary = RunSummary()
    todo = [f for f in files if f in ids]
    names = drawing_names(files) if draw_dir is not None else {}
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    before = dict(predictor.timings)
    start = time.perf_counter()
    waited = 0.0
    with tqdm(total=len(todo), desc="infer", unit="img", disable=not progress) as bar, \
            BackgroundLoader(predictor, chunks, keep_arrays=draw_dir is not None) as loader:
        batches = iter(loader)
        for chunk in chunks:
            wait_start = time.perf_counter()
            done, arrays, prepared, skipped = next(batches)
            waited += time.perf_counter() - wait_start
            summary.skipped += skipped
            predictions = predictor.predict_prepared(prepared) if prepared else []
            for k, (f, pred) in enumerate(zip(done, predictions)):
                _record(summary, f, ids[f], pred)
                if draw_dir is not None:
                    save_drawing(draw_dir / names[f], arrays[k], [{"keypoints": p.keypoints, "score": p.score}
                                                                  for p in pred.people])
            bar.update(len(chunk))
    summary.seconds = time.perf_counter() - start
    summary.timings = {"load (background)": loader.seconds, "waiting for images": waited,
                       **{part: predictor.timings[part] - before.get(part, 0.0) for part in PREDICT_PARTS}}
    return summary


def _record(summary: RunSummary, path: Path, image_id: int, pred: Prediction) -> None:
    summary.results += pred.to_coco(image_id)
    summary.records.append({"file": str(path), "image_id": image_id, **pred.summary()})


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
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--config", help="a JSON config whose infer section replaces the model file's")
    p.add_argument("--annotations", help="COCO annotations: take image ids from them")
    p.add_argument("--no-optimize", action="store_true",
                   help="run the network as trained: no BatchNorm folding, channels-last or oneDNN "
                        "fusion (threempose.deploy; on by default, same people up to float rounding)")
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
    out = check_output_file(args.out, "--out")
    per_image = check_output_file(out.with_suffix(".images.json"), "--out (per-image summary)")
    draw_dir = check_output_dir(args.draw, "--draw") if args.draw else None
    files = list_images(args.images)
    ids, skipped = image_ids(files, args.annotations)
    overrides = {"exit": DYNAMIC if args.dynamic else args.exit} if (args.dynamic or args.exit) else {}
    if args.runtime == "onnxruntime":
        predictor = Predictor.from_export(args.onnx, "onnxruntime", config=args.config, **overrides)
    else:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, config=args.config,
                                              optimize=not args.no_optimize, **overrides)
    summary = run(predictor, files, ids, args.batch, draw_dir, progress=not args.no_progress)
    summary.skipped = skipped + summary.skipped
    if not summary.records:
        print(summary.text(), file=sys.stderr)
        raise InferInputError(f"no image of {args.images} could be processed; nothing written")
    atomic_write_json(out, summary.results, indent=None)
    atomic_write_json(per_image, {
        "checkpoint": str(args.checkpoint or args.onnx), "runtime": args.runtime,
        "exit": str(predictor.cfg.exit),
        "flip_test": predictor.cfg.flip_test, "summary": summary.totals(),
        "images": summary.records, "skipped": summary.skipped})
    print(summary.text())
    if args.benchmark:
        print(summary.timing_text())
    print(f"results: {out} ({len(summary.results)} people), per image: {out.with_suffix('.images.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
