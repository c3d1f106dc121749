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


@pytest.mark.parametrize("trim", [True, False])
def test_an_ingest_host_trims_after_a_stream_closes_when_configured(monkeypatch, trim):
    import serve.hosts
    from serve.config import ServiceConfig
    from serve.flow import DirectTransport
    from tests.service_doubles import FakeLLMStage, FakeVisionStage

    calls = []
    monkeypatch.setattr(serve.hosts, "trim_heap", lambda: calls.append(1) or True)
    cfg = ServiceConfig.parse({})
    host = serve.hosts.IngestHost(DirectTransport(FakeVisionStage(), FakeLLMStage()), cfg.source, cfg.serve.ingest,
                                  60.0, trim_on_close=trim)
    host.create("s", None, "memory://", cfg.stream_options())
    assert calls == []
    host.close("s")
    assert calls == ([1] if trim else [])
