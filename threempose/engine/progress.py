"""A tqdm progress bar for an epoch: step, losses, GFLOPs and images/s.

Shown only on rank 0, when ``run.progress`` is on and the stream is a terminal;
otherwise every call is a cheap no-op (metrics still go to :class:`MetricsLogger`).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO


def progress_enabled(progress: bool, rank: int = 0, stream: Optional[TextIO] = None) -> bool:
    """True when a bar should be drawn: ``progress`` on, rank 0 and ``stream`` (stderr) a TTY."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(progress) and rank == 0 and callable(isatty) and bool(isatty())


class EpochProgress:
    """Progress of one epoch.

    Args:
        epoch: the epoch (from 0); shown as ``epoch e+1/epochs``.
        epochs: total epochs of the run.
        steps: steps in this epoch (``None`` when unknown).
        enabled: draw the bar (see :func:`progress_enabled`).
        initial: steps already done (a resumed epoch starts part-way).
        stream: where to draw (default stderr).
        clock: seconds, for images/s (``time.perf_counter``; tests inject one).
    """

    def __init__(self, epoch: int, epochs: int, steps: Optional[int], enabled: bool,
                 initial: int = 0, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.images = 0
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=initial, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", file=stream if stream is not None else sys.stderr,
                            dynamic_ncols=True, leave=True)

    def images_per_second(self) -> float:
        """Images seen since this epoch's bar started, per wall-clock second."""
        elapsed = self.clock() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0

    def postfix(self, losses: dict[str, Any], gflops: Optional[float] = None) -> str:
        """The bar's text after the counter, e.g. ``total=0.0123 heatmap=0.001 GFLOPs=16.6 img/s=12.5``."""
        parts = [f"{k}={_number(v):.4g}" for k, v in losses.items()]
        if gflops is not None:
            parts.append(f"GFLOPs={_number(gflops):.2f}")
        parts.append(f"img/s={self.images_per_second():.1f}")
        return " ".join(parts)

    def update(self, images: int, losses: dict[str, Any], gflops: Optional[float] = None,
               steps: int = 1) -> None:
        """Advance by ``steps`` steps that processed ``images`` images (this process)."""
        self.images += images
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(losses, gflops), refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _number(v: Any) -> float:
    return float(v.item()) if hasattr(v, "item") else float(v)
