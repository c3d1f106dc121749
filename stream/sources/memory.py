"""Frames pushed in by the caller (:class:`MemorySource`) and a read-ahead thread for live sources
(:class:`BufferedSource`), both over one bounded, thread-safe queue."""
from __future__ import annotations

import collections
import threading
import time
from typing import Literal

from stream.errors import SourceError, SourceTimeoutError
from stream.frames import Frame, FrameBatch
from stream.sources.base import FrameSource, SourceInfo

Overflow = Literal["drop_oldest", "block"]
_POLICIES = ("drop_oldest", "block")


class MemorySource(FrameSource):
    """A live source fed by :meth:`push` / :meth:`push_batch`, finished by :meth:`end`.

    Iterating blocks until a frame is pushed or the source ends. The queue holds at most ``max_queue`` frames; when
    it is full, ``overflow="drop_oldest"`` discards the oldest queued frame (counted in :attr:`dropped`) so the
    consumer stays near real time, and ``overflow="block"`` makes :meth:`push` wait for room. Thread-safe for one
    consumer and any number of producers.

    Args:
        max_queue: queue bound in frames (>= 1).
        overflow: ``"drop_oldest"`` or ``"block"``.
        read_timeout_s: if set, iteration raises :class:`SourceTimeoutError` after this long without a frame.
        info: what the producer knows about the stream (default: a live stream of unknown size).
    """

    def __init__(
        self,
        max_queue: int = 64,
        overflow: Overflow = "drop_oldest",
        read_timeout_s: float | None = None,
        info: SourceInfo | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 frame, got {max_queue}")
        if overflow not in _POLICIES:
            raise ValueError(f"overflow must be one of {_POLICIES}, got {overflow!r}")
        if read_timeout_s is not None and read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be > 0 seconds or None (wait forever), got {read_timeout_s}")
        super().__init__(info or SourceInfo(uri="memory://", is_live=True))
        self.max_queue = max_queue
        self.overflow: Overflow = overflow
        self.read_timeout_s = read_timeout_s
        self.pushed = 0
        self.dropped = 0
        self._queue: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None

    def push(self, frame: Frame, timeout_s: float | None = None) -> None:
        """Queue one frame (see the overflow policy).

        Raises:
            TypeError: ``frame`` is not a :class:`Frame`.
            SourceError: the source already ended or was closed.
            SourceTimeoutError: ``overflow="block"`` and no room came within ``timeout_s``.
        """
        if not isinstance(frame, Frame):
            raise TypeError(
                f"push() takes a stream.frames.Frame, got {type(frame).__name__}; use push_batch() for batches"
            )
        with self._cond:
            self._check_open()
            if len(self._queue) >= self.max_queue:
                if self.overflow == "drop_oldest":
                    self._queue.popleft()
                    self.dropped += 1
                else:
                    self._wait_for_room(timeout_s)
            self._queue.append(frame)
            self.pushed += 1
            self._cond.notify_all()

    def push_batch(self, batch: FrameBatch, timeout_s: float | None = None) -> None:
        """Queue every frame of ``batch`` in order (same rules as :meth:`push`, ``timeout_s`` per frame)."""
        if not isinstance(batch, FrameBatch):
            raise TypeError(f"push_batch() takes a stream.frames.FrameBatch, got {type(batch).__name__}")
        for frame in batch:
            self.push(frame, timeout_s)

    def end(self, error: BaseException | None = None) -> None:
        """Finish the stream: the consumer gets the queued frames, then the end (or ``error`` raised)."""
        with self._cond:
            self._ended = True
            self._error = error
            self._cond.notify_all()

    @property
    def ended(self) -> bool:
        """``True`` once :meth:`end` was called."""
        return self._ended

    def qsize(self) -> int:
        """Frames waiting in the queue."""
        with self._cond:
            return len(self._queue)

    def stats(self) -> dict[str, int]:
        """Counters for monitoring: frames read, pushed, dropped, queued."""
        return {"frames_read": self.frames_read, "pushed": self.pushed, "dropped": self.dropped, "queued": self.qsize()}

    def _check_open(self) -> None:
        if self.closed:
            raise SourceError("push() on a closed MemorySource. Fix: create a new source for a new stream.")
        if self._ended:
            raise SourceError("push() after end() on a MemorySource. Fix: push all frames before calling end().")

    def _wait_for_room(self, timeout_s: float | None) -> None:
        """Wait (lock held) until the queue has room; raise if the source closes or ``timeout_s`` passes."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(self._queue) >= self.max_queue:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise SourceTimeoutError(
                    f"push() waited {timeout_s}s for room in a full queue of {self.max_queue} frames "
                    "(overflow='block'). Fix: consume faster, raise queue_size, or use overflow='drop_oldest'."
                )
            self._cond.wait(left)
            self._check_open()

    def _read(self) -> Frame | None:
        deadline = None if self.read_timeout_s is None else time.monotonic() + self.read_timeout_s
        with self._cond:
            while not self._queue:
                if self.closed:
                    return None
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SourceTimeoutError(
                        f"no frame pushed to {self.info.uri} within read_timeout_s={self.read_timeout_s}. "
                        "Fix: check the producer, or raise the timeout."
                    )
                self._cond.wait(left)
            frame = self._queue.popleft()
            self._cond.notify_all()
            return frame

    def _release(self) -> None:
        with self._cond:
            self._queue.clear()
            self._cond.notify_all()


class BufferedSource(FrameSource):
    """Reads another source in a background thread into a bounded :class:`MemorySource` queue.

    For live streams: the decoder keeps pace with the camera even when the consumer is slow, and with
    ``overflow="drop_oldest"`` the consumer always sees the most recent ``max_queue`` frames. Errors of the inner
    source reach the consumer after the frames queued before them. :meth:`close` stops the thread (it exits after
    its current read, at the latest after the inner source's read timeout) and closes the inner source.
    """

    def __init__(self, inner: FrameSource, max_queue: int = 64, overflow: Overflow = "drop_oldest") -> None:
        super().__init__(inner.info)
        self.inner = inner
        self._queue = MemorySource(max_queue=max_queue, overflow=overflow, info=inner.info)
        self._thread = threading.Thread(target=self._pump, name=f"read {inner.info.uri}", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Frames discarded because the consumer fell more than ``max_queue`` frames behind."""
        return self._queue.dropped

    def stats(self) -> dict[str, int]:
        """The inner source's counters plus this buffer's ``dropped`` and ``queued``."""
        inner = self.inner.stats() if hasattr(self.inner, "stats") else {}
        return {**inner, "frames_read": self.frames_read, "dropped": self.dropped, "queued": self._queue.qsize()}

    def _pump(self) -> None:
        try:
            for frame in self.inner:
                if self.closed:
                    break
                self._queue.push(frame)
            self._queue.end()
        except SourceError as exc:
            if not self.closed:
                self._queue.end(error=exc)
        except Exception as exc:  # a decoder bug must reach the consumer, not die silently in the thread
            self._queue.end(error=exc)
        finally:
            self.inner.close()

    def _read(self) -> Frame | None:
        return next(self._queue, None)

    def _release(self) -> None:
        self._queue.close()
        self.inner.interrupt()
        self._thread.join(timeout=1.0)
