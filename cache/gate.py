"""Frame gate: a frame whose thumbnail barely differs from the last frame the ViT encoded skips the ViT entirely.

Fixed cameras show near-identical frames most of the time. Before the ViT each frame becomes a **thumbnail** (cell
means on a grid of ``cells`` cells along the longer side, 12-px cells on 768x576, kept as ``sub`` x ``sub`` block
means), the last *passing* frame's thumbnail is **relit** to the new one (per channel a smooth gain field
``g0 + gx*x + gy*y`` times the old blocks plus an offset, least squares on the cells, refitted without the ``trim``
share of cells that fit worst, clipped per block as a sensor clips) and the frame **passes** when
some ``window`` x ``window`` block of cells still differs by more than ``threshold`` (mean absolute difference on the
0-255 scale). Sensor noise averages out inside a cell (its sigma shrinks with the square root of the pixels per
cell); flicker, exposure and slow light changes are gains the fit removes; an object of a few ViT patches covers
whole cells, which no smooth gain can explain.

What a skipped frame becomes is the vision stage's business (``serve.core.stages.VisionStage``: dropped as
redundant). The comparison is always against the last passing frame, never the previous one, so a slow change
accumulates until it passes; ``max_skip_s`` lets one frame pass after that many seconds of skipping whatever.

Layers as elsewhere in ``cache/``: pure tensor functions (:func:`thumbnails`, :func:`relight`, :func:`change_map`,
:func:`gate_decision`), then one small stateful class per stream (:class:`FrameGate`) whose state is one thumbnail
``[3, rows * sub, cols * sub]`` (float16) and a few numbers, whatever the stream length.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cache.config import GateConfig

GAIN_RANGE = (0.125, 8.0)  # fitted light gains beyond 3 stops either way are not taken for a light change


# -- pure functions ---------------------------------------------------------------------------------------------------
def thumbnail_grid(height: int, width: int, cells: int, sub: int = 4) -> tuple[int, int]:
    """``(rows, cols)`` cells of an ``height`` x ``width`` frame: ``cells`` along the longer side, the shorter side in
    proportion, fewer when a cell would be under ``sub`` pixels wide (each cell holds ``sub`` x ``sub`` blocks)."""
    long_side = max(height, width)
    n = max(1, min(cells, long_side // sub))
    return max(1, round(n * height / long_side)), max(1, round(n * width / long_side))


def gate_state_bytes(height: int, width: int, cells: int, sub: int) -> int:
    """Bytes of a gate's state on ``height`` x ``width`` video once a frame passed: one float16 thumbnail
    ``[3, rows * sub, cols * sub]`` (:func:`thumbnail_grid`); :meth:`FrameGate.state_bytes` measures it."""
    rows, cols = thumbnail_grid(height, width, cells, sub)
    return 3 * rows * sub * cols * sub * 2


def thumbnails(rgb: np.ndarray | torch.Tensor, cells: int, sub: int = 4) -> torch.Tensor:
    """Block means of each frame, ``sub`` x ``sub`` blocks per cell of the grid :func:`thumbnail_grid` gives.

    Args:
        rgb: ``[N, H, W, 3]`` uint8 RGB frames.
        cells: cells along the longer side.
        sub: blocks per cell side (the resolution the lighting is applied at, so clipping is modelled per block).

    Returns:
        ``[N, 3, rows * sub, cols * sub]`` float32 on the 0-255 scale (exact area means; blocks may be of unequal
        pixel sizes).
    """
    x = torch.as_tensor(np.ascontiguousarray(rgb) if isinstance(rgb, np.ndarray) else rgb)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"rgb must be [N, H, W, 3], got {list(x.shape)}")
    rows, cols = thumbnail_grid(int(x.shape[1]), int(x.shape[2]), cells, sub)
    fine = (rows * sub, cols * sub)
    out = [F.adaptive_avg_pool2d(frame.permute(2, 0, 1)[None].float(), fine)[0] for frame in x]  # [3, R, C] each
    return torch.stack(out) if out else torch.zeros(0, 3, *fine)


def _coordinates(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` ``[rows, cols]`` float64 cell centres in [-1, 1] (the same frame coordinates at any resolution)."""
    y = ((torch.arange(rows, dtype=torch.float64) + 0.5) / rows * 2 - 1).view(rows, 1).expand(rows, cols)
    x = ((torch.arange(cols, dtype=torch.float64) + 0.5) / cols * 2 - 1).view(1, cols).expand(rows, cols)
    return x, y


