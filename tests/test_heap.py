"""release_free_heap (malloc_trim) returns freed pages to the system; mmap_large_buffers keeps large
buffers out of the heap; keep_freed_memory keeps them in it; all do nothing off glibc."""
import ctypes
import os
import subprocess
import sys

import pytest

from threempose.util import heap
from threempose.util.heap import keep_freed_memory, mmap_large_buffers, release_free_heap


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
def test_heap_settings_do_nothing_without_glibc(monkeypatch, confstr):
    def fake(name):
        if isinstance(confstr, Exception):
            raise confstr
        return confstr

    heap._glibc.cache_clear()
    monkeypatch.setattr(os, "confstr", fake)
    try:
        assert heap._glibc() is None and release_free_heap() is False and mmap_large_buffers() is False
        assert keep_freed_memory() is False
    finally:
        heap._glibc.cache_clear()


MMAP_PROBE = """
import ctypes, sys
from threempose.util.heap import mmap_large_buffers
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))          # glibc raises its dynamic mmap threshold to 8 MiB
if sys.argv[1] == "set":
    assert mmap_large_buffers()
before = libc.mallinfo2().hblks
p = libc.malloc(1 << 20)                 # 1 MiB: heap under the raised threshold, mmap when set
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_mmap_large_buffers_keeps_a_1_mib_buffer_out_of_the_heap_after_glibc_raised_its_threshold():
    def mmapped(mode: str) -> int:      # a fresh process: the settings are process-wide
        out = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], check=True, capture_output=True, text=True)
        return int(out.stdout)

    assert mmapped("default") == 0 and mmapped("set") == 1


FAULT_PROBE = """
import ctypes, resource, sys
from threempose.util.heap import keep_freed_memory, mmap_large_buffers
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20                          # above glibc's largest mmap threshold (32 MiB)
for setting in sys.argv[1:]:
    assert {"keep": keep_freed_memory, "mmap": mmap_large_buffers}[setting]()
def touch():                             # allocate, write every page, free
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's")
def test_keep_freed_memory_lets_a_second_64_mib_buffer_reuse_the_first_ones_pages():
    def faults(*settings: str) -> int:  # a fresh process: the settings are process-wide
        out = subprocess.run([sys.executable, "-c", FAULT_PROBE, *settings], check=True, capture_output=True,
                             text=True)
        return int(out.stdout)

    default = faults()                  # glibc's default: a new mapping, faulted in again: 16,384 4 KiB
    assert default >= 32                # pages (32 if the kernel backs it with 2 MiB huge pages)
    assert faults("keep") <= default // 10                # kept in the heap: the same pages
    assert faults("keep", "mmap") >= default // 2         # a worker's mmap_large_buffers maps again
