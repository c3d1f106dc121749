"""FpsSampler / select_by_timestamp (rule, invariants, incremental == one-shot) and Chunker."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream.config import SamplerConfig
from stream.errors import ConfigError
from stream.frames import Frame
from stream.sampler import PTS_TOLERANCE_S, Chunker, FpsSampler, sample_and_chunk, select_by_timestamp
from stream.sources import open_source
from tests.media import make_clip, real_video


def _frames(pts: list[float] | np.ndarray, size: tuple[int, int] = (4, 3)) -> list[Frame]:
    w, h = size
    return [Frame(rgb=np.zeros((h, w, 3), np.uint8), pts=float(t), index=i) for i, t in enumerate(pts)]


def _check_rule(pts: np.ndarray, kept: np.ndarray, fps: float) -> None:
    """Brute-force statement of the rule for non-decreasing pts: first kept, spacing >= 1/fps, and greedy
    (every dropped frame lies within 1/fps of the last kept frame before it)."""
    interval = 1.0 / fps
    assert kept[0] == 0
    assert np.all(np.diff(pts[kept]) >= interval - PTS_TOLERANCE_S)
    kept_set = set(kept.tolist())
    last = pts[0]
    for i, t in enumerate(pts):
        if i in kept_set:
            last = t
        else:
            assert t - last < interval - PTS_TOLERANCE_S


def test_30_to_1_fps_exact_grid() -> None:
    pts = np.arange(300) / 30
    kept = select_by_timestamp(pts, 1.0)
    assert kept.tolist() == list(range(0, 300, 30))
    # decord-style timestamps rounded to the millisecond (29.97 fps) still give one frame per second
    ntsc = np.round(np.arange(300) * 1001 / 30000, 3)
    kept = select_by_timestamp(ntsc, 1.0)
    assert len(kept) == 10 and np.all(np.diff(kept) == 30)
    _check_rule(ntsc, kept, 1.0)


def test_rate_not_a_multiple_keeps_min_spacing() -> None:
    pts = np.arange(100) / 10  # 10 fps -> 3 fps: every 4th frame (0.4 s apart), never 0.3 s apart
    kept = select_by_timestamp(pts, 3.0)
    assert np.all(np.diff(kept) == 4)
    _check_rule(pts, kept, 3.0)


def test_target_above_source_rate_keeps_everything() -> None:
    pts = np.arange(50) / 10
    assert select_by_timestamp(pts, 30.0).tolist() == list(range(50))
    assert select_by_timestamp(np.zeros(0), 1.0).tolist() == []


def test_variable_frame_rate_and_gaps() -> None:
    rng = np.random.default_rng(0)
    gaps = rng.choice([1 / 60, 1 / 30, 0.1, 0.5, 3.0], size=2000, p=[0.3, 0.4, 0.2, 0.09, 0.01])
    pts = np.concatenate([[0.0], np.cumsum(gaps)])
    for fps in (0.5, 1.0, 2.0, 7.0):
        kept = select_by_timestamp(pts, fps)
        _check_rule(pts, kept, fps)
        assert len(kept) <= pts[-1] * fps + 1


def test_jitter_stays_near_target_rate() -> None:
    rng = np.random.default_rng(1)
    pts = np.arange(3000) / 30 + rng.normal(0, 0.004, 3000)  # 100 s of 30 fps with 4 ms jitter, not monotonic
    kept = select_by_timestamp(pts, 1.0)
    assert np.all(np.diff(pts[kept]) >= 1.0 - PTS_TOLERANCE_S)
    assert 96 <= len(kept) <= 100  # strict spacing costs at most one source frame per kept frame


def test_restart_keeps_frame_and_starts_new_timeline() -> None:
    pts = np.concatenate([np.arange(60) / 10, np.arange(30) / 10])  # 6 s, then the pts restart at 0
    kept = select_by_timestamp(pts, 1.0)
    assert kept.tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    sampler = FpsSampler(1.0)
    assert [i for i, t in enumerate(pts) if sampler.keep(t)] == kept.tolist()
    assert sampler.restarts == 1 and sampler.seen == 90 and sampler.kept == 9
    # a small step back (jitter) is not a restart
    assert select_by_timestamp(np.array([0.0, 1.0, 0.5, 1.2, 2.0]), 1.0).tolist() == [0, 1, 4]


@pytest.mark.parametrize("seed", range(8))
def test_incremental_equals_one_shot_for_any_chunking(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    steps = rng.choice([0.0, 1 / 30, 0.04, 0.25, 1.5, -4.0], size=n, p=[0.05, 0.5, 0.2, 0.15, 0.05, 0.05])
    pts = np.cumsum(steps) + rng.normal(0, 0.003, n)
    fps = float(rng.choice([0.5, 1.0, 2.0, 4.0, 29.97]))
    expected = select_by_timestamp(pts, fps).tolist()
    frames = _frames(pts)
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(1, 40)), replace=False))
    sampler = FpsSampler(fps)
    got = [f.index for part in np.split(np.arange(n), cuts) for f in sampler.sample(frames[i] for i in part)]
    assert got == expected
    one_by_one = FpsSampler(fps)
    assert [f.index for f in frames if one_by_one.accept(f)] == expected


def test_bad_fps_is_a_config_error() -> None:
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="fps must be a finite number > 0"):
            FpsSampler(bad)
        with pytest.raises(ConfigError):
            select_by_timestamp(np.zeros(3), bad)


def test_real_video_to_one_fps() -> None:
    with open_source(real_video("box.mp4")) as source:
        kept = list(FpsSampler(1.0).sample(source))
    pts = np.array([f.pts for f in kept])
    assert len(kept) == 16 and pts[0] == 0.0  # 15.2 s at 29.97 fps
    assert np.all((np.diff(pts) >= 1.0) & (np.diff(pts) < 1.0 + 1 / 29.97))


# ---------------------------------------------------------------- chunker


def test_chunker_sizes_order_and_flush() -> None:
    chunker = Chunker(4)
    frames = _frames(np.arange(10) / 10)
    batches = [b for f in frames for b in chunker.push(f)]
    assert [len(b) for b in batches] == [4, 4] and len(chunker) == 2
    tail = chunker.flush()
    assert tail is not None and len(tail) == 2 and chunker.flush() is None
    indices = np.concatenate([b.indices for b in [*batches, tail]])
    assert indices.tolist() == list(range(10))
    assert batches[1].rgb.shape == (4, 3, 4, 3)


def test_chunker_flushes_early_on_size_change_and_restart() -> None:
    frames = _frames([0, 1, 2], (4, 3)) + _frames([3, 4], (8, 6)) + _frames([0.5, 1.5], (8, 6))
    for i, f in enumerate(frames):
        object.__setattr__(f, "index", i)
    batches = list(Chunker(4).chunks(frames))
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2], [3, 4], [5, 6]]
    single = Chunker(1)
    single.push(frames[2])
    assert [b.indices.tolist() for b in single.push(frames[3])] == [[3]]


def test_chunker_bounded_over_long_stream() -> None:
    chunker = Chunker(7)
    count = 0
    for f in _frames(np.arange(10_000) / 30):
        count += sum(len(b) for b in chunker.push(f))
        assert len(chunker) < 7
    tail = chunker.flush()
    assert count + (len(tail) if tail else 0) == 10_000


def test_chunker_rejects_bad_size() -> None:
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="frames_per_chunk must be an integer >= 1"):
            Chunker(bad)  # type: ignore[arg-type]


def test_sample_and_chunk_on_generated_clip(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", num_frames=90, fps=30)  # 3 s
    with open_source(clip) as source:
        batches = list(sample_and_chunk(source, SamplerConfig(fps=2.0, frames_per_chunk=4)))
    assert [len(b) for b in batches] == [4, 2]
    assert np.concatenate([b.indices for b in batches]).tolist() == [0, 15, 30, 45, 60, 75]