def _fit(a: torch.Tensor, b: torch.Tensor, use: torch.Tensor, offset_prior: float = 0.01) -> torch.Tensor:
    """Least squares per channel over the cells ``use`` ``[3, M]`` of ``a`` ``[3, M, 4]``, ``b`` ``[3, M, 1]``;
    ``[3, 4, 1]`` (weights 0/1, so every channel solves one system of the same size). The offset (last coefficient)
    is held towards 0 with the weight of ``offset_prior`` x the cells used: light changes are gains, and over a
    narrow range of cell values a gain and an offset trade off, which would extrapolate badly to a bright object."""
    w = use.to(a.dtype)[..., None]  # [3, M, 1]
    prior = torch.zeros(a.shape[0], 1, a.shape[2], dtype=a.dtype)  # [3, 1, 4]
    prior[..., -1] = (offset_prior * use.sum(1, keepdim=True).to(a.dtype)).sqrt()
    return torch.linalg.lstsq(torch.cat([a * w, prior], 1), torch.cat([b * w, torch.zeros_like(prior[..., :1])], 1)
                              ).solution


def relight(current: torch.Tensor, reference: torch.Tensor, sub: int = 4, trim: float = 0.2,
            clip: tuple[float, float] = (4.0, 251.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference`` under ``current``'s lighting, per cell, and the fitted gain.

    Per channel ``current ~ (g0 + gx*x + gy*y) * reference + b`` over the cell means by least squares, on the cells
    none of whose blocks clip (outside ``clip``) in either frame, refitted without the ``trim`` share of cells that
    fit worst (a local change does not bend the fit). The fitted gain field is then applied to every *block* of the
    reference and clipped to 0-255 before the blocks are averaged into cells, so a brightening that saturates a lamp
    predicts the saturation instead of looking like a change.

    Args:
        current, reference: ``[3, rows * sub, cols * sub]`` block means (:func:`thumbnails` of one frame each).
        sub: blocks per cell side.
        trim: share of cells left out of the second fit, in ``[0, 1)``.
        clip: block values beyond which a cell is left out of the fit.

    Returns:
        ``([3, rows, cols]`` relit cell means of the reference (0-255), ``[3]`` median gain per channel).
    """
    lo, hi = clip
    ref, cur = reference.double(), current.double()
    ref_cells, cur_cells = F.avg_pool2d(ref[None], sub)[0], F.avg_pool2d(cur[None], sub)[0]  # [3, rows, cols]
    rows, cols = ref_cells.shape[1:]
    x, y = _coordinates(rows, cols)
    m = ref_cells.flatten(1)  # [3, M]
    a = torch.stack([m, m * x.flatten(), m * y.flatten(), torch.ones_like(m)], dim=-1)  # [3, M, 4]
    b = cur_cells.flatten(1)[..., None]  # [3, M, 1]
    both = torch.stack([ref, cur])  # [2, 3, R, C]
    inside = (-F.max_pool2d(-both, sub) > lo) & (F.max_pool2d(both, sub) < hi)  # [2, 3, rows, cols]
    use = (inside[0] & inside[1]).flatten(1)  # [3, M]
    use = use if int(use.sum(1).min()) >= 8 else torch.ones_like(use)
    coef = _fit(a, b, use)  # [3, 4, 1]
    if trim > 0:
        resid = (a @ coef - b).abs()[..., 0].masked_fill(~use, float("inf"))  # [3, M]
        rank = resid.argsort(1).argsort(1)  # [3, M]; 0 = the best fit
        coef = _fit(a, b, use & (rank < torch.clamp((use.sum(1, keepdim=True) * (1.0 - trim)).round(), min=4)))
    fx, fy = _coordinates(*ref.shape[1:])  # [R, C] block centres
    g = coef[:, 0, 0].view(3, 1, 1) + coef[:, 1, 0].view(3, 1, 1) * fx + coef[:, 2, 0].view(3, 1, 1) * fy
    relit = (g * ref + coef[:, 3, 0].view(3, 1, 1)).clamp(0.0, 255.0)  # [3, R, C]
    return F.avg_pool2d(relit[None], sub)[0].float(), g.flatten(1).median(1).values.float()


def change_map(current: torch.Tensor, reference: torch.Tensor, sub: int = 4, window: int = 2,
               trim: float = 0.2) -> torch.Tensor:
    """Local change after lighting is removed.

    Args:
        current, reference: ``[3, rows * sub, cols * sub]`` block means of the same grid (:func:`thumbnails`).
        sub: blocks per cell side.
        window: side of the block of cells averaged (clamped to the grid).
        trim: see :func:`relight`.

    Returns:
        ``[rows - w + 1, cols - w + 1]`` mean absolute difference of cell means over channels and each
        ``w x w`` window of cells (0-255); all ``inf`` when the fit needs a gain no light change gives (outside
        ``GAIN_RANGE`` in a channel the reference shows: e.g. an inverted picture fits a gain of -1 perfectly).
    """
    if current.shape != reference.shape or current.ndim != 3 or current.shape[0] != 3:
        raise ValueError(f"block means must both be [3, rows * sub, cols * sub]; got {list(current.shape)} and "
                         f"{list(reference.shape)}")
    cells = F.avg_pool2d(current.double()[None], sub)[0].float()  # [3, rows, cols]
    relit, gain = relight(current, reference, sub, trim)
    diff = (cells - relit).abs().mean(0)  # [rows, cols]
    w = max(1, min(window, *diff.shape))
    out = F.avg_pool2d(diff[None, None], w, stride=1)[0, 0]
    shown = reference.flatten(1).amax(1) > 16.0  # [3] channels with something to relight
    if bool(((gain < GAIN_RANGE[0]) | (gain > GAIN_RANGE[1]))[shown].any()):
        return torch.full_like(out, float("inf"))
    return out


def gate_decision(current: torch.Tensor, reference: torch.Tensor | None, threshold: float, sub: int = 4,
                  window: int = 2, trim: float = 0.2) -> tuple[bool, float]:
    """Does the frame pass? ``(passes, score)`` with ``score`` the largest window change (0-255; inf without a
    reference of the same grid: the first frame, or a frame size change, always passes).

    Args:
        current: ``[3, rows * sub, cols * sub]`` block means of the frame (:func:`thumbnails`).
        reference: the same of the last passing frame, or None.
        threshold: the frame passes when ``score > threshold``.
    """
    if reference is None or reference.shape != current.shape:
        return True, float("inf")
    score = float(change_map(current, reference, sub, window, trim).max())
    return score > threshold, score


# -- one stream's state -----------------------------------------------------------------------------------------------
@dataclass
class GateStats:
    """Counters of a gate: frames seen, passed and skipped (``forced``: passed only by ``max_skip_s``)."""

    frames: int = 0
    passed: int = 0
    skipped: int = 0
    forced: int = 0
    last_score: float = 0.0

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.frames if self.frames else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skip_rate": round(self.skip_rate, 6)}


class FrameGate:
    """One stream's frame gate. State: the last passing frame's block means ``[3, rows * sub, cols * sub]`` in float16
    (0.125 grey levels of precision at most, far below any threshold), its pts and the counters (:meth:`state_bytes`:
    constant in the stream length; 288 KiB at the defaults on 4:3 video).

    Args:
        config: the gate settings (``enabled`` is the caller's switch: a gate always gates).
    """

    def __init__(self, config: GateConfig | None = None) -> None:
        self.config = config or GateConfig()
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next frame passes."""
        self._reference: torch.Tensor | None = None  # [3, rows * sub, cols * sub] float16
        self._reference_pts: float | None = None
        self._stats = GateStats()

    def admit(self, rgb: np.ndarray, pts: Sequence[float] | np.ndarray) -> np.ndarray:
        """Decide a chunk, frame by frame in stream order, and advance the state.

        Args:
            rgb: ``[N, H, W, 3]`` uint8 frames.
            pts: ``[N]`` seconds.

        Returns:
            ``[N]`` bool: True = the frame passes (the ViT encodes it). Each frame is compared with the last passing
            frame, which may be an earlier frame of the same chunk, so any chunking gives the same decisions.
        """
        cfg = self.config
        times = np.asarray(pts, dtype=np.float64).reshape(-1)
        if len(times) != len(rgb):
            raise ValueError(f"admit needs one pts per frame: {len(rgb)} frames, {len(times)} pts")
        thumbs = thumbnails(rgb, cfg.cells, cfg.sub)  # [N, 3, rows * sub, cols * sub]
        keep = np.zeros(len(times), dtype=bool)
        for i, thumb in enumerate(thumbs):
            passes, score = gate_decision(thumb, self._reference, cfg.threshold, cfg.sub, cfg.window, cfg.trim)
            forced = (not passes and cfg.max_skip_s is not None and self._reference_pts is not None
                      and times[i] - self._reference_pts >= cfg.max_skip_s)
            keep[i] = passes or forced
            st = self._stats
            st.frames += 1
            st.last_score = score if np.isfinite(score) else st.last_score
            if keep[i]:
                st.passed += 1
                st.forced += int(forced)
                self._reference, self._reference_pts = thumb.to(torch.float16), float(times[i])
            else:
                st.skipped += 1
        return keep

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset (see :class:`GateStats`) plus ``skip_rate`` and ``state_bytes``."""
        return {**self._stats.to_dict(), "state_bytes": self.state_bytes()}

    def state_bytes(self) -> int:
        """Bytes of tensor state: one thumbnail."""
        ref = self._reference
        return 0 if ref is None else ref.numel() * ref.element_size()
