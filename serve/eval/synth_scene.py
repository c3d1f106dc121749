"""Pixels of the synthetic streaming benchmark: real footage as background, a fixed or hand-held camera over it,
planted shapes drawn on top, and the clip written as H.264 MP4 with PyAV.

* :func:`load_footage` -- one background video -> the frames of its split's stretch (train: the first
  ``TRAIN_FRACTION`` of its frames, test: the rest), kept at ``CLIP_FPS`` by timestamp, 4:3, ``STORE_SIZE``.
* :class:`Camera` -- which footage frame and which crop window each clip frame shows (``fixed``: the whole view;
  ``handheld``: a 72 % window drifting slowly with small per-frame jitter). Footage shorter than the clip is played
  forward and backward (ping-pong).
* :class:`PlantedObject` -- a shape of a colour and size, on screen from ``on`` (inclusive) to ``off`` (exclusive)
  seconds, moving linearly; optionally partly covered by a band of the footage in the middle of its life.
* :func:`render_frame` / :func:`write_clip` -- frame ``k`` of a clip (``t = k / CLIP_FPS`` seconds), and the file.

Everything is a pure function of its arguments (no global random state), so a seed gives identical pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from PIL import Image, ImageDraw

from stream.config import SourceConfig
from stream.errors import ConfigError, SourceNotFoundError
from stream.sampler import FpsSampler
from stream.sources import open_source

CLIP_SIZE = (256, 192)  # (width, height) of the written clips
CLIP_FPS = 2  # frames per second of the written clips (the service samples 1 fps by default)
STORE_SIZE = (384, 288)  # footage frames are kept at this size (4:3), cropped/resized per clip frame
TRAIN_FRACTION = 0.6  # train split: the first 60 % of a background's frames; test split: the last 40 %
HANDHELD_WINDOW = 0.72  # the hand-held camera shows this fraction of the view (width and height)
SHAPES = ("square", "circle", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 25), "green": (30, 175, 45), "blue": (35, 70, 235),
    "yellow": (250, 220, 25), "purple": (150, 45, 195), "orange": (255, 135, 15),
}
SIZES: dict[str, float] = {"small": 0.16, "large": 0.28}  # side as a fraction of the clip height
OUTLINE = (15, 15, 15)
SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class Footage:
    """The frames of one background's split stretch.

    Attributes:
        name: file name of the background video.
        frames: ``[K, 288, 384, 3]`` uint8, ``K >= 2`` frames ``1 / CLIP_FPS`` apart (4:3 centre crop, resized).
        source_index: ``[K]`` int64 index of each kept frame in the source video.
        stretch: ``(first, end)`` source frame indices of the split's stretch (``end`` exclusive).
        source_frames: frame count of the source video.
    """

    name: str
    frames: np.ndarray
    source_index: np.ndarray
    stretch: tuple[int, int]
    source_frames: int


def split_stretch(n_frames: int, split: str) -> tuple[int, int]:
    """``(first, end)`` frame indices of ``split`` in a video of ``n_frames`` frames (disjoint for train/test)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not supported; allowed: {', '.join(SPLITS)}. Fix: --split train|test")
    cut = int(n_frames * TRAIN_FRACTION)
    return (0, cut) if split == "train" else (cut, n_frames)


