"""A closed stream's frames are freed at once, by reference counting, not at some later full garbage collection.

In an ingest host (torch and Ray loaded: ~470,000 objects tracked at start-up) Python's full collection waits for
a quarter of that many objects to become long-lived, and in a soak it did not run once in minutes; a stream whose
runner sat in a reference cycle (runner -> worker -> sink -> runner) kept its newest frame, partial chunk, queued
chunks and decoder until then: ~3 MB/min of host growth at 768x576. These tests run with the cyclic collector off.
"""
from __future__ import annotations

import contextlib
import gc
import weakref

import numpy as np

from serve.core.runner import StreamPlan
from serve.core.config import ServiceConfig
from serve.core.flow import DirectTransport
from serve.core.hosts import IngestHost
from stream.frames import FrameBatch
from tests.media import make_clip
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames


@contextlib.contextmanager
def no_cyclic_gc():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _host(delay_s: float = 0.0, **sampler) -> tuple[IngestHost, ServiceConfig]:
    cfg = ServiceConfig.parse({"sampler": {"fps": 100.0, "frames_per_chunk": 4, **sampler}})
    transport = DirectTransport(FakeVisionStage(delay_s=delay_s), FakeLLMStage())
    return IngestHost(transport, cfg.source, cfg.serve.ingest, 60.0), cfg


def test_a_closed_file_stream_mid_read_frees_its_frames_without_a_garbage_collection(tmp_path):
    make_clip(tmp_path / "clip.avi", num_frames=90, fps=30, size=(64, 48))
    host, cfg = _host(delay_s=0.05)  # a slow encoder: chunks wait in the queue, frames in the chunker
    with no_cyclic_gc():
        host.create(StreamPlan("f", "clip.avi", str(tmp_path / "clip.avi"), cfg.stream_options()))
        runner = host._runner("f")  # noqa: SLF001 - our own class
        worker = runner.worker
        while worker.chunks_encoded < 2:  # mid-stream: the newest frame is held, the queue is full
            worker.wait_finished(0.01)
        assert runner.last_frame is not None and worker.frame_bytes() > runner.last_frame.nbytes
        refs = [weakref.ref(o) for o in (runner, worker, worker.source, worker.queue, worker.chunker)]
        newest = weakref.ref(runner.last_frame)
        del runner, worker
        host.close("f")
        assert [r() is None for r in refs] == [True] * len(refs)
        assert newest() is None


def test_a_closed_pushed_stream_frees_its_pushed_chunks_without_a_garbage_collection():
    host, cfg = _host()
    with no_cyclic_gc():
        host.create(StreamPlan("p", None, "memory://", cfg.stream_options()))
        rgb, pts = frames(10, 48, 64)  # two full chunks and two frames waiting for the third
        batch = FrameBatch(rgb=rgb, pts=np.array(pts), indices=np.arange(10))
        host.push("p", batch, flush=False)
        assert host._runner("p").wait_idle(10.0)  # noqa: SLF001 - our own class
        runner = host._runner("p")  # noqa: SLF001
        assert len(runner.worker.chunker) == 2
        refs = [weakref.ref(o) for o in (runner, runner.worker, runner.worker.source)]
        del runner
        host.close("p")
        assert [r() is None for r in refs] == [True] * len(refs)
    assert host.memory().frames_mb == 0.0


def test_close_drops_what_a_worker_still_holds_even_while_a_thread_outlives_close():
    """A sender stuck in a stage call beyond ``close``'s join timeout keeps the worker alive; its frames go anyway."""
    host, cfg = _host(delay_s=1.5)
    host.create(StreamPlan("s", None, "memory://", cfg.stream_options()))
    rgb, pts = frames(14, 48, 64)
    host.push("s", FrameBatch(rgb=rgb, pts=np.array(pts), indices=np.arange(14)), flush=False)
    worker = host._runner("s").worker  # noqa: SLF001
    worker.wait_source_drained(5.0)
    assert worker.frame_bytes() > 0
    worker.close(timeout_s=0.1)  # the sender is still inside the 1.5 s encode
    assert len(worker.queue) == 0 and len(worker.chunker) == 0 and worker.last_frame is None
    assert worker.frame_bytes() <= 4 * 48 * 64 * 3  # at most the one chunk inside the stage call
    host.close("s")
