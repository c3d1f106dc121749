"""Network streams (RTSP, HTTP(S), HLS) decoded with PyAV, with explicit open/read timeouts."""
from __future__ import annotations

import time
import urllib.parse
from typing import Iterator

import av

from stream.errors import (
    SourceError,
    SourceFormatError,
    SourceNotFoundError,
    SourceTimeoutError,
    SourceUnreachableError,
)
from stream.frames import Frame
from stream.sources.base import FrameSource, SourceInfo

LIVE_SCHEMES = ("rtsp", "rtsps", "http", "https")
# An FFmpeg error raised after this share of the timeout was spent is the timeout cutting the call short
# (FFmpeg's RTSP demuxer reports an interrupted read as "invalid data").
_TIMEOUT_SHARE = 0.9


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def map_av_error(exc: Exception, url: str, action: str, elapsed_s: float, timeout_s: float) -> SourceError:
    """Translate a PyAV/FFmpeg error into the matching typed :class:`SourceError` (message: what, why, fix)."""
    shown = redact(url)
    detail = f"{type(exc).__name__}: {exc}".replace(url, shown)
    if isinstance(exc, (av.error.ExitError, TimeoutError)) or elapsed_s >= _TIMEOUT_SHARE * timeout_s:
        return SourceTimeoutError(
            f"{shown}: no answer within {timeout_s:g}s while {action} ({detail}). "
            "Fix: check that the camera/server is up and streaming, or raise open_timeout_s/read_timeout_s."
        )
    if isinstance(exc, av.error.HTTPNotFoundError):
        return SourceNotFoundError(f"{shown}: the server has no such stream ({detail}). Fix: check the URL's path.")
    if isinstance(exc, (av.error.HTTPUnauthorizedError, av.error.HTTPForbiddenError)):
        return SourceUnreachableError(
            f"{shown}: access denied ({detail}). Fix: put valid credentials in the URL (rtsp://user:pass@host/...)."
        )
    if isinstance(exc, av.error.InvalidDataError):
        return SourceFormatError(f"{shown}: the stream is not decodable video ({detail}). Fix: check the URL.")
    return SourceUnreachableError(
        f"{shown}: cannot reach the stream while {action} ({detail}). "
        "Fix: check host, port and network; for RTSP behind a firewall try rtsp_transport='tcp'."
    )


class LiveSource(FrameSource):
    """Frames of a network stream (``rtsp://``, ``http(s)://``, HLS ``.m3u8``) decoded with PyAV.

    ``pts`` is read from the stream's time base and starts at 0 with the first frame; ``index`` counts decoded
    frames. Packets that fail to decode (lost UDP packets) are skipped and counted in ``decode_errors``. The source
    is live (:attr:`is_live`) unless the server announces a duration (a file served over HTTP).

    Args:
        url: stream URL (credentials in it are redacted from every message).
        open_timeout_s: seconds allowed to connect and read the stream header.
        read_timeout_s: seconds the stream may stay silent before a read fails.
        rtsp_transport: ``"tcp"`` or ``"udp"`` (RTSP only).
        options: extra FFmpeg demuxer options (strings), merged over the defaults.

    Raises:
        SourceUnreachableError: refused, unresolvable, reset or access denied.
        SourceTimeoutError: no answer within the open/read timeout.
        SourceNotFoundError: the server answers 404.
        SourceFormatError: the stream has no decodable video.
    """

    def __init__(
        self,
        url: str,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        rtsp_transport: str = "tcp",
        options: dict[str, str] | None = None,
    ) -> None:
        if open_timeout_s <= 0 or read_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0 seconds, got open={open_timeout_s}, read={read_timeout_s}")
        if rtsp_transport not in ("tcp", "udp"):
            raise ValueError(f"rtsp_transport must be 'tcp' or 'udp', got {rtsp_transport!r}")
        self.url = url
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self._container = self._open(url, {**_default_options(url, rtsp_transport), **(options or {})})
        self._stream = self._video_stream()
        super().__init__(self._describe())
        self.decode_errors = 0
        self._frames = self._decode()
        self._first_pts: int | None = None
        self._last_pts_s = 0.0

    def stats(self) -> dict[str, int]:
        """Frames read and packets that failed to decode."""
        return {"frames_read": self.frames_read, "decode_errors": self.decode_errors}

    def _open(self, url: str, options: dict[str, str]) -> av.container.InputContainer:
        start = time.monotonic()
        try:
            return av.open(url, options=options, timeout=(self.open_timeout_s, self.read_timeout_s))
        except (av.error.FFmpegError, OSError) as exc:
            raise map_av_error(exc, url, "opening", time.monotonic() - start, self.open_timeout_s) from None

    def _video_stream(self) -> av.VideoStream:
        if not self._container.streams.video:
            kinds = sorted({s.type for s in self._container.streams}) or ["none"]
            self._container.close()
            raise SourceFormatError(
                f"{redact(self.url)} carries no video (streams: {', '.join(kinds)}). Fix: point at a video stream."
            )
        return self._container.streams.video[0]

    def _describe(self) -> SourceInfo:
        stream, container = self._stream, self._container
        rate = stream.average_rate or stream.guessed_rate
        duration = float(container.duration) / av.time_base if container.duration else None
        scheme = urllib.parse.urlsplit(self.url).scheme.lower()
        return SourceInfo(
            uri=redact(self.url),
            fps=float(rate) if rate else None,
            width=stream.codec_context.width or None,
            height=stream.codec_context.height or None,
            duration_s=duration,
            num_frames=int(stream.frames) or None,
            codec=stream.codec_context.name,
            is_live=scheme in ("rtsp", "rtsps") or duration is None,
        )

    def _decode(self) -> Iterator[av.VideoFrame]:
        for packet in self._container.demux(self._stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                self.decode_errors += 1
                continue
            yield from frames

    def _read(self) -> Frame | None:
        start = time.monotonic()
        try:
            frame = next(self._frames, None)
        except (av.error.FFmpegError, OSError) as exc:
            raise map_av_error(exc, self.url, "reading", time.monotonic() - start, self.read_timeout_s) from None
        if frame is None:
            return None
        rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
        return Frame(rgb=rgb, pts=self._seconds(frame), index=self.frames_read)

    def _seconds(self, frame: av.VideoFrame) -> float:
        """Frame time in seconds since the first frame; a frame without pts gets the previous one + 1/fps."""
        if frame.pts is None or frame.time_base is None:
            step = 1.0 / self.info.fps if self.info.fps else 0.0
            self._last_pts_s = self._last_pts_s + step if self.frames_read else 0.0
            return self._last_pts_s
        if self._first_pts is None:
            self._first_pts = frame.pts
        self._last_pts_s = float((frame.pts - self._first_pts) * frame.time_base)
        return self._last_pts_s

    def _release(self) -> None:
        self._frames.close()
        self._container.close()


def _default_options(url: str, rtsp_transport: str) -> dict[str, str]:
    if urllib.parse.urlsplit(url).scheme.lower() in ("rtsp", "rtsps"):
        return {"rtsp_transport": rtsp_transport}
    return {}
