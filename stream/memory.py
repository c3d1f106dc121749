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

__all__ = ["trim_heap"]


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
