"""Give freed heap memory back to the operating system (glibc ``malloc_trim``).

A long-running replica frees a stream's tensors and buffers when the stream closes, but glibc keeps freed memory in
its arenas (one per thread, up to 8 per core by default), so the process's RSS stays at its high-water mark and
creeps up as other threads allocate elsewhere. ``malloc_trim(0)`` returns the free pages of every arena. On a C
library without it (musl, macOS) this is a no-op.

Python's cyclic garbage collector has the opposite problem in such a process: a full collection runs only once a
quarter as many objects as are already long-lived have become long-lived since the last one, and a process with
torch and Ray imported starts with ~470,000 tracked objects, so cyclic garbage (and whatever large buffers it holds)
can wait for minutes or longer. :func:`freeze_startup_objects` moves the start-up objects out of the collector's
view (``gc.freeze``): full collections are then no longer gated on them, and scan only what came later.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache
from typing import Any

__all__ = ["freeze_startup_objects", "gc_stats", "heap_stats", "trim_heap"]

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


def freeze_startup_objects() -> int:
    """Collect, then freeze every object alive now (modules, models, framework state) out of the cyclic collector's
    view, and collect once more so its long-lived count starts from what is not frozen. Returns the objects frozen.

    Frozen objects are still freed by reference counting; only cycles among them are never collected, so call this
    once, after start-up, when what is alive is meant to live as long as the process.
    """
    gc.collect()
    gc.freeze()
    gc.collect()  # a full collection over the unfrozen (none yet): full collections now compare against ~0
    return gc.get_freeze_count()


def gc_stats() -> dict[str, int]:
    """The cyclic collector's counters: ``gc_full_collections`` (of the oldest generation, since start) and
    ``gc_frozen`` (objects :func:`freeze_startup_objects` took out of its view)."""
    return {"gc_full_collections": int(gc.get_stats()[-1]["collections"]), "gc_frozen": int(gc.get_freeze_count())}
