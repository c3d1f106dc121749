"""What one ingress replica admits at once, so no kind of request can starve the others.

* :class:`LongLivedGate` -- event readers (``GET /streams/{id}/events``) and answers (questions, chat completions)
  hold a request slot for as long as they stream. The gate caps them per stream -- readers and answers each on their
  own, so a flood of readers never blocks a stream's questions -- and per replica (429 with Retry-After past either); the replica cap is at most 3/4 of the ingress's ``max_ongoing_requests`` (checked at
  load), so health checks, pushes and creates always find a slot.
* :class:`PushDecoder` -- pushed JPEG batches are decoded on a small thread pool, never on the event loop, after
  their declared pixels passed the per-push limit (:mod:`serve.core.protocol`) and the stream's budget of pixels
  being decoded or handed to its host at once (429 past it). Large decodes give their freed heap back to the OS.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve.core.api import TooManyRequestsError
from serve.core.protocol import FrameLimits, decode_frames
from stream.frames import FrameBatch
from stream.memory import trim_heap

TRIM_AFTER_PIXELS = 1 << 22  # a push this large (12 MiB of RGB) returns its freed heap to the OS afterwards


class LongLivedGate:
    """Counts long-lived requests per stream and kind (``reader`` / ``answer``) and in total; thread-safe.

    Args:
        per_stream: most of one kind at once on one stream (``None`` stream: counted in the total only).
        total: most at once on this replica, all kinds.
    """

    def __init__(self, per_stream: int, total: int) -> None:
        self.per_stream, self.total = per_stream, total
        self._by_stream: dict[tuple[str | None, str], int] = {}
        self._open = 0
        self._lock = threading.Lock()
        self.refused = 0

    def acquire(self, stream_id: str | None, kind: str) -> Callable[[], None]:
        """Take a slot for an event ``reader`` or an ``answer``; returns its release (idempotent).

        Raises:
            TooManyRequestsError: the stream has ``per_stream`` of this kind open, or the replica ``total`` (429).
        """
        what = f"this event {kind}" if kind == "reader" else f"this {kind}"
        key = (stream_id, kind)
        with self._lock:
            mine = self._by_stream.get(key, 0)
            if self._open >= self.total:
                self.refused += 1
                raise TooManyRequestsError(
                    f"this service replica already streams {self._open} event readers and answers, its maximum "
                    f"(serve.max_long_lived_per_replica={self.total}); {what} refused. Fix: close idle readers, or "
                    "retry after the Retry-After seconds."
                )
            if stream_id is not None and mine >= self.per_stream:
                self.refused += 1
                raise TooManyRequestsError(
                    f"stream {stream_id!r} already has {mine} {kind}s open, its maximum "
                    f"(serve.max_readers_per_stream={self.per_stream}); {what} refused. Fix: share one reader, or "
                    "retry after the Retry-After seconds."
                )
            self._open += 1
            self._by_stream[key] = mine + 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._open -= 1
                left = self._by_stream.get(key, 1) - 1
                if left:
                    self._by_stream[key] = left
                else:
                    self._by_stream.pop(key, None)

        return release

    def counts(self) -> dict[str, int]:
        """Open long-lived requests, streams with any, and refusals so far."""
        with self._lock:
            return {"open": self._open, "streams": len(self._by_stream), "refused": self.refused}


class GatedStreamingResponse(StreamingResponse):
    """A streaming response that gives its :class:`LongLivedGate` slot back however it ends (finished, client gone,
    error): the release runs when the ASGI call returns."""

    def __init__(self, content: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class PushDecoder:
    """Decodes pushed frame batches off the event loop, within a per-stream budget of pixels in flight.

    Args:
        limits: the per-push limits (bytes, frames, side, pixels).
        stream_pixels: most pixels of one stream's pushes decoded or being handed over at once.
        threads: decoding threads (the replica-wide bound: ``threads x limits.max_pixels`` pixels decoding at once).
    """

    def __init__(self, limits: FrameLimits, stream_pixels: int, threads: int = 2) -> None:
        self.limits, self.stream_pixels = limits, stream_pixels
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stc-decode")
        self._inflight: dict[str, int] = {}
        self._lock = threading.Lock()

    async def push(self, stream_id: str, body: bytes, deliver: Callable[[FrameBatch], Awaitable[Any]]) -> Any:
        """Decode ``body`` on the pool (admitted against the stream's budget first), then ``await deliver(batch)``;
        the stream's pixels are released once delivered (or refused)."""
        held = [0]

        def admit(pixels: int) -> None:
            with self._lock:
                now = self._inflight.get(stream_id, 0)
                if now and now + pixels > self.stream_pixels:
                    raise TooManyRequestsError(
                        f"stream {stream_id!r} has {now:,} pixels of pushes being decoded; {pixels:,} more would pass "
                        f"its limit of {self.stream_pixels:,} (serve.max_stream_push_pixels). Fix: push one batch at "
                        "a time, or retry after the Retry-After seconds."
                    )
                self._inflight[stream_id] = now + pixels
                held[0] = pixels

        loop = asyncio.get_running_loop()
        try:
            batch = await loop.run_in_executor(self._pool, decode_frames, body, self.limits, admit)
            del body
            return await deliver(batch)
        finally:
            if held[0]:
                with self._lock:
                    left = self._inflight.get(stream_id, 0) - held[0]
                    if left > 0:
                        self._inflight[stream_id] = left
                    else:
                        self._inflight.pop(stream_id, None)
                if held[0] >= TRIM_AFTER_PIXELS:
                    loop.run_in_executor(self._pool, trim_heap)  # not awaited: the answer need not wait for it

    def inflight(self) -> int:
        """Pixels of pushes being decoded or delivered now (all streams)."""
        with self._lock:
            return sum(self._inflight.values())
