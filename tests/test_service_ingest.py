"""Per-stream ingest without Ray: bounded queues, the drop policy under encoder lag, non-blocking pushes, files never
dropping, source failures isolated, and bounded state over 10,000 frames."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serve.core.ingest import ChunkQueue, IngestWorker, queue_policy, stream_kind
from serve.core.stats import AppendStats, ChunkResult, ChunkStats
from stream.errors import SourceUnreachableError
from stream.frames import FrameBatch
from stream.sampler import FrameChunker
from stream.sources import FileSource, MemorySource
from tests.media import make_clip
from tests.service_doubles import frames


def _chunk(start: int, n: int = 2) -> FrameBatch:
    rgb, pts = frames(n, 4, 4, start=start)
    return FrameBatch(rgb=rgb, pts=np.array(pts), indices=np.arange(start, start + n))


class SlowSink:
    """Records chunks; each call takes ``delay_s``; can fail on a chosen call."""

    def __init__(self, delay_s: float = 0.0, fail_at: int | None = None) -> None:
        self.delay_s, self.fail_at = delay_s, fail_at
        self.chunks: list[FrameBatch] = []

    def __call__(self, chunk: FrameBatch) -> dict:
        if self.fail_at is not None and len(self.chunks) == self.fail_at:
            raise RuntimeError("encoder replica crashed")
        time.sleep(self.delay_s)
        self.chunks.append(chunk)
        return ChunkResult(vision=ChunkStats(tokens_kept=len(chunk)), llm=AppendStats())


def _worker(source, sink, queue_chunks=2, policy="drop_oldest", fps=1000.0, per_chunk=4) -> IngestWorker:
    w = IngestWorker("s", source, sink, FrameChunker(fps, per_chunk), ChunkQueue(queue_chunks, policy))
    w.start()
    return w


@pytest.mark.parametrize("policy, kept", [("drop_oldest", [6, 8]), ("drop_newest", [0, 2])])
def test_chunk_queue_drop_policies(policy, kept):
    q = ChunkQueue(2, policy)
    results = [q.put(_chunk(start)) for start in (0, 2, 4, 6, 8)]
    assert results == ([True] * 5 if policy == "drop_oldest" else [True, True, False, False, False])
    assert len(q) == 2
    assert (q.dropped_chunks, q.dropped_frames) == (3, 6)
    assert [int(q.get(0).indices[0]) for _ in range(2)] == kept


def test_chunk_queue_block_waits_for_room_and_close_wakes():
    q = ChunkQueue(1, "block")
    q.put(_chunk(0))
    done = threading.Event()
    threading.Thread(target=lambda: (q.put(_chunk(2)), done.set()), daemon=True).start()
    assert not done.wait(0.2)  # full: the producer waits, nothing is dropped
    assert int(q.get(0).indices[0]) == 0
    assert done.wait(2.0)
    q.task_done()
    assert q.dropped_chunks == 0 and len(q) == 1
    q.close()
    assert q.get(0) is not None and q.get(0) is None  # drains, then ends
    with pytest.raises(ValueError, match="policy must be one of"):
        ChunkQueue(1, "lifo")


def test_push_never_waits_for_a_lagging_encoder_and_drops_are_counted():
    source = MemorySource(max_queue=16, overflow="drop_oldest")
    sink = SlowSink(delay_s=0.05)
    w = _worker(source, sink, queue_chunks=2)
    rgb, pts = frames(200, 8, 8)
    t0 = time.perf_counter()
    for i in range(0, 200, 10):
        w.push(FrameBatch(rgb=rgb[i:i + 10], pts=np.array(pts[i:i + 10]), indices=np.arange(i, i + 10)))
    push_s = time.perf_counter() - t0
    assert push_s < 1.0, f"pushing 200 frames took {push_s:.2f}s: push waited for the encoder"
    source.end()
    assert w.wait_finished(10.0)
    assert w.state == "ended"
    st = w.stats()
    assert st.frames_in == 200
    assert st.frames_dropped > 0
    # every pushed frame is accounted for: encoded, or dropped in one of the two bounded queues
    assert st.frames_encoded + st.frames_dropped == 200
    assert st.frames_encoded == sum(len(c) for c in sink.chunks)
    encoded = np.concatenate([c.pts for c in sink.chunks])
    assert np.all(np.diff(encoded) > 0), "chunks reached the encoder out of order"
    assert encoded[-1] == pts[-1], "drop_oldest must keep the newest frames"
    w.close()


def test_flush_sends_the_partial_chunk_now():
    source = MemorySource(max_queue=64)
    sink = SlowSink()
    w = _worker(source, sink, queue_chunks=4, per_chunk=8)
    rgb, pts = frames(5, 8, 8)
    w.push(FrameBatch(rgb=rgb, pts=np.array(pts), indices=np.arange(5)))
    w.flush()
    assert w.wait_idle(5.0)
    assert [len(c) for c in sink.chunks] == [5]
    w.close()


def test_file_streams_block_instead_of_dropping(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", num_frames=40, fps=20, size=(32, 24))
    source = FileSource(clip)
    kind = stream_kind(source)
    assert kind == "file" and queue_policy(kind, "drop_oldest") == "block"
    sink = SlowSink(delay_s=0.01)
    w = _worker(source, sink, queue_chunks=1, policy=queue_policy(kind, "drop_oldest"), per_chunk=4)
    assert w.wait_finished(20.0)
    st = w.stats()
    assert w.state == "ended"
    assert st.frames_dropped == 0 and st.frames_encoded == 40 == st.frames_in
    assert [len(c) for c in sink.chunks] == [4] * 10


def test_source_and_sink_failures_end_only_that_stream():
    class Broken(MemorySource):
        def _read(self):
            raise SourceUnreachableError("rtsp://cam: connection refused")

    bad = _worker(Broken(), SlowSink())
    good_source = MemorySource()
    good = _worker(good_source, SlowSink(), per_chunk=2)
    crashing = _worker(MemorySource(), SlowSink(fail_at=0), per_chunk=2)
    rgb, pts = frames(4, 8, 8)
    batch = FrameBatch(rgb=rgb, pts=np.array(pts), indices=np.arange(4))
    good.push(batch)
    crashing.push(batch)
    assert good.wait_idle(5.0) and crashing.wait_idle(5.0)
    time.sleep(0.1)
    assert bad.state == "failed" and "SourceUnreachableError" in bad.error and "connection refused" in bad.error
    assert crashing.state == "failed" and "encoder replica crashed" in crashing.error
    assert good.state == "running" and good.stats().frames_encoded == 4
    for w in (bad, good, crashing):
        w.close()
    assert good.state == "closed"


def test_ten_thousand_frames_keep_queues_bounded():
    source = MemorySource(max_queue=32, overflow="drop_oldest")
    sink = SlowSink(delay_s=0.002)
    w = _worker(source, sink, queue_chunks=3, per_chunk=8)
    rgb, pts = frames(500, 4, 4)
    peak_chunks = peak_frames = 0
    for rep in range(20):  # 10,000 frames
        offset = rep * 500
        w.push(FrameBatch(rgb=rgb, pts=np.array(pts) + offset / 10.0, indices=np.arange(500) + offset))
        peak_chunks, peak_frames = max(peak_chunks, len(w.queue)), max(peak_frames, source.qsize())
    source.end()
    assert w.wait_finished(30.0)
    st = w.stats()
    assert peak_chunks <= 3 and peak_frames <= 32
    assert st.frames_in == 10_000
    assert st.frames_encoded + st.frames_dropped == 10_000
    assert len(w._chunk_ms) <= 256  # the timing window is bounded too


def test_frame_bytes_count_queued_and_in_flight_chunks_and_stay_bounded():
    """``frame_bytes`` (what the soak subtracts from a host's RSS) is exactly the pixels queued + being sent + the
    newest frame, never more than ``queue_chunks + 1`` chunks and a frame, the newest frame once drained, zero once
    closed."""
    gate = threading.Event()
    sink = SlowSink()
    sink_calls = []

    def held_sink(chunk):
        sink_calls.append(len(chunk))
        gate.wait(10)
        return sink(chunk)

    source = MemorySource(max_queue=64, overflow="drop_oldest")
    w = _worker(source, held_sink, queue_chunks=2, per_chunk=4)
    rgb, pts = frames(40, 4, 4)  # 10 chunks of 4 frames, 4x4x3 bytes each
    w.push(FrameBatch(rgb=rgb, pts=np.array(pts), indices=np.arange(40)))
    assert w.wait_source_drained(10.0)
    frame_bytes = 4 * 4 * 3
    chunk_bytes = 4 * frame_bytes
    assert sink_calls == [4]  # one chunk in the sink, blocked
    assert w.frame_bytes() == (len(w.queue) + 1) * chunk_bytes + frame_bytes  # queued + in flight + newest frame
    rgb2, pts2 = frames(8, 4, 4, start=40)  # with the sink surely busy now, two more chunks fill the queue
    w.push(FrameBatch(rgb=rgb2, pts=np.array(pts2), indices=np.arange(40, 48)))
    assert w.wait_source_drained(10.0)
    assert w.queue.nbytes() == len(w.queue) * chunk_bytes == 2 * chunk_bytes  # the queue's bound
    assert w.frame_bytes() == 3 * chunk_bytes + frame_bytes
    gate.set()
    source.end()
    assert w.wait_finished(10.0)
    assert w.frame_bytes() == frame_bytes and w.queue.nbytes() == 0  # the newest frame (frame.jpg) stays
    w.close()
    assert w.frame_bytes() == 0
