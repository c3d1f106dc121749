"""Frame sources: files (decord), pushed frames, live streams (loopback HTTP and RTSP servers), the reconnect and
read-ahead wrappers, dispatch and typed errors."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pytest

from stream.config import SourceConfig, StreamConfig
from stream.errors import (
    ConfigError,
    SourceError,
    SourceFormatError,
    SourceNotFoundError,
    SourceTimeoutError,
    SourceUnreachableError,
)
from stream.frames import Frame, FrameBatch
from stream.sources import (
    BufferedSource,
    FileSource,
    FrameSource,
    LiveSource,
    MemorySource,
    ReconnectingSource,
    open_source,
)
from stream.sources.base import SourceInfo
from tests.media import REAL_VIDEOS, make_clip, make_wav, moving_square, real_video, truncated_copy
from tests.rtsp_server import free_port, http_server, rtsp_server


def _frame(i: int, pts: float | None = None, size: tuple[int, int] = (8, 6)) -> Frame:
    w, h = size
    return Frame(rgb=np.full((h, w, 3), i % 256, dtype=np.uint8), pts=float(i if pts is None else pts), index=i)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("name", sorted(REAL_VIDEOS))
def test_real_video_frames_size_and_pts(name: str) -> None:
    width, height, count, fps = REAL_VIDEOS[name]
    path = real_video(name)
    with open_source(path) as source:
        assert isinstance(source, FileSource) and not source.is_live
        assert (source.info.width, source.info.height, source.info.num_frames) == (width, height, count)
        assert source.info.fps == pytest.approx(fps, rel=1e-3)
        first = []  # keep only the first 40 frames' pixels (the whole of vtest.avi would be 1 GB)
        indices, pts, shapes = [], [], set()
        for frame in source:
            indices.append(frame.index)
            pts.append(frame.pts)
            shapes.add(frame.rgb.shape)
            if len(first) < 40:
                first.append(frame.rgb.copy())
    assert indices == list(range(count)) and shapes == {(height, width, 3)}
    assert pts[0] == pytest.approx(0.0) and np.all(np.diff(pts) > 0)
    assert pts[-1] == pytest.approx((count - 1) / fps, abs=0.01)
    # pixels match an independent sequential decode with PyAV (same frames, same order)
    with av.open(str(path)) as container:
        reference = [f.to_ndarray(format="rgb24") for _, f in zip(range(40), container.decode(video=0))]
    for ours, ref in zip(first, reference):
        assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 0.5


def test_generated_clip_pixels_and_lazy_batches(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "clip.mp4", num_frames=21, fps=30, size=(64, 48))
    source = FileSource(path, batch_size=4)
    first = next(source)
    assert source._next_index == 4  # only one batch decoded so far
    rest = list(source)
    frames = [first, *rest]
    assert len(frames) == 21 and source.frames_read == 21
    assert [f.pts for f in frames] == pytest.approx([i / 30 for i in range(21)], abs=1e-6)
    # lossy codec: close to what was encoded, and the square really moves
    err = np.abs(frames[10].rgb.astype(int) - moving_square(10, 64, 48).astype(int)).mean()
    assert err < 6
    assert not np.array_equal(frames[0].rgb, frames[10].rgb)


@pytest.mark.parametrize("suffix", ["mp4", "mkv", "webm"])
def test_variable_frame_rate_pts_kept(tmp_path: Path, suffix: str) -> None:
    pts = [0.0, 0.1, 0.15, 0.5, 0.52, 0.9]
    codec = "libvpx" if suffix == "webm" else "libx264"
    path = make_clip(tmp_path / f"vfr.{suffix}", num_frames=len(pts), fps=30, codec=codec, pts_s=pts)
    with FileSource(path) as source:
        assert [f.pts for f in source] == pytest.approx(pts, abs=1e-6)


def test_close_stops_iteration(tmp_path: Path) -> None:
    path = make_clip(tmp_path / "clip.mp4", num_frames=12)
    with FileSource(path, batch_size=2) as source:
        next(source)
    assert source.closed
    assert list(source) == []


# ---------------------------------------------------------------- bad input -> typed errors, fast


def _raises_fast(exc_type: type[Exception], spec: str | Path, match: str, config: SourceConfig | None = None) -> None:
    start = time.monotonic()
    with pytest.raises(exc_type, match=match) as info:
        open_source(spec, config)
    assert time.monotonic() - start < 5.0
    assert str(spec) in str(info.value) and "Fix:" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _raises_fast(SourceNotFoundError, tmp_path / "nope.mp4", "does not exist")
    assert issubclass(SourceNotFoundError, FileNotFoundError)


def test_not_a_video(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("hello, not a video\n")
    _raises_fast(SourceFormatError, text, "not a readable video")
    noise = tmp_path / "noise.avi"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    _raises_fast(SourceFormatError, noise, "not a readable video")
    _raises_fast(SourceFormatError, tmp_path, "not a regular file")


def test_no_video_stream(tmp_path: Path) -> None:
    _raises_fast(SourceFormatError, make_wav(tmp_path / "tone.wav"), "no video stream.*audio")


def test_image_refused(tmp_path: Path) -> None:
    image = tmp_path / "still.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    _raises_fast(SourceFormatError, image, "image")


@pytest.mark.parametrize("name", sorted(REAL_VIDEOS))
def test_truncated_real_video(tmp_path: Path, name: str) -> None:
    half = truncated_copy(real_video(name), tmp_path / f"half_{name}")
    _raises_fast(SourceFormatError, half, "truncated")


def test_truncated_generated_clip(tmp_path: Path) -> None:
    # PyAV writes the mp4 index at the end: half a file has none; a Matroska file has its length in the header
    clip = make_clip(tmp_path / "clip.mp4", num_frames=60)
    _raises_fast(SourceFormatError, truncated_copy(clip, tmp_path / "half.mp4"), "not a readable video")
    avi = make_clip(tmp_path / "clip.avi", num_frames=60, codec="mpeg4")
    _raises_fast(SourceFormatError, truncated_copy(avi, tmp_path / "half.avi"), "truncated")


def test_unsupported_scheme_and_media_root(tmp_path: Path) -> None:
    _raises_fast(SourceFormatError, "ftp://example.org/a.mp4", "scheme 'ftp'")
    clip = make_clip(tmp_path / "clip.mp4", num_frames=3)
    inside = SourceConfig(media_root=str(tmp_path))
    with open_source("clip.mp4", inside) as source:
        assert len(list(source)) == 3
    with open_source(f"file://{clip}") as source:
        assert len(list(source)) == 3
    outside = SourceConfig(media_root=str(tmp_path / "sub"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(SourceNotFoundError, match="outside the allowed media root"):
        open_source("../clip.mp4", outside)


# ---------------------------------------------------------------- pushed frames


def test_memory_source_order_end_and_batches() -> None:
    source = open_source("memory://")
    assert isinstance(source, MemorySource) and source.is_live
    batch = FrameBatch.from_frames([_frame(i) for i in range(3)])
    source.push(_frame(100, pts=0.0))
    source.push_batch(batch)
    source.end()
    got = list(source)
    assert [f.index for f in got] == [100, 0, 1, 2]
    with pytest.raises(SourceError, match="after end"):
        source.push(_frame(9))
    with pytest.raises(TypeError, match="FrameBatch"):
        MemorySource().push(batch)  # type: ignore[arg-type]


def test_memory_source_drop_oldest_is_bounded() -> None:
    source = MemorySource(max_queue=5)
    for i in range(10_000):
        source.push(_frame(i))
        assert source.qsize() <= 5
    source.end()
    assert [f.index for f in source] == [9995, 9996, 9997, 9998, 9999]
    assert source.dropped == 9995 and source.stats()["pushed"] == 10_000


def test_memory_source_block_policy_waits_for_consumer() -> None:
    source = MemorySource(max_queue=2, overflow="block")
    source.push(_frame(0))
    source.push(_frame(1))
    with pytest.raises(SourceTimeoutError, match="full queue"):
        source.push(_frame(2), timeout_s=0.05)

    def produce() -> None:
        for i in range(2, 50):
            source.push(_frame(i), timeout_s=5)
        source.end()

    producer = threading.Thread(target=produce)
    producer.start()
    got = [f.index for f in source]
    producer.join()
    assert got == list(range(50)) and source.dropped == 0


def test_memory_source_blocks_until_frame_then_times_out() -> None:
    source = MemorySource(read_timeout_s=0.2)
    timer = threading.Timer(0.05, source.push, args=(_frame(7),))
    timer.start()
    assert next(source).index == 7
    start = time.monotonic()
    with pytest.raises(SourceTimeoutError, match="read_timeout_s=0.2"):
        next(source)
    assert 0.15 < time.monotonic() - start < 2.0


def test_memory_source_end_with_error_after_queued_frames() -> None:
    source = MemorySource()
    source.push(_frame(0))
    source.end(error=SourceTimeoutError("camera went silent"))
    assert next(source).index == 0
    with pytest.raises(SourceTimeoutError, match="silent"):
        next(source)


def test_memory_source_close_wakes_consumer() -> None:
    source = MemorySource()
    threading.Timer(0.05, source.close).start()
    assert list(source) == []
    with pytest.raises(SourceError, match="closed"):
        source.push(_frame(0))


# ---------------------------------------------------------------- config


def test_config_defaults_and_readable_errors() -> None:
    config = StreamConfig.parse({"source": {"rtsp_transport": "udp"}, "sampler": {"fps": 2}})
    assert config.source.rtsp_transport == "udp" and config.sampler.fps == 2 and config.source.queue_size == 64
    with pytest.raises(ConfigError, match=r"stream.source.rtsp_transport: got 'quic'.*'tcp' or 'udp'"):
        StreamConfig.parse({"source": {"rtsp_transport": "quic"}}, where="stream")
    with pytest.raises(ConfigError, match=r"sampler.fps: got 0.*> 0"):
        StreamConfig.parse({"sampler": {"fps": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        StreamConfig.parse({"source": {"timeout": 3}})
    with pytest.raises(ConfigError, match="reconnect_backoff_max_s"):
        SourceConfig.parse({"reconnect_backoff_s": 5, "reconnect_backoff_max_s": 1})


# ---------------------------------------------------------------- wrappers (scripted inner sources, no network)


class _Scripted(FrameSource):
    """Yields ``frames`` (pts restart at 0 like a fresh connection), then ends or raises ``error``."""

    def __init__(self, count: int, error: SourceError | None = None, live: bool = True, fps: float = 10.0) -> None:
        super().__init__(SourceInfo(uri="scripted://cam", fps=fps, is_live=live))
        self._frames = iter([_frame(i, pts=i / fps) for i in range(count)])
        self._error = error

    def _read(self) -> Frame | None:
        frame = next(self._frames, None)
        if frame is None and self._error is not None:
            raise self._error
        return frame

    def _release(self) -> None:
        pass


def _factory(script: list[FrameSource | SourceError]):
    """A factory returning the next scripted source, or raising the next scripted error."""
    items = iter(script)

    def make() -> FrameSource:
        item = next(items)
        if isinstance(item, SourceError):
            raise item
        return item

    return make


def test_reconnect_keeps_one_timeline_and_counts() -> None:
    dropped = SourceUnreachableError("connection reset")
    script: list[FrameSource | SourceError] = [
        _Scripted(3, error=dropped),  # first connection: 3 frames then reset
        SourceUnreachableError("refused"),  # first retry fails
        _Scripted(2),  # second retry works: 2 frames then the live stream ends (a disconnect)
        _Scripted(4, live=False),  # a finite stream: its end is the end
    ]
    source = ReconnectingSource(_factory(script), attempts=3, backoff_s=0.01, backoff_max_s=0.02)
    frames = list(source)
    assert [f.index for f in frames] == list(range(9))
    pts = np.array([f.pts for f in frames])
    assert np.all(np.diff(pts) >= 0.1 - 1e-9)  # restarts at 0 are shifted past the last frame
    assert source.reconnects == 2 and source.reconnect_attempts == 3
    assert source.stats()["reconnects"] == 2


def test_reconnect_gives_up_with_typed_error_after_backoff() -> None:
    script: list[FrameSource | SourceError] = [
        _Scripted(2, error=SourceTimeoutError("silent for 5s")),
        *[SourceUnreachableError(f"refused {i}") for i in range(3)],
    ]
    source = ReconnectingSource(_factory(script), attempts=3, backoff_s=0.05, backoff_max_s=0.1)
    assert len([next(source), next(source)]) == 2
    start = time.monotonic()
    with pytest.raises(SourceUnreachableError, match=r"silent for 5s.*gave up after 3 reconnect attempts.*refused 2"):
        next(source)
    waited = time.monotonic() - start
    assert 0.05 + 0.1 + 0.1 <= waited < 2.0  # 0.05, then doubled and capped at 0.1
    assert source.reconnect_attempts == 3 and source.reconnects == 0


def test_reconnect_interrupt_ends_backoff_at_once() -> None:
    inner = _Scripted(1, error=SourceUnreachableError("reset"))
    source = ReconnectingSource(_factory([inner]), backoff_s=30, backoff_max_s=30)
    next(source)
    threading.Timer(0.1, source.interrupt).start()
    start = time.monotonic()
    assert next(source, None) is None
    assert time.monotonic() - start < 2.0


def test_buffered_source_bounded_and_keeps_latest() -> None:
    source = BufferedSource(_Scripted(10_000, live=True), max_queue=8)
    source._thread.join(timeout=30)  # a consumer that fell far behind
    frames = list(source)
    assert [f.index for f in frames] == list(range(9992, 10_000))
    assert source.dropped == 9992 and source.stats()["dropped"] == 9992


def test_buffered_source_passes_errors_after_frames() -> None:
    source = BufferedSource(_Scripted(3, error=SourceTimeoutError("camera silent")), max_queue=64)
    assert [next(source).index for _ in range(3)] == [0, 1, 2]
    with pytest.raises(SourceTimeoutError, match="camera silent"):
        next(source)
    source.close()
    assert source.inner.closed


# ---------------------------------------------------------------- live: HTTP and unreachable/silent servers


def test_http_file_reads_every_frame(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames=45, fps=30)
    with http_server(tmp_path) as base:
        with open_source(f"{base}/clip.mp4") as source:
            assert isinstance(source, LiveSource) and not source.is_live  # finite: no read-ahead dropping
            frames = list(source)
        with pytest.raises(SourceNotFoundError, match="no such stream"):
            open_source(f"{base}/missing.mp4")
    assert len(frames) == 45 and source.info.duration_s == pytest.approx(1.5)
    assert [f.pts for f in frames] == pytest.approx([i / 30 for i in range(45)], abs=1e-6)
    with FileSource(clip) as local:
        for ours, ref in zip(frames, local):
            assert np.abs(ours.rgb.astype(int) - ref.rgb.astype(int)).mean() < 1.0


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_unreachable_url_fails_fast(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}/stream"
    start = time.monotonic()
    with pytest.raises(SourceUnreachableError, match="cannot reach") as info:
        open_source(url)
    assert time.monotonic() - start < 3.0 and url in str(info.value)
    assert isinstance(info.value, ConnectionError)


@contextlib.contextmanager
def _silent_server(payload: bytes = b"") -> Iterator[int]:
    """Accepts TCP connections, reads the request, sends ``payload`` and then nothing; yields the port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            conn.recv(4096)
            conn.sendall(payload)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield int(server.getsockname()[1])
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_silent_server_times_out_on_open(scheme: str) -> None:
    config = SourceConfig(open_timeout_s=1.0, read_timeout_s=1.0)
    with _silent_server() as port:
        start = time.monotonic()
        with pytest.raises(SourceTimeoutError, match="no answer within 1s while opening"):
            open_source(f"{scheme}://127.0.0.1:{port}/stream", config)
        assert time.monotonic() - start < 4.0


