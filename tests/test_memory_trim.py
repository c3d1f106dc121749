"""``stream.memory.trim_heap``: freed heap pages pinned below a live allocation go back to the OS (glibc)."""
from __future__ import annotations

import ctypes

import pytest

from stream.memory import _libc, trim_heap

psutil = pytest.importorskip("psutil")


@pytest.mark.skipif(_libc() is None, reason="C library without malloc_trim (not glibc)")
def test_trim_returns_freed_pages_pinned_by_a_live_chunk():
    lib = _libc()
    lib.malloc.restype, lib.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    lib.free.argtypes = [ctypes.c_void_p]
    proc = psutil.Process()
    chunks = [lib.malloc(60_000) for _ in range(3000)]  # below the mmap threshold: heap memory, ~180 MB
    for ptr in chunks:
        ctypes.memset(ptr, 1, 60_000)
    for ptr in chunks[:-1]:  # the last chunk pins the heap top: free() alone cannot shrink the heap
        lib.free(ptr)
    held = proc.memory_info().rss
    assert trim_heap() is True
    after = proc.memory_info().rss
    lib.free(chunks[-1])
    assert held - after > 100 * 2**20, f"trim gave back {(held - after) / 2**20:.0f} MB of ~180 MB freed"
