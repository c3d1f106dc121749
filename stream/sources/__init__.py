"""Frame sources behind one iterator interface (:class:`FrameSource`), and :func:`open_source` to pick one.

* :class:`FileSource` -- video files, decoded lazily with decord (probed with PyAV first).
* :class:`LiveSource` -- RTSP / HTTP(S) / HLS streams via PyAV with open/read timeouts.
* :class:`MemorySource` -- frames pushed in by the caller, bounded queue.
* :class:`ReconnectingSource`, :class:`BufferedSource` -- wrappers for live streams (reopen on disconnect;
  read ahead in a thread into a bounded queue).
"""
from __future__ import annotations

import urllib.parse
from pathlib import Path

from stream.config import SourceConfig
from stream.errors import SourceFormatError, SourceNotFoundError
from stream.sources.base import FrameSource, SourceInfo
from stream.sources.file import FileSource, probe_file
from stream.sources.live import LIVE_SCHEMES, LiveSource, redact
from stream.sources.memory import BufferedSource, MemorySource
from stream.sources.reconnect import ReconnectingSource

__all__ = [
    "BufferedSource",
    "FileSource",
    "FrameSource",
    "LiveSource",
    "MemorySource",
    "ReconnectingSource",
    "SourceInfo",
    "open_source",
    "probe_file",
]

# Files FFmpeg reads as streams (playlists, session descriptions): decoded by PyAV, not decord.
_PLAYLIST_SUFFIXES = (".m3u8", ".sdp")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def open_source(spec: str | Path, config: SourceConfig | None = None) -> FrameSource:
    """Open the source named by ``spec`` with the settings of ``config``.

    ``spec`` is a file path (or ``file://`` URL), an ``rtsp(s)://`` / ``http(s)://`` URL, an ``.m3u8``/``.sdp``
    file, or ``memory://`` (an empty :class:`MemorySource` to push frames into, ``queue_size``/``overflow`` from
``config``, reads wait without a timeout). Live streams (RTSP, or HTTP without a known duration) are wrapped in
    :class:`ReconnectingSource` (if ``config.reconnect_attempts > 0``) and :class:`BufferedSource` (if
    ``config.live_buffer``).

    Raises:
        SourceNotFoundError: no such file, or the file is outside ``config.media_root``.
        SourceFormatError: not a video, no video stream, truncated, or an unsupported URL scheme.
        SourceUnreachableError, SourceTimeoutError: a live stream cannot be reached / does not answer.
    """
    config = config or SourceConfig()
    text = str(spec)
    scheme = urllib.parse.urlsplit(text).scheme.lower() if "://" in text else ""
    if scheme == "memory":
        return MemorySource(max_queue=config.queue_size, overflow=config.overflow)
    if scheme in LIVE_SCHEMES:
        return _open_live(text, config)
    if scheme == "file":
        text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    elif scheme:
        raise SourceFormatError(
            f"unsupported source {redact(text)!r}: scheme {scheme!r} is not one of "
            f"{', '.join(LIVE_SCHEMES + ('file', 'memory'))}. Fix: use a file path or an rtsp:// / http:// URL."
        )
    path = _checked_path(Path(text), config.media_root)
    suffix = path.suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        raise SourceFormatError(f"{path} is an image ({suffix}), not a video. Fix: pass a video file.")
    if suffix in _PLAYLIST_SUFFIXES:
        return _open_live(str(path), config)
    return FileSource(path, batch_size=config.decode_batch, num_threads=config.decode_threads,
                      decoder=config.file_decoder)


def _checked_path(path: Path, media_root: str | None) -> Path:
    """``path`` (relative ones resolved under ``media_root`` when set); refuse it if it escapes ``media_root``."""
    if media_root is None:
        return path
    root = Path(media_root).resolve()
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        raise SourceNotFoundError(
            f"{path} is outside the allowed media root {root}. Fix: pass a path inside {root}."
        )
    return full


def _open_live(url: str, config: SourceConfig) -> FrameSource:
    def factory() -> LiveSource:
        return LiveSource(
            url,
            open_timeout_s=config.open_timeout_s,
            read_timeout_s=config.read_timeout_s,
            rtsp_transport=config.rtsp_transport,
        )

    source: FrameSource = factory()
    if not source.is_live:
        return source  # a finite file over HTTP: every frame in order, no read-ahead dropping
    if config.reconnect_attempts > 0:
        source = ReconnectingSource(
            factory,
            attempts=config.reconnect_attempts,
            backoff_s=config.reconnect_backoff_s,
            backoff_max_s=config.reconnect_backoff_max_s,
            first=source,
        )
    if config.live_buffer:
        source = BufferedSource(source, max_queue=config.queue_size, overflow=config.overflow)
    return source
