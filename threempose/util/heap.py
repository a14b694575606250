"""Handing a process's free heap pages back to the system (glibc ``malloc_trim``).

Why a forked DataLoader worker needs it: glibc keeps freed heap memory resident (it gives
back only the top of the heap, and only past ``M_TRIM_THRESHOLD``). A worker's buffers
(decoded images, augmented tensors, targets, the collated batch) are short-lived and differ
in size from sample to sample, so glibc carves them out of free chunks all over the heap:
the worker's resident-but-free heap grows by ~50 MiB over its first hundreds of batches
(128 px inputs; at 512 px one release hands back ~130 MiB), first through the ~70 MiB of
free chunks it inherited from the parent (each page it touches there becomes a private
copy), and above them when those are filled, while its live memory
(``mallinfo2().uordblks``) stays flat. Nothing caches: :func:`release_free_heap`
(``malloc_trim(0)``: ``madvise(MADV_DONTNEED)`` on the pages of every free chunk) brings the
worker back to its live memory. Fixed malloc thresholds (``mallopt`` ``M_MMAP_THRESHOLD`` /
``M_TRIM_THRESHOLD`` 128 KiB) make the creep worse (the small buffers still wander); a trim
in the parent before forking changes nothing (the pages come back zero-filled instead of
copied).

Only glibc has ``malloc_trim``; elsewhere (macOS, musl) :func:`release_free_heap` does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
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
