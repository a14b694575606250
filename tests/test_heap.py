"""release_free_heap: glibc's malloc_trim returns freed pages to the system; a no-op off glibc."""
import ctypes
import os

import pytest

from threempose.util import heap
from threempose.util.heap import release_free_heap


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_release_free_heap_returns_the_pages_of_freed_chunks_to_the_system():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 100 * 1024, 600             # below glibc's smallest mmap threshold: heap chunks
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        ctypes.memset(b, 1, size)             # resident
    for b in blocks[::2]:                     # freed between live chunks: no coalescing into the top,
        libc.free(b)                          # so free() keeps their pages
    freed = size * count // 2
    before = _rss_bytes()
    assert release_free_heap()
    released = before - _rss_bytes()
    for b in blocks[1::2]:
        libc.free(b)
    assert released >= 0.8 * freed           # each chunk's pages but the partial first and last one


@pytest.mark.parametrize("confstr", [None, ValueError("unrecognized configuration name")],
                         ids=["musl: no glibc version", "macOS: unknown name"])
def test_release_free_heap_does_nothing_without_glibc(monkeypatch, confstr):
    def fake(name):
        if isinstance(confstr, Exception):
            raise confstr
        return confstr

    heap._malloc_trim.cache_clear()
    monkeypatch.setattr(os, "confstr", fake)
    try:
        assert heap._malloc_trim() is None and release_free_heap() is False
    finally:
        heap._malloc_trim.cache_clear()
