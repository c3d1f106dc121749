"""``stc_context``'s novelty (issue 13): motion-compensated, smoothed over the grid, against a per-position
background memory. Synthetic tokens with known structure (a panning camera, a planted object), so every
assertion is weight-independent."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pruner import PrunerConfig, StreamPruner
from pruner.scoring import (
    background_memory,
    motion_dissimilarity,
    neighbourhood,
    smooth_on_grid,
    temporal_dissimilarity,
)

SIDE = 14  # LLaVA-OneVision's projector grid


def grid(rows: int = SIDE, cols: int = SIDE) -> torch.Tensor:
    return torch.tensor([(r, c) for r in range(rows) for c in range(cols)], dtype=torch.long)


def panning_scene(frames: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    """``[frames, SIDE*SIDE, d]``: a wide random "world", seen through a SIDE x SIDE window that moves one cell
    right per frame (a camera pan): every frame's content is the previous frame's, shifted."""
    g = torch.Generator().manual_seed(seed)
    world = torch.randn(SIDE, SIDE + frames, d, generator=g)
    return torch.stack([world[:, f:f + SIDE].reshape(SIDE * SIDE, d) for f in range(frames)])


def plant(x: torch.Tensor, frame: int, top: int, left: int, size: tuple[int, int] = (3, 4), seed: int = 7
          ) -> torch.Tensor:
    """Paste a ``size`` (rows, cols) block of new random tokens (an object from elsewhere) into ``frame``; returns
    the ``[T]`` bool mask of its tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    mask[top:top + size[0], left:left + size[1]] = True
    flat = mask.flatten()
    x[frame, flat] = torch.randn(int(flat.sum()), x.shape[-1], generator=g)
    return flat


def test_radius_zero_against_the_previous_frame_is_temporal_dissimilarity() -> None:
    x = torch.randn(5, SIDE * SIDE, 8, generator=torch.Generator().manual_seed(1))
    prev = torch.randn(SIDE * SIDE, 8, generator=torch.Generator().manual_seed(2))
    before = torch.cat([prev[None], x[:-1]])
    torch.testing.assert_close(motion_dissimilarity(x, before, grid(), 0), temporal_dissimilarity(x, prev))
    nan_first = torch.cat([torch.full_like(prev[None], float("nan")), x[:-1]])
    out = motion_dissimilarity(x, nan_first, grid(), 1)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()


def test_a_camera_pan_is_not_novel_with_motion_compensation() -> None:
    x = panning_scene(2)
    before = x[:1]
    same_place = motion_dissimilarity(x[1:], before, grid(), 0)[0].reshape(SIDE, SIDE)
    compensated = motion_dissimilarity(x[1:], before, grid(), 1)[0].reshape(SIDE, SIDE)
    assert float(compensated[:, :-1].abs().max()) < 1e-5  # every token but the entering column has its match
    assert float(same_place.mean()) > 0.5  # without compensation the whole frame looks new
    assert float(compensated[:, -1].min()) > 0.3  # the column that entered the view is new


def test_neighbourhood_and_smoothing_match_pooling() -> None:
    near = neighbourhood(grid(), 1)
    assert int(near[0].sum()) == 4 and int(near[SIDE + 1].sum()) == 9  # corner, interior
    score = torch.rand(3, SIDE * SIDE, generator=torch.Generator().manual_seed(3))
    pooled = F.avg_pool2d(score.reshape(3, 1, SIDE, SIDE), 3, 1, 1, count_include_pad=False).reshape(3, -1)
    torch.testing.assert_close(smooth_on_grid(score, grid(), 1), pooled)
    assert torch.equal(smooth_on_grid(score, grid(), 0), score)


def test_background_memory_horizon_one_is_the_previous_frame_and_chunks_do_not_matter() -> None:
    x = torch.randn(7, 10, 4, generator=torch.Generator().manual_seed(4))
    before, mem, count = background_memory(x, None, 0, 1)
    assert torch.isnan(before[0]).all() and torch.equal(before[1:], x[:-1]) and torch.equal(mem, x[-1])
    one, m1, c1 = background_memory(x, None, 0, 3)
    a, ma, ca = background_memory(x[:3], None, 0, 3)
    b, mb, cb = background_memory(x[3:], ma, ca, 3)
    torch.testing.assert_close(torch.cat([a, b]), one, equal_nan=True)
    torch.testing.assert_close(mb, m1)
    assert cb == c1 == 7
    torch.testing.assert_close(one[3], (x[0] + x[1] + x[2]) / 3)  # exact mean until the horizon is reached


def test_default_keeps_an_object_that_appears_while_the_camera_pans() -> None:
    """A 3x4 object (12 tokens, the size of bench_events' planted crop) appears at frame 4 of a panning scene: the
    default keeps most of it; same-position novelty (the old default) spends the novel budget on the pan."""
    x = panning_scene(6, seed=5)
    obj = plant(x, 4, 4, 3)
    kept = {}
    for name, extra in (("default", {}), ("same_place", {"motion_radius": 0, "novelty_smooth": 0}),
                        ("random", {"policy": "random"}), ("uniform", {"policy": "uniform"})):
        mask = StreamPruner(PrunerConfig(keep_ratio=0.25, **extra)).select(x, grid()).mask
        kept[name] = int(mask[4][obj].sum())
    print(kept)
    assert kept["default"] >= 9, kept  # of 12; 15 of the 49 kept tokens are novel
    assert kept["default"] >= 2 * max(kept["random"], kept["uniform"], kept["same_place"]), kept


@pytest.mark.parametrize("key,value", [("motion_radius", -1), ("novelty_smooth", 65), ("novelty_horizon", 0)])
def test_novelty_settings_are_validated(key: str, value: int) -> None:
    from stream.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        PrunerConfig.parse({key: value})
