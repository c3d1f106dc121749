"""Frame types that cross every boundary: sources -> sampler -> chunker -> encoder.

Validated on construction; ``repr`` prints shapes and timestamps, never pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


def _check_rgb(rgb: np.ndarray, ndim: int, what: str) -> None:
    if not isinstance(rgb, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"{what} must have dtype uint8 (RGB 0..255), got {rgb.dtype}; convert with .astype(np.uint8)")
    if rgb.ndim != ndim or rgb.shape[-1] != 3:
        want = "[H, W, 3]" if ndim == 3 else "[N, H, W, 3]"
        raise ValueError(f"{what} must have shape {want} (RGB), got {list(rgb.shape)}")
    if rgb.shape[-2] < 1 or rgb.shape[-3] < 1:
        raise ValueError(f"{what} must be at least 1x1 pixels, got {list(rgb.shape)}")


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded video frame.

    Attributes:
        rgb: ``[H, W, 3]`` uint8 RGB pixels.
        pts: presentation time in seconds from the start of the stream.
        index: position of the frame in its source (decoder order, 0-based).
    """

    rgb: np.ndarray
    pts: float
    index: int

    def __post_init__(self) -> None:
        _check_rgb(self.rgb, 3, "Frame.rgb")
        if not np.isfinite(self.pts):
            raise ValueError(f"Frame.pts must be a finite number of seconds, got {self.pts}")

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    def __repr__(self) -> str:
        return f"Frame(index={self.index}, pts={self.pts:.3f}s, shape={list(self.rgb.shape)})"


@dataclass(frozen=True, eq=False)
class FrameBatch:
    """Frames of equal size, in stream order (a chunk).

    Attributes:
        rgb: ``[N, H, W, 3]`` uint8 RGB pixels.
        pts: ``[N]`` float64 seconds, non-decreasing.
        indices: ``[N]`` int64 source frame indices.
    """

    rgb: np.ndarray
    pts: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        _check_rgb(self.rgb, 4, "FrameBatch.rgb")
        n = self.rgb.shape[0]
        object.__setattr__(self, "pts", np.asarray(self.pts, dtype=np.float64))
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int64))
        if self.pts.shape != (n,) or self.indices.shape != (n,):
            raise ValueError(
                f"FrameBatch needs one pts and one index per frame: {n} frames, "
                f"pts shape {list(self.pts.shape)}, indices shape {list(self.indices.shape)}"
            )
        if n and (not np.all(np.isfinite(self.pts)) or np.any(np.diff(self.pts) < 0)):
            raise ValueError(f"FrameBatch.pts must be finite and non-decreasing, got {self.pts.tolist()}")

    @classmethod
    def from_frames(cls, frames: Sequence[Frame]) -> "FrameBatch":
        """Stack frames of one size into a batch (raises ``ValueError`` on mixed sizes or an empty list)."""
        if not frames:
            raise ValueError("FrameBatch.from_frames needs at least one frame")
        shapes = {f.rgb.shape for f in frames}
        if len(shapes) != 1:
            raise ValueError(f"frames in one batch must share a size, got {sorted(shapes)}")
        return cls(
            rgb=np.stack([f.rgb for f in frames]),
            pts=np.array([f.pts for f in frames], dtype=np.float64),
            indices=np.array([f.index for f in frames], dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.rgb.shape[0])

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield Frame(rgb=self.rgb[i], pts=float(self.pts[i]), index=int(self.indices[i]))

    def __repr__(self) -> str:
        span = f"{self.pts[0]:.3f}-{self.pts[-1]:.3f}s" if len(self) else "empty"
        return f"FrameBatch(n={len(self)}, shape={list(self.rgb.shape[1:])}, pts={span})"
