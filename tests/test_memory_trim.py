"""``stream.memory.trim_heap``: freed heap pages pinned below a live allocation go back to the OS (glibc)."""
from __future__ import annotations

import ctypes
from pathlib import Path

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
    import serve.core.hosts
    from serve.core.config import ServiceConfig
    from serve.core.flow import DirectTransport
    from serve.core.runner import StreamPlan
    from tests.service_doubles import FakeLLMStage, FakeVisionStage

    calls = []
    monkeypatch.setattr(serve.core.hosts, "trim_heap", lambda: calls.append(1) or True)
    cfg = ServiceConfig.parse({})
    host = serve.core.hosts.IngestHost(DirectTransport(FakeVisionStage(), FakeLLMStage()), cfg.source, cfg.serve.ingest,
                                  60.0, trim_on_close=trim)
    host.create(StreamPlan("s", None, "memory://", cfg.stream_options()))
    assert calls == []
    host.close("s")
    assert calls == ([1] if trim else [])


def test_a_hosts_memory_reports_the_pixels_its_streams_hold_and_the_newest_frame_pins_no_chunk():
    import numpy as np

    import serve.core.hosts
    from serve.core.config import ServiceConfig
    from serve.core.flow import DirectTransport
    from serve.core.runner import StreamPlan
    from stream.frames import FrameBatch
    from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames

    cfg = ServiceConfig.parse({"sampler": {"fps": 100.0, "frames_per_chunk": 4}})
    host = serve.core.hosts.IngestHost(DirectTransport(FakeVisionStage(), FakeLLMStage()), cfg.source, cfg.serve.ingest, 60.0)
    host.create(StreamPlan("s", None, "memory://", cfg.stream_options()))
    assert host.memory().frames_mb == 0.0
    rgb, pts = frames(8, 96, 128)  # two chunks of 4 frames, 36 KiB each
    host.push("s", FrameBatch(rgb=rgb, pts=np.array(pts), indices=np.arange(8)), flush=True)
    assert host._runner("s").wait_idle(10.0)  # noqa: SLF001 - our own class
    last = host._runner("s").last_frame  # noqa: SLF001 - our own class
    assert last.shape == (96, 128, 3) and last.base is None  # a copy: the encoded chunk can be freed
    assert host.memory().frames_mb * 2**20 == last.nbytes  # nothing queued any more: only the newest frame
    host.close("s")
    assert host.memory().frames_mb == 0.0


_FRAMES = """
import collections, json, numpy as np
from stream.memory import heap_stats
kept = collections.deque(maxlen=16)  # sampled frames waiting in chunks; the others are dropped at once
for i in range(400):
    frame = np.ones((576, 768, 3), np.uint8)  # a decoded 768x576 frame, 1.3 MB
    if i % 4 == 0:
        kept.append(frame)
    small = [np.ones(2000, np.uint8) for _ in range(20)]  # small allocations in between (Python objects)
    if i % 7 == 0:
        kept_small = small
print(json.dumps(heap_stats()))
"""


@pytest.mark.skipif(_libc() is None or getattr(_libc(), "mallinfo2", None) is None, reason="glibc >= 2.33 only")
@pytest.mark.parametrize("fixed", [True, False])
def test_the_hosts_mmap_threshold_keeps_decoded_frames_off_the_heap(fixed):
    """serve.process.host_env's default: with glibc's mmap threshold fixed, frame-sized buffers are mapped one by
    one and returned on free; with its default dynamic threshold they land in the heap after the first free."""
    import json
    import os
    import subprocess
    import sys

    from serve.core.settings import ProcessSettings

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if fixed:
        env.update(ProcessSettings().host_env)
    out = subprocess.run([sys.executable, "-c", _FRAMES], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    heap = json.loads(out.strip().splitlines()[-1])
    live = 16 * 576 * 768 * 3 / 2**20  # the frames held at the end, ~21 MB
    if fixed:
        assert heap["heap_mb"] < 8 and heap["mmapped_mb"] >= live, heap
    else:
        assert heap["heap_mb"] >= live, heap  # why the hosts set it: frames fragment the heap otherwise


_CYCLES = """
import gc, json, sys, weakref
import numpy as np
from stream.memory import freeze_startup_objects, gc_stats
startup = [[i] for i in range(400_000)]  # long-lived start-up objects (torch + Ray: ~470,000 in a host)
gc.collect()
if sys.argv[1] == "freeze":
    freeze_startup_objects()
class Node:
    pass
full0, held, gone = gc_stats()["gc_full_collections"], [], []
for i in range(300):  # a closed stream's state in a reference cycle, holding a frame; lives a while, then dropped
    a, b = Node(), Node()
    a.b, b.a, a.frame = b, a, np.ones(1 << 20, np.uint8)
    held.append(a)
    junk = [Node() for _ in range(1000)]  # the work meanwhile: young collections promote the cycle
    if len(held) > 8:
        gone.append(weakref.ref(held.pop(0)))
print(json.dumps({"full": gc_stats()["gc_full_collections"] - full0, "frozen": gc_stats()["gc_frozen"],
                  "garbage_frames_alive": sum(r() is not None for r in gone)}))
"""


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_startup_objects_let_full_collections_free_cyclic_garbage(freeze):
    """serve.process.gc_freeze: with many long-lived objects, cyclic garbage holding frames waits for a full
    collection that does not come; with the start-up objects frozen, full collections run and free it."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _CYCLES, "freeze" if freeze else "plain"], capture_output=True,
                         text=True, timeout=120, cwd=str(Path(__file__).resolve().parent.parent), check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if freeze:
        assert got["frozen"] >= 400_000 and got["full"] >= 1
        assert got["garbage_frames_alive"] <= 100  # only what became garbage since the last full collection (29)
    else:
        assert got["frozen"] == 0 and got["full"] == 0
        assert got["garbage_frames_alive"] >= 200  # of 292 dropped cycles of ~1 MB each, 217 still in memory
