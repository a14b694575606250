"""Running a predictor over a folder (or list) of images: the image list and COCO image ids,
a background loader that reads the next images while the network runs, and a run summary
(exits taken, GFLOPs, timings); results go to a :class:`ResultJournal` as they are produced.
The library behind ``python -m threempose.infer``."""
from __future__ import annotations

import collections
import hashlib
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from threempose.data.coco_schema import is_int
from threempose.inference.draw import save_drawing
from threempose.inference.predictor import PREDICT_PARTS, ImageReadError, Predictor, load_image
from threempose.inference.result_journal import ResultJournal
from threempose.util.errors import OutputPathError, UserError
from threempose.util.files import read_json_file


class InferInputError(UserError, ValueError):
    """Bad command-line input: missing or empty image path, bad annotations, id clashes."""


@dataclass
class RunSummary:
    """What a run did: images processed by this process, skipped files, time; ``overall``: the
    totals over every image of the results (:meth:`ResultJournal.totals`, a resumed run's included)."""

    processed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)       # seconds per part (:func:`run`)
    overall: dict[str, Any] = field(default_factory=dict)

    def totals(self) -> dict[str, Any]:
        return {"images": 0, "people": 0, "exits": {}, "mean_gflops": 0.0, **self.overall,
                "skipped": len(self.skipped),
                "images_per_s": self.processed / self.seconds if self.seconds > 0 else 0.0}

    def timing_text(self) -> str:
        """``--benchmark``: images/s and where the wall time went. The loader's time runs in a
        background thread, overlapped with the rest; "waiting for images" is the part of it the
        network had to wait for."""
        t = self.totals()
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())
        main = sum(v for k, v in self.timings.items() if k != "load (background)")
        return (f"benchmark: {self.processed} images in {self.seconds:.2f} s = {t['images_per_s']:.2f} images/s; "
                f"{parts}; other (records, drawings) {max(self.seconds - main, 0.0):.2f} s")

    def text(self) -> str:
        t = self.totals()
        resumed = t["images"] - self.processed
        lines = [f"images: {t['images']} processed, {t['skipped']} skipped"
                 + (f" ({resumed} of them by the run resumed)" if resumed > 0 else ""),
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


_MAX_NUMERIC_STEM = 18      # digits of a stem read as a number: ids stay within int64


def name_image_id(name: str) -> int:
    """A stable COCO image id from a file name: the number of a stem of ASCII digits (COCO's
    ``000000397133.jpg`` -> 397133), else a 48-bit hash of the name. Nothing else of the name
    is parsed (``².jpg`` is hashed: ``str.isdigit`` would accept it and ``int`` refuse it)."""
    stem = Path(name).stem
    if re.fullmatch(r"[0-9]{1,%d}" % _MAX_NUMERIC_STEM, stem, re.ASCII):
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
    """``{file base name: image id}`` of a COCO annotation file (read by the one JSON reader);
    two images with the same base name or the same id are an error, not a silent pick."""
    data = read_json_file(path, InferInputError, "--annotations file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not all(isinstance(im, dict) and is_int(im.get("id"))
                                               and isinstance(im.get("file_name"), str) for im in images):
        raise InferInputError(f"--annotations {path}: not a COCO annotation file (needs an 'images' "
                              "list of {id, file_name})")
    by_name: dict[str, int] = {}
    by_id: dict[int, str] = {}
    for im in images:
        name = Path(im["file_name"]).name
        if name in by_name:
            raise InferInputError(f"--annotations {path}: two images are named {name!r} (ids {by_name[name]} "
                                  f"and {im['id']}); an input file would match either")
        if im["id"] in by_id:
            raise InferInputError(f"--annotations {path}: images {by_id[im['id']]!r} and {name!r} share "
                                  f"the id {im['id']}")
        by_name[name], by_id[im["id"]] = im["id"], name
    return by_name


def drawing_names(files: Sequence[Path]) -> dict[Path, str]:
    """PNG names for ``--draw`` (see the module docstring)."""
    stems = collections.Counter(f.stem for f in files)
    return {f: (f.stem if stems[f.stem] == 1 else f.name.replace(".", "_")) + ".png" for f in files}


def check_drawing_targets(draw_dir: Path, files: Sequence[Path]) -> None:
    """Refuse, before any work, a ``--draw`` folder where a drawing could not be written: an
    entry of a drawing's name that is a folder (or another non-file)."""
    for f, name in drawing_names(files).items():
        target = draw_dir / name
        if target.exists() and not target.is_file():
            raise OutputPathError(f"--draw {draw_dir}: {target} is a folder (or not a file), so the "
                                  f"drawing of {f.name} cannot be written there; move it or choose "
                                  "another --draw folder")


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


def run(predictor: Predictor, files: Sequence[Path], ids: dict[Path, int], journal: ResultJournal,
        batch: int = 1, draw_dir: Optional[Path] = None, progress: bool = True) -> RunSummary:
    """Predict every file of ``ids`` (in ``files`` order) that ``journal`` does not hold yet,
    ``batch`` images per call, reading and resizing the next images in a
    :class:`BackgroundLoader` meanwhile. Each image's record and results go to ``journal`` and
    its drawing to ``draw_dir`` as it finishes (nothing grows with the number of images);
    unreadable files go to ``summary.skipped``. The progress bar counts the journal's images as
    done (its ETA is for the rest). ``summary.timings`` splits the wall time (see
    :meth:`RunSummary.timing_text`)."""
    summary = RunSummary()
    done = journal.done
    wanted = [f for f in files if f in ids]
    todo = [f for f in wanted if str(f) not in done]
    names = drawing_names(files) if draw_dir is not None else {}
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    before = dict(predictor.timings)
    start = time.perf_counter()
    waited = 0.0
    with tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc="infer", unit="img",
              disable=not progress) as bar, \
            BackgroundLoader(predictor, chunks, keep_arrays=draw_dir is not None) as loader:
        batches = iter(loader)
        for chunk in chunks:
            wait_start = time.perf_counter()
            finished, arrays, prepared, skipped = next(batches)
            waited += time.perf_counter() - wait_start
            summary.skipped += skipped
            predictions = predictor.predict_prepared(prepared) if prepared else []
            for k, (f, pred) in enumerate(zip(finished, predictions)):
                journal.append({"file": str(f), "image_id": ids[f], **pred.summary()}, pred.to_coco(ids[f]))
                summary.processed += 1
                if draw_dir is not None:
                    save_drawing(draw_dir / names[f], arrays[k], [{"keypoints": p.keypoints, "score": p.score}
                                                                  for p in pred.people])
            bar.update(len(chunk))
    summary.seconds = time.perf_counter() - start
    summary.timings = {"load (background)": loader.seconds, "waiting for images": waited,
                       **{part: predictor.timings[part] - before.get(part, 0.0) for part in PREDICT_PARTS}}
    summary.overall = journal.totals()
    return summary
