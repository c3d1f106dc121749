"""Test media: the real videos in ``../shared/media`` (skipped with a reason when absent) and short clips
generated with PyAV (moving shapes), plus broken files built from them."""
from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MEDIA_DIR = REPO_ROOT.parent / "shared" / "media"

# name -> (width, height, frames, fps) as documented in ../shared/media/README.md
REAL_VIDEOS = {"vtest.avi": (768, 576, 795, 10.0), "box.mp4": (640, 480, 456, 29.97)}


def real_video(name: str) -> Path:
    """Path of a real test video; skips the test with the reason when the media folder is absent."""
    path = MEDIA_DIR / name
    if not path.is_file():
        pytest.skip(f"real test video {path} is absent (see ../shared/media/README.md to rebuild it)")
    return path


def moving_square(index: int, width: int, height: int) -> np.ndarray:
    """``[H, W, 3]`` uint8: a horizontal gradient with a white square that moves 3 px per frame."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = x.astype(np.uint8)
    rgb[..., 1] = 128
    rgb[..., 2] = (255 - x).astype(np.uint8)
    side = max(4, min(width, height) // 4)
    left = (3 * index) % max(1, width - side)
    top = (height - side) // 2
    rgb[top : top + side, left : left + side] = 255
    return rgb


def make_clip(
    path: Path,
    num_frames: int = 30,
    fps: int = 30,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    pts_s: Sequence[float] | None = None,
    faststart: bool = False,
) -> Path:
    """Encode a moving-square clip with PyAV and return ``path`` (container from the suffix).

    Args:
        size: ``(width, height)``; even numbers for yuv420p codecs.
        pts_s: explicit presentation times in seconds (variable frame rate); default ``i / fps``.
        faststart: MP4 only: index at the front (playable while downloading) instead of at the end.
    """
    width, height = size
    time_base = Fraction(1, 1000) if pts_s is not None else Fraction(1, fps)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base  # else the encoder snaps variable times to the 1/fps grid
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "bf": "0"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(moving_square(i, width, height), format="rgb24")
            frame.pts = round(pts_s[i] * 1000) if pts_s is not None else i
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_wav(path: Path, seconds: float = 0.5, rate: int = 8000) -> Path:
    """A valid audio-only file (no video stream)."""
    samples = (np.sin(np.arange(int(seconds * rate)) * 0.1) * 3000).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


def truncated_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """``dst`` = the first ``fraction`` of ``src``'s bytes (a download cut short)."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst
