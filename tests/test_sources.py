"""Frame sources: files (decord), pushed frames, dispatch, config and typed errors. Live: tests/test_live_sources.py."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from stream.config import SourceConfig, StreamConfig
from stream.errors import ConfigError, SourceError, SourceFormatError, SourceNotFoundError, SourceTimeoutError
from stream.frames import Frame, FrameBatch
from stream.sources import FileSource, MemorySource, open_source
from tests.media import REAL_VIDEOS, make_clip, make_wav, moving_square, real_video, truncated_copy


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
    with av.open(str(path)) as container:  # FFmpeg's own count (box.mp4: 455 frames of 456 packets)
        decodable = sum(1 for _ in container.decode(video=0))
    assert indices == list(range(decodable)) and decodable >= count - 1 and shapes == {(height, width, 3)}
    assert pts[0] == pytest.approx(0.0) and np.all(np.diff(pts) > 0)
    assert pts[-1] == pytest.approx((decodable - 1) / fps, abs=0.01)
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


def test_damaged_middle_raises_while_reading(tmp_path: Path) -> None:
    data = bytearray(real_video("box.mp4").read_bytes())
    start = int(len(data) * 0.4)
    data[start : start + len(data) // 10] = bytes(len(data) // 10)  # a zeroed block: the index is intact
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    count = 0
    with pytest.raises(SourceFormatError, match=r"damaged.mp4: frames \d+\.\.\d+ fail to decode.*Fix:"):
        for _ in open_source(damaged):
            count += 1
    assert 100 < count < 456  # the frames before the damage came through


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


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_file_frames_do_not_pin_their_decode_batch(tmp_path: Path, decoder: str) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames=8)
    with FileSource(clip, batch_size=8, decoder=decoder) as source:
        frame = next(source)
    assert frame.rgb.base is None or memoryview(frame.rgb.base).nbytes == frame.rgb.nbytes  # one frame, not 8


@pytest.mark.parametrize("name", sorted(REAL_VIDEOS))
def test_decord_decoder_gives_the_same_frames_as_the_default(name: str) -> None:
    """``decoder="decord"`` (opt-in) and the PyAV default agree on pixels, pts and indices of every frame both give."""
    path = real_video(name)
    with FileSource(path, decoder="pyav") as a, FileSource(path, decoder="decord") as b:
        for n, (x, y) in enumerate(zip(a, b)):
            assert (x.index, x.pts) == (y.index, y.pts)
            if n % 25 == 0:  # same decoded frame (the RGB conversion may differ by rounding)
                assert np.abs(x.rgb.astype(int) - y.rgb.astype(int)).mean() < 0.5
    assert n >= min(a.info.num_frames, b.info.num_frames) - 2
