"""The one interface every frame source implements: an iterator of :class:`stream.frames.Frame`."""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from typing import Iterator

from stream.frames import Frame


@dataclass(frozen=True)
class SourceInfo:
    """What is known about a source when it opens (``None`` = unknown, e.g. a live stream's duration).

    Attributes:
        uri: the path or URL the source reads.
        fps: nominal frame rate (frames per second).
        width, height: frame size in pixels.
        duration_s: length in seconds (files only).
        num_frames: number of frames (files only).
        codec: decoder name, e.g. ``"h264"``.
        is_live: ``True`` for a stream without an end (camera, RTSP, pushed frames).
    """

    uri: str
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    num_frames: int | None = None
    codec: str | None = None
    is_live: bool = False


class FrameSource(abc.ABC):
    """An iterator of frames with ``close()`` and context-manager support.

    Single pass, single consumer: ``for frame in source`` yields frames in stream order until the source ends; it
    raises a :class:`stream.errors.SourceError` subclass when the source breaks. After :meth:`close` the iteration
    stops. Subclasses implement :meth:`_read` (next frame or ``None`` at the end) and :meth:`_release`.
    """

    def __init__(self, info: SourceInfo) -> None:
        self._info = info
        self._closed = threading.Event()
        self._stop = threading.Event()  # set by interrupt() and close(): blocking waits give up early
        self.frames_read = 0

    @property
    def info(self) -> SourceInfo:
        """What is known about the stream (fps, size, duration...)."""
        return self._info

    @property
    def is_live(self) -> bool:
        """``True`` if the source has no natural end (camera, RTSP, pushed frames)."""
        return self._info.is_live

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` was called."""
        return self._closed.is_set()

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        if self.closed:
            raise StopIteration
        frame = self._read()
        if frame is None:
            raise StopIteration
        self.frames_read += 1
        return frame

    def stats(self) -> dict[str, int]:
        """Counters for monitoring (subclasses add theirs: ``dropped``, ``reconnects``...)."""
        return {"frames_read": self.frames_read}

    def interrupt(self) -> None:
        """Ask a read blocked in another thread to give up soon (backoff waits end now; a network read ends at
        its read timeout at the latest). Frees nothing: the reading thread still calls :meth:`close`."""
        self._stop.set()

    def close(self) -> None:
        """Release the decoder/connection; idempotent. Call it from the reading thread (or when no read runs)."""
        if not self._closed.is_set():
            self._closed.set()
            self._stop.set()
            self._release()

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"{type(self).__name__}({self._info.uri!r}, {state}, frames_read={self.frames_read})"

    @abc.abstractmethod
    def _read(self) -> Frame | None:
        """Next frame, or ``None`` at the end of the stream."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free resources (called once by :meth:`close`)."""
