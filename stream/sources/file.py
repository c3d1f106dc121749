"""Video files: probed with PyAV (safe on broken input), decoded lazily in small batches with decord."""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from pathlib import Path

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

    ``pts`` comes from decord's ``get_frame_timestamp`` (seconds); where decord has none (it reports garbage for
    some Matroska files) the packet times read by PyAV are used. ``index`` is the frame's position in the file.
    The file is probed with PyAV first so that broken input raises :class:`SourceFormatError` instead of reaching
    decord; a file whose data ends well before its header says (cut short) is refused the same way.
    Memory: ``batch_size`` decoded frames plus 8 bytes of timestamps per frame of the file.

    Args:
        path: the video file.
        batch_size: frames decoded per decord call (memory: ``batch_size * H * W * 3`` bytes).
        num_threads: decord decoder threads (0 = FFmpeg's choice).

    Raises:
        SourceNotFoundError: ``path`` does not exist.
        SourceFormatError: not a video, no video stream, truncated, or a frame fails to decode while reading.
    """

    def __init__(self, path: str | Path, batch_size: int = 8, num_threads: int = 1) -> None:
        path = Path(path)
        if not path.exists():
            raise SourceNotFoundError(f"video file {path} does not exist. Fix: check the path (cwd is {Path.cwd()}).")
        if not path.is_file():
            raise SourceFormatError(f"{path} is not a regular file. Fix: pass the path of one video file.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        probe = probe_file(path)
        self._reader = _open_decord(path, num_threads)
        self._times = _frame_times(self._reader, path, probe.info.fps)  # [N, 2] float32 (start, end) seconds
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
        try:
            rgb = self._reader.get_batch(indices).asnumpy()  # [b, H, W, 3] uint8
        except (RuntimeError, decord.DECORDError) as exc:
            raise SourceFormatError(
                f"{self._path}: frames {indices[0]}..{indices[-1]} fail to decode ({_first_line(exc)}). "
                "The file is damaged or cut short. Fix: re-encode or re-download it."
            ) from None
        self._next_index = indices[-1] + 1
        pts = _as_seconds(self._times[indices[0] : indices[-1] + 1, 0])
        # copies: a view would keep the whole batch alive while a sampler holds one frame of it
        return [Frame(rgb=rgb[k].copy(), pts=float(pts[k]), index=i) for k, i in enumerate(indices)]

    def _release(self) -> None:
        self._pending.clear()
        self._reader = None  # decord frees the decoder when the reader is collected


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
