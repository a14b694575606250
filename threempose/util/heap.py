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
worker back to its live memory. Fixed malloc thresholds alone (below) do not hold the creep at
128 px (the small buffers still wander: 43 MiB in one run); a trim in the parent before
forking changes nothing (the pages come back zero-filled instead of copied).

At 512 px inputs the creep is larger (a worker: 120 -> ~500 MiB over 400 batches) and periodic
releases do not hold it: a sample's multi-MiB buffers come from the heap once glibc's dynamic
mmap threshold has risen past them (it rises to the size of each mmapped chunk freed).
:func:`mmap_large_buffers` fixes the mmap and trim thresholds at 128 KiB, so such buffers are
mmapped and go back to the system as soon as they are freed (a worker then peaks at 83-188
MiB, flat).

Only glibc has ``malloc_trim`` and these ``mallopt`` settings; elsewhere (macOS, musl) both
functions do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters (malloc.h)
LARGE_BUFFER_BYTES = 128 * 1024                   # glibc's default mmap threshold, kept fixed


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (with ``malloc_trim`` and ``mallopt``), else None."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""       # "glibc 2.36"; unknown name off glibc
    except (ValueError, OSError, AttributeError):
        return None
    if not name.startswith("glibc"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def release_free_heap() -> bool:
    """Return the pages of the process's free malloc chunks to the system (glibc
    ``malloc_trim(0)``, every arena); the allocated memory is untouched. True when
    something was released, False when nothing was or the C library is not glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def mmap_large_buffers() -> bool:
    """Serve every allocation of ``LARGE_BUFFER_BYTES`` or more with its own mmap, returned
    to the system when freed, and trim the heap top past that size (glibc ``mallopt``
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``; this also stops glibc from raising them).
    True when set, False off glibc (nothing done)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, LARGE_BUFFER_BYTES))
