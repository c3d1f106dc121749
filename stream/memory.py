"""Give freed heap memory back to the operating system (glibc ``malloc_trim``).

A long-running replica frees a stream's tensors and buffers when the stream closes, but glibc keeps freed memory in
its arenas (one per thread, up to 8 per core by default), so the process's RSS stays at its high-water mark and
creeps up as other threads allocate elsewhere. ``malloc_trim(0)`` returns the free pages of every arena. On a C
library without it (musl, macOS) this is a no-op.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any

__all__ = ["heap_stats", "trim_heap"]

_MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


@lru_cache(maxsize=1)
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def trim_heap() -> bool:
    """Return free heap pages to the OS; True when the C library released some, False when none or unsupported."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False


def heap_stats() -> dict[str, float] | None:
    """glibc's heap now, in MB: ``heap_mb`` (obtained from the OS by sbrk / arena mmaps), ``heap_used_mb`` and
    ``heap_free_mb`` (free inside it: fragmentation when it stays high), ``mmapped_mb`` (blocks above the mmap
    threshold, each returned to the OS on free). ``None`` without ``mallinfo2`` (glibc < 2.33, musl, macOS)."""
    lib = _libc()
    fn = getattr(lib, "mallinfo2", None) if lib is not None else None
    if fn is None:
        return None
    fn.restype = _MallInfo2
    info = fn()
    mb = 2.0**20
    return {"heap_mb": info.arena / mb, "heap_used_mb": info.uordblks / mb, "heap_free_mb": info.fordblks / mb,
            "mmapped_mb": info.hblkhd / mb}
