"""One stream's ingest, as plain threads (no Ray): source -> fps sampler -> chunker -> bounded queue -> sink.

The reader thread decodes (or takes pushed frames), samples and chunks; complete chunks go into a
:class:`ChunkQueue` of ``queue_chunks`` entries. The sender thread takes chunks in order and hands each to the sink
(the encoder + LLM calls). When the encoder lags and the queue is full:

* live and pushed streams drop by the configured policy (``drop_oldest``: the oldest waiting chunk goes, so answers
  stay about recent video; ``drop_newest``: the incoming chunk goes) and count every dropped frame;
* file streams never drop: the reader waits for room (a file has no real-time clock to keep up with).

A live source never blocks the service: reading, sending and pushing happen off the caller's thread, and
:meth:`IngestWorker.push` only appends to a bounded queue.

A chunk the model side cannot take *for now* (a :class:`serve.core.api.ServiceUnavailableError`: a replica is being
replaced and the stream's state rebuilt) is dropped and counted like a lagging encoder's, and the stream carries on;
any other sink error ends the stream as ``failed``. When the stream stops by itself (``ended``/``failed``) the worker
tells ``on_finish`` once, so the model state it no longer needs is freed at once.

No reference cycles: a closed stream's frames are freed by reference counting the moment the last reference goes,
not at a later full garbage collection (which a long-running process with torch and Ray loaded reaches rarely: a
closed stream's pixels stayed in memory for minutes that way). The sink must not reference the object that holds
the worker (pass the stage client's method, not a method of the worker's owner); :meth:`IngestWorker.close` drops
every frame the worker still holds.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Literal

import numpy as np

from serve.core.api import IngestStats, ServiceUnavailableError
from serve.core.stats import ChunkResult
from stream.frames import FrameBatch
from stream.sampler import FrameChunker

QueuePolicy = Literal["drop_oldest", "drop_newest", "block"]
_POLICIES = ("drop_oldest", "drop_newest", "block")


class ChunkQueue:
    """Bounded FIFO of chunks with a stated overflow policy and drop counters; thread-safe.

    Args:
        max_chunks: capacity (>= 1).
        policy: ``"drop_oldest"``, ``"drop_newest"`` or ``"block"`` (``put`` waits for room).
    """

    def __init__(self, max_chunks: int, policy: QueuePolicy) -> None:
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
        self.max_chunks = max_chunks
        self.policy: QueuePolicy = policy
        self.dropped_chunks = 0
        self.dropped_frames = 0
        self._items: collections.deque[FrameBatch] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0  # chunks taken by the consumer and not yet marked done

    def put(self, chunk: FrameBatch) -> bool:
        """Queue ``chunk``; returns ``False`` if it (or nothing, when closed) was dropped instead."""
        with self._cond:
            while self.policy == "block" and len(self._items) >= self.max_chunks and not self._closed:
                self._cond.wait(0.1)
            if self._closed:
                return False
            if len(self._items) >= self.max_chunks:
                if self.policy == "drop_newest":
                    self._count_drop(chunk)
                    return False
                self._count_drop(self._items.popleft())
            self._items.append(chunk)
            self._cond.notify_all()
            return True

    def get(self, timeout_s: float | None = None) -> FrameBatch | None:
        """Oldest chunk (marked busy until :meth:`task_done`), or ``None`` on timeout or once closed and empty."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while not self._items:
                left = None if deadline is None else deadline - time.monotonic()
                if self._closed or (left is not None and left <= 0):
                    return None
                self._cond.wait(left)
            self._busy += 1
            chunk = self._items.popleft()
            self._cond.notify_all()
            return chunk

    def task_done(self) -> None:
        """Mark the chunk last returned by :meth:`get` as processed."""
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or being processed; ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._items or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Wake every waiter; later ``put`` calls drop nothing and return ``False``, ``get`` drains then ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def clear(self) -> None:
        """Forget the chunks waiting here (a closed stream's; not counted as drops)."""
        with self._cond:
            self._items.clear()
            self._cond.notify_all()

    def nbytes(self) -> int:
        """Pixel bytes of the chunks waiting here (bounded by ``max_chunks`` chunks)."""
        with self._cond:
            return sum(chunk.rgb.nbytes for chunk in self._items)

    def _count_drop(self, chunk: FrameBatch) -> None:
        self.dropped_chunks += 1
        self.dropped_frames += len(chunk)


ChunkSink = Callable[[FrameBatch], ChunkResult]
FinishHook = Callable[[str], None]  # told "ended" or "failed" once, from the sender thread


