"""Video files: probed with PyAV (safe on broken input), decoded lazily in small batches.

Two decoders behind one :class:`FileSource`: PyAV (default: sequential decode, flat memory) or decord
(``decoder="decord"``). decord's native buffers grew a long-running ingest host: in one process, 2 concurrent
file streams of vtest.avi (768x576) churned for 2 minutes held 0.8-2.0 GB RSS with decord and 0.51-0.57 GB with
PyAV (0.48 GB of it the process itself); Python-visible memory was ~60 MB in both, so the rest is decord's.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import decord
import numpy as np

from stream.errors import SourceFormatError, SourceNotFoundError
from stream.frames import Frame
from stream.sources.base import FrameSource, SourceInfo

# Packets PyAV may read while looking for the first decodable frame before the file counts as broken.
_PROBE_MAX_PACKETS = 256
_MAX_PLAUSIBLE_S = 1e7
_decord_quiet = False


@dataclass(frozen=True)
class Probe:
    """What PyAV learnt about a file before decord touches it.

    Attributes:
        info: size, fps, codec, duration as far as the header tells.
        declared_end_s: where the header says the video track ends (seconds; 0 when it does not say).
    """

    info: SourceInfo
    declared_end_s: float


def probe_file(path: Path) -> Probe:
    """Check with PyAV that ``path`` is a video with a decodable first frame.

    Raises:
        SourceFormatError: not a media file, no video stream, or no frame decodes.
    """
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise SourceFormatError(
            f"{path} is not a readable video ({type(exc).__name__}: {exc}). "
            "Fix: pass a video file (mp4, mkv, avi, webm, mov...) that plays in ffplay/VLC."
        ) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise SourceFormatError(
                f"{path} has no video stream (streams found: {', '.join(kinds)}). Fix: pass a file with video."
            )
        stream = container.streams.video[0]
        first = _first_frame(container, stream, path)
        rate = stream.average_rate or stream.guessed_rate
        info = SourceInfo(
            uri=str(path),
            fps=float(rate) if rate else None,
            width=first.width,
            height=first.height,
            num_frames=int(stream.frames) or None,
            codec=stream.codec_context.name,
        )
        return Probe(info=info, declared_end_s=_declared_end(stream))


def _declared_end(stream: av.VideoStream) -> float:
    """End of the video track per the header: its duration, or its frame count over the average rate (AVI keeps
    the count in time-base units, MP4 in samples; both give seconds this way). The container's duration is not
    used: an audio track may be longer than the video."""
    ends = [0.0]
    if stream.duration and stream.time_base:
        ends.append(float(stream.duration * stream.time_base))
    if stream.frames and stream.average_rate:
        ends.append(float(stream.frames / stream.average_rate))
    return max(ends)


def _first_frame(container: av.container.InputContainer, stream: av.VideoStream, path: Path) -> av.VideoFrame:
    """Decode frames until the first one comes out, reading at most ``_PROBE_MAX_PACKETS`` packets."""
    try:
        for n, packet in enumerate(container.demux(stream)):
            for frame in packet.decode():
                return frame
            if n >= _PROBE_MAX_PACKETS:
                break
    except (av.error.FFmpegError, OSError) as exc:
        raise SourceFormatError(
            f"{path}: the video stream does not decode ({type(exc).__name__}: {exc}). "
            "Fix: re-encode it, e.g. `ffmpeg -i in -c:v libx264 out.mp4`."
        ) from None
    raise SourceFormatError(
        f"{path}: no video frame decodes in the first {_PROBE_MAX_PACKETS} packets (empty, truncated or unsupported "
        f"codec {stream.codec_context.name!r}). Fix: re-encode it, e.g. `ffmpeg -i in -c:v libx264 out.mp4`."
    )


class FileSource(FrameSource):
    """Frames of a video file, decoded ``batch_size`` at a time (never the whole file in memory).

    ``pts`` are the packets' presentation times read by PyAV, sorted (decoder ``"decord"``: decord's
    ``get_frame_timestamp``, falling back to the packet times where decord has none, e.g. some Matroska files).
    ``index`` is the frame's position in the file. The decoder ends where FFmpeg's does (box.mp4: 455 frames of 456
    packets). The file is probed with PyAV first so that broken input raises :class:`SourceFormatError`; a file whose
    data ends well before its header says (cut short) is refused the same way.
    Memory: ``batch_size`` decoded frames plus 8 bytes of timestamps per frame of the file.

    Args:
        path: the video file.
        batch_size: frames decoded per refill of the pending queue (memory: ``batch_size * H * W * 3`` bytes).
        num_threads: decoder threads (0 = FFmpeg's choice).
        decoder: ``"pyav"`` (default; flat memory) or ``"decord"``.

    Raises:
        SourceNotFoundError: ``path`` does not exist.
        SourceFormatError: not a video, no video stream, truncated, or a frame fails to decode while reading.
    """

    def __init__(self, path: str | Path, batch_size: int = 8, num_threads: int = 1,
                 decoder: Literal["pyav", "decord"] = "pyav") -> None:
        path = Path(path)
        if not path.exists():
            raise SourceNotFoundError(f"video file {path} does not exist. Fix: check the path (cwd is {Path.cwd()}).")
        if not path.is_file():
            raise SourceFormatError(f"{path} is not a regular file. Fix: pass the path of one video file.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if decoder not in ("pyav", "decord"):
            raise ValueError(f"decoder must be 'pyav' or 'decord', got {decoder!r}")
        probe = probe_file(path)
        if decoder == "decord":
            self._reader: _PyAvReader | decord.VideoReader | None = _open_decord(path, num_threads)
            self._times = _frame_times(self._reader, path, probe.info.fps)  # [N, 2] float32 (start, end) seconds
        else:
            self._reader = _PyAvReader(path, num_threads)
            self._times = _frame_times_pyav(path, probe.info.fps)
        end = _as_seconds(self._times[-1:, 1])[0]
        _check_complete(path, end, probe.declared_end_s, probe.info.fps)
        info = SourceInfo(
            **{**probe.info.__dict__, "num_frames": len(self._times), "duration_s": end, "is_live": False}
        )
        super().__init__(info)
        self._path = path
        self._batch_size = batch_size
        self._next_index = 0
        self._pending: collections.deque[Frame] = collections.deque()

    def _read(self) -> Frame | None:
        if not self._pending:
            self._pending.extend(self._decode_batch())
        return self._pending.popleft() if self._pending else None

    def _decode_batch(self) -> list[Frame]:
        start, count = self._next_index, len(self._times)
        if start >= count:
            return []
        indices = list(range(start, min(start + self._batch_size, count)))
        rgb: list[np.ndarray] = []  # b x [H, W, 3] uint8
        try:
            # sequential next(): decord's get_batch seeks per call, and its FFmpeg buffers grew RSS 60-170 MB per
            # pass over vtest.avi; next() stays flat
            for _ in indices:
                rgb.append(self._reader.next().asnumpy())
        except StopIteration:  # PyAV: the decoder gave fewer frames than packets (box.mp4: 455 of 456)
            self._times = self._times[: start + len(rgb)]
        except (RuntimeError, decord.DECORDError, av.error.FFmpegError) as exc:
            raise SourceFormatError(
                f"{self._path}: frames {indices[0]}..{indices[-1]} fail to decode ({_first_line(exc)}). "
                "The file is damaged or cut short. Fix: re-encode or re-download it."
            ) from None
        indices = indices[: len(rgb)]
        if not indices:
            return []
        self._next_index = indices[-1] + 1
        pts = _as_seconds(self._times[indices[0] : indices[-1] + 1, 0])
        return [Frame(rgb=rgb[k], pts=float(pts[k]), index=i) for k, i in enumerate(indices)]

    def _release(self) -> None:
        self._pending.clear()
        if isinstance(self._reader, _PyAvReader):
            self._reader.close()
        self._reader = None  # decord frees the decoder when the reader is collected


class _PyAvReader:
    """Sequential PyAV decode with decord's ``next().asnumpy()`` shape: one ``[H, W, 3]`` uint8 frame per call."""

    def __init__(self, path: Path, num_threads: int) -> None:
        self._container = av.open(str(path))
        stream = self._container.streams.video[0]
        stream.thread_count = num_threads
        self._frames = self._container.decode(stream)

    def next(self) -> "_PyAvReader":
        frame = next(self._frames, None)
        if frame is None:
            raise StopIteration("the file ended before its frame count")
        self._rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
        return self

    def asnumpy(self) -> np.ndarray:
        return self._rgb

    def close(self) -> None:
        self._container.close()


def _first_line(exc: BaseException) -> str:
    """decord's message without its ``[time] /source/file.cc:N:`` prefixes, one line, at most 200 characters."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"\[[0-9:]+\] \S+\.cc:\d+: ", "", lines[-1] if lines else "")
    return text[:200] or type(exc).__name__


def _open_decord(path: Path, num_threads: int) -> decord.VideoReader:
    global _decord_quiet
    if not _decord_quiet:  # decord's FFmpeg prints every recoverable slice error; errors reach us as exceptions
        decord.logging.set_level(decord.logging.QUIET)
        _decord_quiet = True
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
    except (RuntimeError, decord.DECORDError) as exc:
        raise SourceFormatError(
            f"{path}: decord cannot open it ({_first_line(exc)}). "
            "Fix: re-encode it, e.g. `ffmpeg -i in -c:v libx264 out.mp4`."
        ) from None
    if len(reader) == 0:
        raise SourceFormatError(f"{path} holds no video frames. Fix: pass a non-empty video.")
    return reader


def _plausible(starts: np.ndarray) -> bool:
    """Finite, non-decreasing, starting near 0 and below ~100 days (decord reports ~9.2e15 when it has none)."""
    return bool(
        np.all(np.isfinite(starts))
        and starts[0] > -1.0
        and starts[-1] < _MAX_PLAUSIBLE_S
        and np.all(np.diff(starts) >= 0)
    )


def _frame_times(reader: decord.VideoReader, path: Path, fps: float | None) -> np.ndarray:
    """``[N, 2]`` float32 (start, end) seconds per frame: decord's, else PyAV packet times, else ``index / fps``."""
    count = len(reader)
    times = np.asarray(reader.get_frame_timestamp(list(range(count))), dtype=np.float32)  # [N, 2]
    if _plausible(times[:, 0]):
        return times
    starts = _packet_times(path)
    if starts is None or len(starts) != count or not _plausible(starts):
        if not fps:
            raise SourceFormatError(
                f"{path}: frames carry no usable timestamps and the frame rate is unknown. "
                "Fix: remux it, e.g. `ffmpeg -i in -c copy out.mp4`."
            )
        starts = np.arange(count, dtype=np.float64) / fps
    step = float(np.median(np.diff(starts))) if count > 1 else (1.0 / fps if fps else 0.0)
    ends = np.append(starts[1:], starts[-1] + step)
    return np.stack([starts, ends], axis=1).astype(np.float32)


def _frame_times_pyav(path: Path, fps: float | None) -> np.ndarray:
    """``[N, 2]`` float32 (start, end) seconds per frame from the packet times (demuxed, not decoded), else
    ``index / fps``. Packet times sorted by presentation are the frames' times in display order."""
    starts = _packet_times(path)
    if starts is None or not _plausible(starts):
        raise SourceFormatError(
            f"{path}: frames carry no usable timestamps. Fix: remux it, e.g. `ffmpeg -i in -c copy out.mp4`."
        )
    starts = starts - min(0.0, float(starts[0]))
    count = len(starts)
    step = float(np.median(np.diff(starts))) if count > 1 else (1.0 / fps if fps else 0.0)
    ends = np.append(starts[1:], starts[-1] + step)
    return np.stack([starts, ends], axis=1).astype(np.float32)


def _packet_times(path: Path) -> np.ndarray | None:
    """Sorted presentation times (seconds) of the video packets, read without decoding; ``None`` if unreadable."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            pts = [p.pts * p.time_base for p in container.demux(stream) if p.pts is not None and p.size]
    except (av.error.FFmpegError, OSError):
        return None
    return np.sort(np.array([float(t) for t in pts], dtype=np.float64)) if pts else None


def _as_seconds(times: np.ndarray) -> np.ndarray:
    """float32 seconds -> float64 via their shortest decimal form (decord's 79.4 stays 79.4, not 79.4000015)."""
    return np.asarray(times, dtype=np.float32).astype(str).astype(np.float64)


def _check_complete(path: Path, present_end_s: float, declared_end_s: float, fps: float | None) -> None:
    """Refuse a file whose data ends well before its header says (a download or copy cut short).

    Slack: 3 frame intervals, 2% of the declared length, or 0.25 s, whichever is largest (edit lists, B-frame
    delay and rounding never come near it; half a file does)."""
    slack = max(3.0 / fps if fps else 0.0, 0.02 * declared_end_s, 0.25)
    if declared_end_s - present_end_s > slack:
        raise SourceFormatError(
            f"{path} is truncated or damaged: its header says the video lasts {declared_end_s:.2f}s but its frames end at "
            f"{present_end_s:.2f}s. Fix: re-download or re-copy the complete file."
        )
