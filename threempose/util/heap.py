"""How a process's freed memory goes back to the system: handing it back (glibc ``malloc_trim``,
fixed mmap thresholds; DataLoader workers) or keeping it for reuse (CPU inference).

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

The opposite case is a process that runs one network over and over (CPU inference,
:func:`keep_freed_memory`): glibc serves every block above its mmap threshold (dynamic, at most
32 MiB) with a fresh mapping and unmaps it when freed, so each batch's large activations are
faulted in again, zero-filled, by the kernel. Served from the heap and kept there, the next
batch reuses the same pages. Measured (the thesis net at 512, batch 8, one thread, the bench's
interleaved forms): fp32 deploy form 269.5 -> 206.1 ms/image, bf16 145.3 -> 117.4; at batch 1
within noise (201 vs 192 ms fp32).

Only glibc has ``malloc_trim`` and these ``mallopt`` settings; elsewhere (macOS, musl) these
functions do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4   # glibc's mallopt parameters (malloc.h)
LARGE_BUFFER_BYTES = 128 * 1024                   # glibc's default mmap threshold, kept fixed
DEFAULT_MMAP_MAX = 65536                          # glibc's default M_MMAP_MAX (mappings at once)
KEEP_TRIM_BYTES = 2**31 - 1                       # mallopt's largest (an int): trim only past 2 GiB free


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
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``; this also stops glibc from raising them),
    with mappings allowed again (``M_MMAP_MAX``: a worker forked from a process that called
    :func:`keep_freed_memory` inherits 0). True when set, False off glibc (nothing done)."""
    return _mallopt((M_MMAP_MAX, DEFAULT_MMAP_MAX), (M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES),
                    (M_TRIM_THRESHOLD, LARGE_BUFFER_BYTES))


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and keep what is freed there for the next one
    (glibc ``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` 2 GiB), for a process that runs
    one network over and over (module docstring): a batch's large buffers reuse the previous
    batch's pages instead of being faulted in anew. The process's RSS stays near its peak. True
    when set, False off glibc (nothing done)."""
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_TRIM_BYTES))


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply every glibc ``mallopt(param, value)`` of ``settings`` (all of them, even after one
    is refused); True when glibc took them all, False off glibc or when one was refused."""
    libc = _glibc()
    if libc is None:
        return False
    done = [libc.mallopt(param, value) for param, value in settings]
    return all(done)