def _to_store(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` -> ``[288, 384, 3]``: centre crop to 4:3, then resize."""
    h, w = rgb.shape[:2]
    if w * 3 > h * 4:
        cw = h * 4 // 3
        rgb = rgb[:, (w - cw) // 2:(w - cw) // 2 + cw]
    elif w * 3 < h * 4:
        ch = w * 3 // 4
        rgb = rgb[(h - ch) // 2:(h - ch) // 2 + ch]
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(STORE_SIZE, Image.Resampling.BILINEAR))


def load_footage(path: str | Path, split: str) -> Footage:
    """Decode ``path`` (PyAV) and keep its ``split`` stretch at ``CLIP_FPS`` -> :class:`Footage`.

    Raises:
        SourceNotFoundError: ``path`` does not exist (the message names it and the fix).
        ConfigError: the stretch holds fewer than 2 frames at ``CLIP_FPS`` (video too short).
    """
    p = Path(path)
    if not p.is_file():
        raise SourceNotFoundError(f"background video {str(p)!r} does not exist. Fix: pass existing video files with "
                                  "--videos (e.g. ../shared/media/vtest.avi), or leave --videos out for the defaults")
    sampler = FpsSampler(CLIP_FPS)
    with open_source(p, SourceConfig()) as src:
        n = int(src.info.num_frames or 0)
        first, end = split_stretch(n, split)
        frames, index = [], []
        for frame in src:
            if frame.index >= end:
                break
            if frame.index >= first and sampler.accept(frame):
                frames.append(_to_store(frame.rgb))
                index.append(frame.index)
    if len(frames) < 2:
        raise ConfigError(f"background video {str(p)!r}: its {split} stretch (frames {first}..{end - 1} of {n}) "
                          f"holds {len(frames)} frame(s) at {CLIP_FPS} fps; at least 2 are needed. Fix: pass a video "
                          f"of at least {2 / CLIP_FPS / (1 - TRAIN_FRACTION):.0f} seconds")
    return Footage(p.name, np.stack(frames), np.asarray(index, dtype=np.int64), (first, end), n)


def pingpong(i: int, k: int) -> int:
    """Index ``i`` of an endless forward-backward pass over ``k >= 2`` frames: 0, 1, .., k-1, k-2, .., 1, 0, 1, .."""
    period = 2 * k - 2
    m = i % period
    return m if m < k else period - m


@dataclass(frozen=True)
class Camera:
    """Where clip frame ``k`` looks: footage frame ``pingpong(offset + k)`` and a crop window.

    Attributes:
        mode: ``fixed`` (the whole view) or ``handheld`` (a ``HANDHELD_WINDOW`` window, slow drift + jitter).
        offset: first footage frame index of the clip.
        drift: ``[2, 2, 3]`` float, per axis (x, y) two sinusoids of (amplitude in 0..1 of the free range, period in
            clip frames, phase); zeros for ``fixed``.
        jitter: ``[n_frames, 2]`` float pixels of per-frame shake (zeros for ``fixed``).
    """

    mode: str
    offset: int
    drift: tuple[tuple[tuple[float, float, float], ...], ...]
    jitter: tuple[tuple[float, float], ...]

    @classmethod
    def random(cls, mode: str, n_frames: int, n_footage: int, rng: np.random.Generator) -> "Camera":
        """A camera for ``n_frames`` clip frames over ``n_footage`` footage frames, drawn from ``rng``."""
        offset = int(rng.integers(0, 2 * n_footage - 2))
        if mode == "fixed":
            return cls(mode, offset, (), ())
        if mode != "handheld":
            raise ConfigError(f"camera mode {mode!r} is not supported; allowed: fixed, handheld")
        drift = tuple(tuple((float(rng.uniform(0.2, 0.5)), float(rng.uniform(20, 90)), float(rng.uniform(0, 6.283)))
                            for _ in range(2)) for _ in range(2))
        jitter = tuple((float(a), float(b)) for a, b in np.round(rng.normal(0.0, 1.5, size=(n_frames, 2)), 2))
        return cls(mode, offset, drift, jitter)

    def window(self, k: int) -> tuple[int, int, int, int]:
        """Crop box ``(left, top, right, bottom)`` in ``STORE_SIZE`` pixels for clip frame ``k``."""
        sw, sh = STORE_SIZE
        if self.mode == "fixed":
            return 0, 0, sw, sh
        w, h = round(sw * HANDHELD_WINDOW), round(sh * HANDHELD_WINDOW)
        box = []
        for axis, (free, size) in enumerate(((sw - w, w), (sh - h, h))):
            u = sum(a * np.sin(2 * np.pi * k / period + phase) for a, period, phase in self.drift[axis])
            pos = free / 2 * (1 + u) + self.jitter[k][axis]
            box.append(int(np.clip(round(pos), 0, free)))
        return box[0], box[1], box[0] + w, box[1] + h


@dataclass(frozen=True)
class PlantedObject:
    """A planted shape. Positions are the centre in clip fractions (0..1, x right, y down).

    Attributes:
        oid: index of the object in its clip.
        shape, colour, size: keys of ``SHAPES``, ``COLOURS``, ``SIZES``.
        on, off: integer seconds; the object is drawn on frames with ``on <= t < off``.
        start, end: centre at ``on`` and at ``off`` (linear motion between; equal = still).
        covered: ``(from, to)`` seconds during which a band of the footage covers its lower 40 %, else ``None``.
    """

    oid: int
    shape: str
    colour: str
    size: str
    on: int
    off: int
    start: tuple[float, float]
    end: tuple[float, float]
    covered: tuple[int, int] | None = None

    def visible(self, t: float) -> bool:
        return self.on <= t < self.off

    def centre(self, t: float) -> tuple[float, float]:
        """Centre ``(x, y)`` in clip fractions at time ``t`` (seconds)."""
        a = (t - self.on) / max(1, self.off - self.on)
        return (self.start[0] + a * (self.end[0] - self.start[0]), self.start[1] + a * (self.end[1] - self.start[1]))

    def half_width(self) -> float:
        """Half the side as a fraction of the clip width."""
        return SIZES[self.size] * CLIP_SIZE[1] / CLIP_SIZE[0] / 2

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


def _draw(draw: ImageDraw.ImageDraw, obj: PlantedObject, t: float) -> tuple[int, int, int, int]:
    """Draw ``obj`` at time ``t``; returns its bounding box in clip pixels."""
    w, h = CLIP_SIZE
    side = SIZES[obj.size] * h
    cx, cy = obj.centre(t)
    x0, y0, x1, y1 = cx * w - side / 2, cy * h - side / 2, cx * w + side / 2, cy * h + side / 2
    fill = COLOURS[obj.colour]
    if obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill, outline=OUTLINE, width=2)
    elif obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill, outline=OUTLINE, width=2)
    else:
        draw.polygon([(cx * w, y0), (x1, y1), (x0, y1)], fill=fill, outline=OUTLINE, width=2)
    return int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))


def render_frame(footage: Footage, camera: Camera, objects: Sequence[PlantedObject], k: int) -> np.ndarray:
    """Clip frame ``k`` (time ``k / CLIP_FPS``) -> ``[192, 256, 3]`` uint8: footage view + visible objects."""
    t = k / CLIP_FPS
    src = footage.frames[pingpong(camera.offset + k, len(footage.frames))]  # [288, 384, 3]
    view = Image.fromarray(src).crop(camera.window(k)).resize(CLIP_SIZE, Image.Resampling.BILINEAR)
    background = np.asarray(view)
    draw = ImageDraw.Draw(view)
    covers = []
    for obj in objects:
        if obj.visible(t):
            x0, y0, x1, y1 = _draw(draw, obj, t)
            if obj.covered is not None and obj.covered[0] <= t < obj.covered[1]:
                covers.append((max(0, x0 - 2), max(0, y1 - int(0.4 * (y1 - y0))), x1 + 2, y1 + 2))
    out = np.asarray(view).copy()
    for x0, y0, x1, y1 in covers:  # the footage in front of the object's lower part
        out[y0:y1, x0:x1] = background[y0:y1, x0:x1]
    return out


def write_clip(path: Path, frames: Sequence[np.ndarray], crf: int = 26) -> None:
    """Encode ``frames`` (each ``[192, 256, 3]`` uint8) as H.264 MP4 at ``CLIP_FPS`` (one encoder thread, so the
    bytes depend only on the pixels)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height = CLIP_SIZE
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, CLIP_FPS)
        stream.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
