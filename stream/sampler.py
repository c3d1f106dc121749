"""Which frames reach the model: keep a target rate by timestamp, then group the kept frames into chunks.

* :func:`select_by_timestamp` -- the rule, as a pure function on an array of timestamps (the reference).
* :class:`FpsSampler` -- the same rule applied frame by frame, state kept between calls (live streams).
* :class:`Chunker` -- kept frames -> :class:`FrameBatch` es of ``frames_per_chunk`` frames.
* :class:`FrameChunker` -- both, one frame at a time: the sample -> chunk step every stream runs.

The rule: the first frame is kept; a later frame is kept when its pts is at least ``1 / fps`` after the last
kept frame's. So two kept frames are never closer than ``1 / fps`` (up to ``PTS_TOLERANCE_S`` of float
rounding), whatever the source's rate, jitter or gaps, and the output rate never exceeds ``fps``. When the source
rate is not a multiple of ``fps`` the output is slower (10 fps -> 3 fps keeps every 4th frame: 2.5 fps), which is
the price of the minimum spacing. A pts earlier than the last kept one by ``1 / fps`` or more is a restart (a
reconnect, a new segment): that frame is kept and starts a new timeline.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from stream.config import SamplerConfig
from stream.errors import ConfigError
from stream.frames import Frame, FrameBatch

# Timestamps closer than this to the spacing count as on it: 0.1 + 0.2 - 0.2 < 0.1 in floats.
PTS_TOLERANCE_S = 1e-6


def _check_fps(fps: float) -> float:
    if not np.isfinite(fps) or fps <= 0:
        raise ConfigError(f"target fps must be a finite number > 0, got {fps!r}. Fix: use e.g. fps=1.0.")
    return float(fps)


def select_by_timestamp(pts: np.ndarray, fps: float) -> np.ndarray:
    """Indices of the frames kept at ``fps`` (see the module docstring for the rule).

    Args:
        pts: ``[N]`` presentation times in seconds, in stream order (need not be monotonic).
        fps: target rate, > 0.

    Returns:
        ``[K]`` int64 indices into ``pts``, increasing.
    """
    fps = _check_fps(fps)
    pts = np.asarray(pts, dtype=np.float64).reshape(-1)  # [N]
    interval = 1.0 / fps
    kept: list[int] = []
    last = 0.0
    for i, t in enumerate(pts.tolist()):
        if not kept or t - last >= interval - PTS_TOLERANCE_S or t <= last - interval:
            kept.append(i)
            last = t
    return np.asarray(kept, dtype=np.int64)


class FpsSampler:
    """Keeps frames at ``target_fps`` by timestamp, one frame at a time (same rule as :func:`select_by_timestamp`).

    State: the last kept timestamp only (O(1) memory whatever the stream length). Counters ``seen``, ``kept``
    and ``restarts`` are for monitoring.
    """

    def __init__(self, target_fps: float) -> None:
        self.target_fps = _check_fps(target_fps)
        self._interval = 1.0 / self.target_fps
        self._last: float | None = None
        self.seen = 0
        self.kept = 0
        self.restarts = 0

    def keep(self, pts: float) -> bool:
        """Decide for the next frame's timestamp (seconds); ``True`` if it is kept."""
        self.seen += 1
        last = self._last
        if last is not None and pts - last < self._interval - PTS_TOLERANCE_S:
            if pts > last - self._interval:
                return False
            self.restarts += 1
        self._last = float(pts)
        self.kept += 1
        return True

    def accept(self, frame: Frame) -> bool:
        """Decide for ``frame``; ``True`` if it is kept."""
        return self.keep(frame.pts)

    def sample(self, frames: Iterable[Frame]) -> Iterator[Frame]:
        """The kept frames of ``frames``, lazily; state carries over between calls."""
        for frame in frames:
            if self.keep(frame.pts):
                yield frame

    def reset(self) -> None:
        """Forget the last kept timestamp: the next frame is kept (counters stay)."""
        self._last = None


class Chunker:
    """Groups frames into :class:`FrameBatch` es of ``frames_per_chunk`` frames.

    A chunk ends early when the frame size changes (a batch holds one size) or the pts goes backwards (a
    restart; a batch's pts are non-decreasing). Holds at most ``frames_per_chunk`` frames; call :meth:`flush` at
    the end of the stream for the last, partial chunk.
    """

    def __init__(self, frames_per_chunk: int) -> None:
        if not isinstance(frames_per_chunk, int) or frames_per_chunk < 1:
            raise ConfigError(
                f"frames_per_chunk must be an integer >= 1, got {frames_per_chunk!r}. Fix: use e.g. 8."
            )
        self.frames_per_chunk = frames_per_chunk
        self._frames: list[Frame] = []

    def __len__(self) -> int:
        """Frames waiting for their chunk to fill."""
        return len(self._frames)

    def push(self, frame: Frame) -> list[FrameBatch]:
        """Add one frame; returns the chunks it completed (none, one, or two on a size change with size 1)."""
        out: list[FrameBatch] = []
        if self._frames and self._breaks(frame):
            out.append(self._take())
        self._frames.append(frame)
        if len(self._frames) == self.frames_per_chunk:
            out.append(self._take())
        return out

    def flush(self) -> FrameBatch | None:
        """The partial chunk (``None`` if empty)."""
        return self._take() if self._frames else None

    def clear(self) -> None:
        """Drop the waiting frames (the stream ended without its last chunk)."""
        self._frames = []

    def chunks(self, frames: Iterable[Frame]) -> Iterator[FrameBatch]:
        """Every chunk of ``frames``, lazily, including the final partial one."""
        for frame in frames:
            yield from self.push(frame)
        last = self.flush()
        if last is not None:
            yield last

    def _breaks(self, frame: Frame) -> bool:
        previous = self._frames[-1]
        return frame.rgb.shape != previous.rgb.shape or frame.pts < previous.pts

    def _take(self) -> FrameBatch:
        batch = FrameBatch.from_frames(self._frames)
        self._frames = []
        return batch


class FrameChunker:
    """The one sample -> chunk step of every stream: frames in, full chunks out (fps sampler, then chunker).

    ``push`` decides one frame (sampled or skipped) and returns the chunks it completed; ``flush`` gives the partial
    chunk. The sampler's state carries over a ``flush``, so a stream fed in segments (up to each question) samples
    exactly as if fed at once. The ingest worker, the in-process pipeline and :func:`sample_and_chunk` all use it.

    Args:
        fps: target frames per second (:class:`FpsSampler`).
        frames_per_chunk: frames per chunk (:class:`Chunker`).
    """

    def __init__(self, fps: float, frames_per_chunk: int) -> None:
        self.sampler = FpsSampler(fps)
        self.chunker = Chunker(frames_per_chunk)
        self.sampled = 0

    @classmethod
    def of(cls, config: SamplerConfig) -> "FrameChunker":
        return cls(config.fps, config.frames_per_chunk)

    def __len__(self) -> int:
        """Frames waiting for their chunk to fill."""
        return len(self.chunker)

    def push(self, frame: Frame) -> list[FrameBatch]:
        """Decide ``frame``; returns the chunks it completed (usually none)."""
        if not self.sampler.accept(frame):
            return []
        self.sampled += 1
        return self.chunker.push(frame)

    def flush(self) -> FrameBatch | None:
        """The partial chunk (``None`` if empty)."""
        return self.chunker.flush()

    def clear(self) -> None:
        """Drop the frames waiting for their chunk (a closed stream)."""
        self.chunker.clear()

    def chunks(self, frames: Iterable[Frame], flush: bool = True) -> Iterator[FrameBatch]:
        """Every chunk of ``frames``, lazily; with ``flush`` the partial one at the end too."""
        for frame in frames:
            yield from self.push(frame)
        last = self.flush() if flush else None
        if last is not None:
            yield last


def sample_and_chunk(frames: Iterable[Frame], config: SamplerConfig) -> Iterator[FrameBatch]:
    """``frames`` sampled at ``config.fps`` and chunked by ``config.frames_per_chunk`` (last chunk may be short)."""
    return FrameChunker.of(config).chunks(frames)
