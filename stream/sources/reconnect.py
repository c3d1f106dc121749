"""Reopen a live source after a disconnect, with exponential backoff."""
from __future__ import annotations

import time
from typing import Callable

from stream.errors import SourceError
from stream.frames import Frame
from stream.sources.base import FrameSource


class ReconnectingSource(FrameSource):
    """Wraps a live source; when it breaks (a :class:`SourceError` while reading, or the end of a *live* stream),
    reopens it with ``factory`` after ``backoff_s``, ``2 * backoff_s``, ... (capped at ``backoff_max_s``), at most
    ``attempts`` times per outage. The first open is not retried: a dead URL fails at once.

    Frames keep one timeline across reconnects: ``index`` continues, and ``pts`` continues from the last frame
    plus the wall-clock time the outage lasted (at least one frame interval), so timestamps stay increasing.

    Counters: :attr:`reconnects` (successful reopenings) and :attr:`reconnect_attempts` (tries, failed or not).

    Args:
        factory: opens a fresh inner source (e.g. ``lambda: LiveSource(url, ...)``).
        attempts: reopen tries per outage before giving up (>= 0).
        backoff_s: wait before the first try; doubled after each failure.
        backoff_max_s: cap on a single wait.
        first: an already opened inner source (default: ``factory()`` now).

    Raises (while iterating):
        SourceError: the last attempt's error type (unreachable, timeout...) once every attempt failed; its
        message gives the number of attempts and the original cause.
    """

    def __init__(
        self,
        factory: Callable[[], FrameSource],
        attempts: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        first: FrameSource | None = None,
    ) -> None:
        if attempts < 0 or backoff_s <= 0 or backoff_max_s < backoff_s:
            raise ValueError(
                f"need attempts >= 0 and 0 < backoff_s <= backoff_max_s, got attempts={attempts}, "
                f"backoff_s={backoff_s}, backoff_max_s={backoff_max_s}"
            )
        self._factory = factory
        self._current = first if first is not None else factory()
        super().__init__(self._current.info)
        self.attempts, self.backoff_s, self.backoff_max_s = attempts, backoff_s, backoff_max_s
        self.reconnects = 0
        self.reconnect_attempts = 0
        self._pts_offset = 0.0
        self._index_offset = 0
        self._last: tuple[float, int, float] | None = None  # (pts, index, wall time) of the last frame out

    def stats(self) -> dict[str, int]:
        """Inner counters plus ``reconnects`` and ``reconnect_attempts``."""
        return {
            **self._current.stats(),
            "frames_read": self.frames_read,
            "reconnects": self.reconnects,
            "reconnect_attempts": self.reconnect_attempts,
        }

    def _read(self) -> Frame | None:
        while not self._stop.is_set():
            try:
                frame = next(self._current, None)
                cause: SourceError | None = None
            except SourceError as exc:
                frame, cause = None, exc
            if frame is not None:
                return self._shift(frame)
            if cause is None and not self._current.is_live:
                return None  # a finite stream really ended
            if not self._reopen(cause):
                return None
        return None

    def _shift(self, frame: Frame) -> Frame:
        out = Frame(rgb=frame.rgb, pts=frame.pts + self._pts_offset, index=frame.index + self._index_offset)
        self._last = (out.pts, out.index, time.monotonic())
        return out

    def _reopen(self, cause: SourceError | None) -> bool:
        """Reopen after an outage; ``False`` if interrupted. Raises once every attempt failed."""
        self._current.close()
        why = str(cause) if cause is not None else "the stream ended"
        wait, last_error = self.backoff_s, cause
        for _ in range(self.attempts):
            if self._stop.wait(wait):
                return False
            self.reconnect_attempts += 1
            try:
                fresh = self._factory()
            except SourceError as exc:
                last_error, wait = exc, min(2 * wait, self.backoff_max_s)
                continue
            self._continue_timeline(fresh)
            self._current = fresh
            self.reconnects += 1
            return True
        kind = type(last_error) if last_error is not None else SourceError
        raise kind(
            f"{self.info.uri}: stream lost ({why}); gave up after {self.attempts} reconnect attempts"
            f"{f' (last error: {last_error})' if last_error is not cause else ''}. "
            "Fix: check the camera/server, or raise reconnect_attempts / reconnect_backoff_max_s."
        ) from last_error

    def _continue_timeline(self, fresh: FrameSource) -> None:
        if self._last is None:
            return
        pts, index, wall = self._last
        step = 1.0 / fresh.info.fps if fresh.info.fps else 0.0
        self._pts_offset = pts + max(step, time.monotonic() - wall)
        self._index_offset = index + 1

    def _release(self) -> None:
        self._current.close()
