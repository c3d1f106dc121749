"""The frame gate (``cache/gate.py``): planted changes always pass, sensor noise and lighting never do, decisions do
not depend on the chunking, the state is bounded, and the config names bad values.

Planted events follow ``bench_events.py``: a crop of one video (or a flat coloured square) pasted into a still frame
of another, at sizes from 2x2 ViT patches (SigLIP's 27x27 grid on the frame) to a third of the frame, at corners,
edges and random places, under independent sensor noise and a flicker of the light in both frames.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.config import CacherConfig, GateConfig
from cache.gate import FrameGate, change_map, gate_decision, gate_state_bytes, relight, thumbnail_grid, thumbnails
from stream.errors import ConfigError
from tests.media import moving_square, real_video

PATCHES = 27  # SigLIP-so400m/14 at 384 px: 27 x 27 patches over the frame
SIZES = (2, 3, 4, 8, 9)  # object side in patches; 9 = a third of the frame


def camera(frame: np.ndarray, rng: np.random.Generator, gain: float = 1.0, slope: float = 0.0,
           noise: float = 8.0) -> np.ndarray:
    """``[H, W, 3]`` uint8 as a camera would see it: light ``gain`` with a left-right ``slope``, Gaussian sensor
    noise of ``noise`` grey levels, rounded and clipped."""
    w = frame.shape[1]
    light = gain * (1.0 + slope * np.linspace(-1.0, 1.0, w, dtype=np.float32))[None, :, None]
    x = frame.astype(np.float32) * light + rng.normal(0.0, noise, frame.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def synthetic(h: int = 480, w: int = 640, seed: int = 0) -> np.ndarray:
    """``[H, W, 3]`` a smooth colour gradient with mild texture (a plain wall under uneven light)."""
    rng = np.random.default_rng(seed)
    x, y = np.linspace(0, 1, w)[None, :, None], np.linspace(0, 1, h)[:, None, None]
    img = np.concatenate([120 + 60 * x + 0 * y, 100 + 40 * y + 0 * x, 90 + 30 * x * y], 2)
    return np.clip(img + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)


def _decode(name: str, second: float) -> np.ndarray:
    import decord

    vr = decord.VideoReader(str(real_video(name)), num_threads=1)
    return vr[int(round(second * vr.get_avg_fps()))].asnumpy()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny tensors: thread hand-offs would cost more than the work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenes() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """background -> (still background frame, a frame of other footage the objects are cut from)."""
    vtest, box = _decode("vtest.avi", 0.0), _decode("box.mp4", 0.0)
    return {"vtest": (vtest, _decode("box.mp4", 5.0)), "box": (box, _decode("vtest.avi", 5.0)),
            "synthetic": (synthetic(), _decode("vtest.avi", 5.0))}


def _places(h: int, w: int, oh: int, ow: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    corners = [(0, 0), (0, w - ow), (h - oh, 0), (h - oh, w - ow), ((h - oh) // 2, (w - ow) // 2)]
    return corners + [(int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))) for _ in range(3)]


def _object(source: np.ndarray, under: np.ndarray, flat: bool, rng: np.random.Generator) -> np.ndarray:
    """A visible object for the region ``under``: a crop of ``source`` differing from it by >= 20 grey levels on
    average per pixel, or a flat colour >= 40 levels from its mean."""
    oh, ow = under.shape[:2]
    for _ in range(200):
        if flat:
            obj = np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), under.shape)
            if np.abs(obj[0, 0].astype(float) - under.reshape(-1, 3).mean(0)).mean() >= 40:
                return obj
        else:
            y, x = int(rng.integers(0, source.shape[0] - oh)), int(rng.integers(0, source.shape[1] - ow))
            obj = source[y:y + oh, x:x + ow]
            if np.abs(obj.astype(float) - under).mean() >= 20:
                return obj
    raise AssertionError("no visible object found for this region")


def test_shapes_of_the_pure_functions() -> None:
    rgb = np.zeros((2, 576, 768, 3), np.uint8)
    assert thumbnail_grid(576, 768, 64) == (48, 64) and thumbnail_grid(72, 96, 64) == (18, 24)
    t = thumbnails(rgb, 64, sub=4)
    assert t.shape == (2, 3, 192, 256) and t.dtype == torch.float32
    relit, gain = relight(t[1], t[0])
    assert relit.shape == (3, 48, 64) and gain.shape == (3,)
    assert change_map(t[1], t[0], window=2).shape == (47, 63)
    assert gate_decision(t[0], None, 8.0) == (True, float("inf"))  # the first frame always passes
    small = thumbnails(np.zeros((1, 30, 40, 3), np.uint8), 64, sub=4)
    assert gate_decision(small[0], t[0], 8.0)[0]  # another grid (a size change) passes
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        thumbnails(np.zeros((576, 768, 3), np.uint8), 64)


@pytest.mark.parametrize("background", ["vtest", "box", "synthetic"])
def test_noise_flicker_and_slow_light_never_pass(scenes, background) -> None:
    """30 s at 1 fps of one still frame: sensor noise (sigma 8), flicker (+-5 %), the light falling 25 % and then
    rising back with a left-right slope of up to 10 %: only the first frame passes."""
    still = scenes[background][0]
    rng = np.random.default_rng(1)
    gate = FrameGate(GateConfig(max_skip_s=None))
    n = 30
    ramp = np.concatenate([np.linspace(1.0, 0.75, n // 2), np.linspace(0.75, 1.05, n - n // 2)])
    frames = np.stack([camera(still, rng, ramp[i] * (1 + rng.uniform(-0.05, 0.05)), 0.1 * np.sin(i / 5), 8.0)
                       for i in range(n)])
    keep = gate.admit(frames, np.arange(n, dtype=float))
    assert keep.tolist() == [True] + [False] * (n - 1), gate.stats()
    assert gate.stats()["skip_rate"] == pytest.approx((n - 1) / n)


@pytest.mark.parametrize("background", ["vtest", "box", "synthetic"])
@pytest.mark.parametrize("side", SIZES)
def test_a_planted_object_always_passes(scenes, background, side) -> None:
    """Objects of ``side`` x ``side`` patches, cut from other footage or flat, at corners, the centre and random
    places, each frame under its own noise and flicker, against the noisy still frame: every one passes."""
    still, source = scenes[background]
    rng = np.random.default_rng(side)
    h, w = still.shape[:2]
    oh, ow = int(round(side * h / PATCHES)), int(round(side * w / PATCHES))
    reference = thumbnails(camera(still, rng)[None], 64)[0]
    missed = []
    for i, (y, x) in enumerate(_places(h, w, oh, ow, rng)):
        frame = still.copy()
        frame[y:y + oh, x:x + ow] = _object(source, still[y:y + oh, x:x + ow], flat=i % 2 == 1, rng=rng)
        current = thumbnails(camera(frame, rng, gain=1 + rng.uniform(-0.05, 0.05))[None], 64)[0]
        passes, score = gate_decision(current, reference, GateConfig().threshold)
        if not passes:
            missed.append((y, x, round(score, 2)))
    assert missed == []


@pytest.mark.parametrize("background", ["vtest", "box"])
def test_a_gain_no_light_gives_is_a_change(scenes, background) -> None:
    """An inverted picture fits a gain of -1 with no residual; it passes because no light change has that gain."""
    still = scenes[background][0]
    t = thumbnails(np.stack([still, 255 - still]), 64)
    assert gate_decision(t[1], t[0], GateConfig().threshold) == (True, float("inf"))


def test_an_event_passes_when_it_appears_and_when_it_leaves(scenes) -> None:
    still, source = scenes["vtest"]
    rng = np.random.default_rng(3)
    h, w = still.shape[:2]
    oh, ow = int(round(2 * h / PATCHES)), int(round(2 * w / PATCHES))
    with_object = still.copy()
    with_object[300:300 + oh, 500:500 + ow] = _object(source, still[300:300 + oh, 500:500 + ow], False, rng)
    scene = [still] * 4 + [with_object] * 4 + [still] * 4
    frames = np.stack([camera(f, rng, 1 + rng.uniform(-0.05, 0.05)) for f in scene])
    keep = FrameGate(GateConfig(max_skip_s=None)).admit(frames, np.arange(12, dtype=float))
    assert np.flatnonzero(keep).tolist() == [0, 4, 8]


def test_decisions_do_not_depend_on_the_chunking() -> None:
    rng = np.random.default_rng(4)
    base = synthetic(96, 128)
    frames = []
    for i in range(24):  # still stretches, a square that appears, moves, stays and leaves
        f = base.copy()
        if 6 <= i < 18:
            left = 10 + 4 * min(i, 12)
            f[40:60, left:left + 20] = (250, 30, 30)
        frames.append(camera(f, rng, 1 + rng.uniform(-0.04, 0.04), noise=6.0))
    rgb, pts = np.stack(frames), np.arange(24) * 0.5
    decisions = []
    for chunk in (1, 5, 24):
        gate = FrameGate(GateConfig())
        decisions.append(np.concatenate([gate.admit(rgb[s:s + chunk], pts[s:s + chunk])
                                         for s in range(0, 24, chunk)]))
    assert all((d == decisions[0]).all() for d in decisions)
    assert np.flatnonzero(decisions[0]).tolist() == [0, 6, 7, 8, 9, 10, 11, 12, 18]


def test_max_skip_s_lets_a_still_scene_through_now_and_then() -> None:
    rng = np.random.default_rng(5)
    still = synthetic(48, 64)
    rgb = np.stack([camera(still, rng, noise=4.0) for _ in range(10)])
    gate = FrameGate(GateConfig(max_skip_s=3.0))
    assert np.flatnonzero(gate.admit(rgb, np.arange(10.0))).tolist() == [0, 3, 6, 9]
    assert gate.stats()["forced"] == 3 and gate.stats()["passed"] == 4


def test_state_is_bounded_over_10000_frames(one_thread) -> None:
    rng = np.random.default_rng(6)
    base = synthetic(24, 32)
    gate = FrameGate(GateConfig(max_skip_s=None))
    sizes = set()
    for start in range(0, 10_000, 500):
        rgb = np.stack([camera(base, rng, noise=3.0) for _ in range(500)])
        if start % 1000 == 0:
            rgb[250:, 8:16, 8:16] = (250, 30, 30)  # a square in every other half block: the reference moves
        gate.admit(rgb, np.arange(start, start + 500, dtype=float))
        sizes.add(gate.state_bytes())
    st = gate.stats()
    assert st["frames"] == 10_000 and st["passed"] + st["skipped"] == 10_000
    assert st["passed"] == 21  # the first frame, then the square appearing 10 times and leaving 10 times
    assert sizes == {3 * 24 * 32 * 2}  # one [3, rows*sub, cols*sub] float16 thumbnail, whatever the length
    assert sizes == {gate_state_bytes(24, 32, gate.config.cells, gate.config.sub)} == {st["state_bytes"]}  # on paper


def test_config_errors_name_the_value_what_is_allowed_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"cacher\.gate\.threshold: got 0.*greater than 0.*Fix"):
        CacherConfig.parse({"gate": {"threshold": 0}}, "cacher")
    with pytest.raises(ConfigError, match=r"window=12 cells is larger than the thumbnail \(8 cells.*window <= cells"):
        GateConfig.parse({"window": 12, "cells": 8}, "cacher.gate")
    with pytest.raises(ConfigError, match="unknown key"):
        GateConfig.parse({"treshold": 5}, "cacher.gate")
    assert CacherConfig.parse({"gate": {"enabled": False}}).gate.threshold == GateConfig().threshold


def test_moving_test_clips_always_pass() -> None:
    """The clips the other tests feed (a square moving 5 px per frame) pass whole, so their oracles hold with the
    gate on."""
    rgb = np.stack([moving_square(5 * i, 96, 72) for i in range(12)])
    assert FrameGate(GateConfig()).admit(rgb, np.arange(12.0)).all()
