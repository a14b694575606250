"""Handing a process's free heap pages back to the system (glibc ``malloc_trim``).

Why a forked DataLoader worker needs it: the worker inherits its parent's malloc heap,
holes included. Building a COCO-sized :class:`~threempose.data.coco.CocoKeypoints` leaves
~70 MiB of free chunks in the parent's heap (the parse's garbage, below the few MiB that
survive it). The worker's own short-lived buffers (decoded images, augmented tensors,
targets) are carved out of those holes, and glibc's best-fit choice moves them to other
holes from sample to sample; every page a buffer touches for the first time becomes a
private copy, and stays resident after the buffer is freed. The worker's private memory so
creeps from ~20 MiB to ~70 MiB, page by page, until it has touched every hole, while the
memory it actually holds (``mallinfo2().uordblks``) stays flat. ``malloc_trim(0)`` returns
the pages of free chunks (``madvise(MADV_DONTNEED)``), so trimming once per batch keeps a
worker at its live working set. Fixed malloc thresholds (``mallopt`` ``M_MMAP_THRESHOLD`` /
``M_TRIM_THRESHOLD`` 128 KiB) do not help: the small buffers still wander through the holes.

Only glibc has ``malloc_trim``; elsewhere (macOS, musl) :func:`release_free_heap` does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Callable, Optional


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``int malloc_trim(size_t pad)``, or None where the C library is not glibc."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""       # "glibc 2.36"; unknown name off glibc
    except (ValueError, OSError, AttributeError):
        return None
    if not libc.startswith("glibc"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the pages of the process's free malloc chunks to the system (glibc
    ``malloc_trim(0)``, every arena); the allocated memory is untouched. True when
    something was released, False when nothing was or the C library is not glibc."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