class IngestWorker:
    """Reads one stream and feeds its chunks to ``sink`` from two daemon threads.

    Args:
        stream_id: for thread names and errors.
        source: the frame source (a :class:`stream.sources.MemorySource` for pushed streams); the reader thread owns
            it and closes it when it stops.
        sink: called with each chunk, in order, from the sender thread; returns both stages' numbers for it. An exception in the sink ends the stream as ``failed``. It must not
            reference the worker's owner (a cycle would keep the stream's frames until a full garbage collection).
        chunker: the stream's sample -> chunk step (:class:`stream.sampler.FrameChunker`).
        queue: the bounded chunk queue (its policy decides what a lagging encoder costs).
        on_finish: told ``"ended"`` or ``"failed"`` once when the stream stops by itself (not on :meth:`close`); like
            the sink, it must not reference the worker's owner.
    """

    def __init__(self, stream_id: str, source: Any, sink: ChunkSink, chunker: FrameChunker, queue: ChunkQueue,
                 on_finish: FinishHook | None = None) -> None:
        self.stream_id = stream_id
        self.source = source
        self.sink = sink
        self.chunker = chunker
        self.queue = queue
        self.on_finish = on_finish
        self.sink_dropped_frames = 0  # chunks the model side could not take for now (replica being replaced)
        self._finished = False
        self.state = "starting"
        self.error: str | None = None
        self.frames_encoded = 0
        self.chunks_encoded = 0
        self.last_pts: float | None = None
        self.last_result: ChunkResult | None = None  # both stages' numbers for the newest chunk
        self.last_frame: np.ndarray | None = None  # [H, W, 3] uint8 copy of the newest frame sent (frame.jpg); None before one
        self.last_activity = time.monotonic()  # newest push or encoded chunk (idle-stream reaping)
        self._handled = 0  # frames the reader finished with (sampled or skipped)
        self._chunk_ms: collections.deque[float] = collections.deque(maxlen=256)  # bounded: recent chunks only
        self._sending: FrameBatch | None = None  # the chunk in the sink right now
        self._lock = threading.Lock()  # sampler/chunker are touched by the reader and by flush()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name=f"ingest-read {stream_id}", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"ingest-send {stream_id}", daemon=True)

    def start(self) -> None:
        """Start both threads."""
        self.state = "running"
        self._reader.start()
        self._sender.start()

    def push(self, batch: FrameBatch) -> int:
        """Queue pushed frames (pushed streams only); never blocks on the encoder. Returns frames accepted."""
        self.source.push_batch(batch)
        self.last_activity = time.monotonic()
        return len(batch)

    def flush(self) -> None:
        """Queue the partial chunk now (pushed streams: encode what arrived without waiting for a full chunk)."""
        self.wait_source_drained(5.0)
        with self._lock:
            self._put_partial()

    def wait_source_drained(self, timeout_s: float) -> bool:
        """Wait until the reader handled every frame pushed so far (pushed streams); ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._reader.is_alive():
            src = self.source.stats()
            if self._handled + src.get("dropped", 0) >= src.get("pushed", 0):
                return True
            time.sleep(0.002)
        return not self._reader.is_alive()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the frames received so far were chunked and every full chunk went through the sink
        (the partial chunk stays in the chunker unless :meth:`flush` is called); ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        if hasattr(self.source, "push_batch") and not self.wait_source_drained(timeout_s):
            return False
        return self.queue.wait_empty(max(0.0, deadline - time.monotonic()))

    def wait_finished(self, timeout_s: float) -> bool:
        """Wait until a finite source was read to its end and everything was sent; ``False`` on timeout."""
        deadline = time.monotonic() + timeout_s
        for thread in (self._reader, self._sender):
            thread.join(max(0.0, deadline - time.monotonic()))
        return not (self._reader.is_alive() or self._sender.is_alive())

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop both threads (the reader closes the source) and wait for them up to ``timeout_s``."""
        self._stop.set()
        interrupt = getattr(self.source, "interrupt", None)
        if interrupt is not None:
            interrupt()
        if hasattr(self.source, "end") and not getattr(self.source, "ended", True):
            self.source.end()
        self.queue.close()
        for thread in (self._reader, self._sender):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout_s)
        if self.state != "failed":
            self.state = "closed"
        self.on_finish = None  # closed on purpose: the owner frees the state itself
        self._release()

    def _release(self) -> None:
        """Drop the frames a closed stream still holds (a partial chunk, chunks its sender had not taken yet, the
        newest frame), so they go now even while a thread that outlived ``close``'s timeout still holds the worker."""
        with self._lock:
            self.chunker.clear()
        self.queue.clear()
        self.last_frame = None

    def frame_bytes(self) -> int:
        """Pixel bytes this stream holds right now: queued chunks, the one being sent and the newest frame (bounded
        by ``queue_chunks + 1`` chunks and a frame; the memory a lagging encoder costs, not a leak; 0 once closed)."""
        sending, last = self._sending, self.last_frame
        return (self.queue.nbytes() + (sending.rgb.nbytes if sending is not None else 0)
                + (last.nbytes if last is not None else 0))

    def stats(self) -> IngestStats:
        """Ingest counters, with the source's own (frames read or pushed, drops, reconnects)."""
        src = self.source.stats() if hasattr(self.source, "stats") else {}
        frames_in = src.get("pushed", src.get("frames_read", 0))
        times = sorted(self._chunk_ms)
        return IngestStats(
            frames_in=int(frames_in), frames_sampled=self.chunker.sampled, frames_encoded=self.frames_encoded,
            frames_dropped=int(src.get("dropped", 0)) + self.queue.dropped_frames + self.sink_dropped_frames,
            chunks_encoded=self.chunks_encoded, chunks_dropped=self.queue.dropped_chunks, queued_chunks=len(self.queue),
            reconnects=int(src.get("reconnects", 0)), reconnect_attempts=int(src.get("reconnect_attempts", 0)),
            encode_ms_p50=times[len(times) // 2] if times else None, last_pts=self.last_pts,
        )

    def _read_loop(self) -> None:
        try:
            for frame in self.source:
                if self._stop.is_set():
                    break
                with self._lock:  # queued under the lock so flush() cannot overtake a completed chunk
                    for chunk in self.chunker.push(frame):
                        self.queue.put(chunk)
                    self._handled += 1
            if not self._stop.is_set():
                with self._lock:
                    self._put_partial()
        except Exception as exc:  # a source error ends this stream only; it is reported in stats
            self._fail(f"source failed: {type(exc).__name__}: {exc}")
        finally:
            self.source.close()
            self.queue.close()  # the sender drains what is queued, then stops

    def _put_partial(self) -> None:
        rest = self.chunker.flush()
        if rest is not None:
            self.queue.put(rest)

    def _send_loop(self) -> None:
        while True:
            chunk = self.queue.get()
            if chunk is None:
                break
            try:
                if not self._stop.is_set() and self.state != "failed":
                    self._send(chunk)
            except ServiceUnavailableError:  # the model side is recovering: this chunk is lost, the stream goes on
                self.sink_dropped_frames += len(chunk)
            except Exception as exc:
                self._fail(f"encoder/LLM failed: {type(exc).__name__}: {exc}")
                self._finish("failed")
            finally:
                self.queue.task_done()
        if self.state == "running" and not self._stop.is_set():
            self.state = "ended"
        if self.state in ("ended", "failed") and not self._stop.is_set():
            self._finish(self.state)

    def _finish(self, state: str) -> None:
        """Tell ``on_finish`` once that the stream stopped by itself."""
        if self._finished or self.on_finish is None:
            return
        self._finished = True
        try:
            self.on_finish(state)
        except Exception:  # noqa: BLE001 - freeing is best effort; the replicas' TTL reaper is the backstop
            pass

    def _send(self, chunk: FrameBatch) -> None:
        t0 = time.perf_counter()
        self.last_frame = chunk.rgb[-1].copy()  # [H, W, 3]; a copy: a view would keep the whole chunk alive
        self._sending = chunk
        try:
            result = self.sink(chunk)
        finally:
            self._sending = None
        self._chunk_ms.append((time.perf_counter() - t0) * 1000.0)
        self.frames_encoded += len(chunk)
        self.chunks_encoded += 1
        self.last_pts = float(chunk.pts[-1])
        self.last_result = result
        self.last_activity = time.monotonic()

    def _fail(self, message: str) -> None:
        if self.state not in ("closed",):
            self.state = "failed"
            self.error = message


def stream_kind(source: Any) -> str:
    """``"push"`` for a pushed source, ``"live"`` for other live sources, else ``"file"``."""
    if hasattr(source, "push_batch"):
        return "push"
    return "live" if getattr(source, "is_live", False) else "file"


def queue_policy(kind: str, drop_policy: str) -> QueuePolicy:
    """Files wait for the encoder (``"block"``); live and pushed streams use ``drop_policy``."""
    return "block" if kind == "file" else drop_policy  # type: ignore[return-value]
