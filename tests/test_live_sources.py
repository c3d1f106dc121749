"""Live sources: the reconnect and read-ahead wrappers (scripted inner sources), HTTP and silent/unreachable
servers on loopback, and a real RTSP server (GStreamer, tests/rtsp_server.py)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import pytest

from stream.config import SourceConfig
from stream.errors import SourceError, SourceNotFoundError, SourceTimeoutError, SourceUnreachableError
from stream.frames import Frame
from stream.sources import BufferedSource, FileSource, FrameSource, LiveSource, ReconnectingSource, open_source
from stream.sources.base import SourceInfo
from tests.media import make_clip, real_video
from tests.rtsp_server import free_port, http_server, rtsp_server


def _frame(i: int, pts: float) -> Frame:
    return Frame(rgb=np.full((6, 8, 3), i % 256, dtype=np.uint8), pts=pts, index=i)


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


def _factory(script: list[FrameSource | SourceError]) -> Callable[[], FrameSource]:
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


def test_hls_playlist_goes_to_pyav(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames=60, fps=30)
    with av.open(str(clip)) as src, av.open(str(tmp_path / "play.m3u8"), "w", format="hls") as out:
        video = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = video
                out.mux(packet)
    with open_source(tmp_path / "play.m3u8") as source:  # decord cannot read playlists
        assert isinstance(source, LiveSource) and not source.is_live  # the playlist is complete (ENDLIST)
        pts = [f.pts for f in source]
    assert pts == pytest.approx([i / 30 for i in range(60)], abs=1e-3)


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


@pytest.mark.rtsp
def test_rtsp_server_loops_the_file(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "short.mp4", num_frames=15, fps=15)  # 1 s, square moving 3 px per frame
    with rtsp_server(clip) as server:
        with open_source(server.url, _rtsp_config()) as source:
            frames = [f for _, f in zip(range(40), source)]
    square_x = [int(np.argmax(f.rgb[24].min(axis=1) > 200)) for f in frames]  # left edge of the white square
    assert len(set(square_x[:15])) == 15  # it moves every frame...
    assert square_x[15:30] == square_x[:15] and square_x[30:] == square_x[:10]  # ...and the clip repeats
    pts = np.array([f.pts for f in frames])
    assert np.all(np.diff(pts) >= 0) and pts[-1] == pytest.approx(pts[2] + 37 / 15, abs=0.02)