def test_stall_mid_stream_times_out_on_read(tmp_path: Path) -> None:
    data = make_clip(tmp_path / "clip.mp4", num_frames=300, faststart=True).read_bytes()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: %d\r\n\r\n" % len(data)
    with _silent_server(head + data[: len(data) // 2]) as port:
        source = LiveSource(f"http://127.0.0.1:{port}/clip.mp4", open_timeout_s=3, read_timeout_s=1)
        count, start = 0, time.monotonic()
        with pytest.raises(SourceTimeoutError, match="while reading"):
            for _ in source:
                count += 1
        assert 10 < count < 300 and time.monotonic() - start < 4.0
        source.close()


# ---------------------------------------------------------------- live: a real RTSP server (GStreamer)


def _rtsp_config(**overrides: object) -> SourceConfig:
    return SourceConfig.parse({"open_timeout_s": 15, "read_timeout_s": 5, "live_buffer": False, **overrides})


@pytest.mark.rtsp
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_reads_frames_with_increasing_pts(transport: str) -> None:
    with rtsp_server(real_video("box.mp4"), width=320) as server:
        with open_source(server.url, _rtsp_config(rtsp_transport=transport)) as source:
            assert source.is_live and source.info.codec == "h264"
            frames = [f for _, f in zip(range(30), source)]
    assert len(frames) == 30 and frames[0].rgb.shape == (240, 320, 3)
    pts = np.array([f.pts for f in frames])
    # FFmpeg stamps the frames before the first RTCP sender report alike; after those, strictly increasing
    assert pts[0] == 0.0 and np.all(np.diff(pts) >= 0) and np.all(np.diff(pts[8:]) > 0)
    assert pts[-1] == pytest.approx(pts[8] + 21 / 29.97, abs=0.02)


@pytest.mark.rtsp
def test_rtsp_server_killed_then_reconnects_then_gives_up() -> None:
    config = _rtsp_config(reconnect_attempts=2, reconnect_backoff_s=0.2, open_timeout_s=10)
    with rtsp_server(real_video("box.mp4"), width=160) as server:
        source = open_source(server.url, config)
        assert isinstance(source, ReconnectingSource)
        before = [next(source) for _ in range(10)]
        server.kill()
        server.start()  # back on the same port: the next attempt succeeds
        drained = []  # frames the client had buffered before the kill arrive first
        while source.reconnects == 0 and len(drained) < 300:
            drained.append(next(source))
        assert source.reconnects == 1
        after = [next(source) for _ in range(10)]
        server.kill()  # for good
        start = time.monotonic()
        with pytest.raises(SourceUnreachableError, match="gave up after 2 reconnect attempts"):
            for _ in source:
                pass
        assert time.monotonic() - start < 5.0
    assert source.reconnect_attempts == 3 and source.reconnects == 1
    frames = before + drained + after
    assert [f.index for f in frames] == list(range(len(frames)))
    assert np.all(np.diff([f.pts for f in frames]) >= 0) and after[0].pts > before[-1].pts
    source.close()


@pytest.mark.rtsp
def test_rtsp_buffered_source_default_config() -> None:
    with rtsp_server(real_video("box.mp4"), width=160) as server:
        with open_source(server.url, SourceConfig(open_timeout_s=15)) as source:
            assert isinstance(source, BufferedSource)
            frames = [f for _, f in zip(range(20), source)]
            assert source.stats()["frames_read"] == 20 and source.stats()["reconnects"] == 0
    assert len(frames) == 20


def test_file_frames_do_not_pin_their_decode_batch(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames=8)
    with FileSource(clip, batch_size=8) as source:
        frame = next(source)
    assert frame.rgb.base is None or frame.rgb.base.nbytes == frame.rgb.nbytes
