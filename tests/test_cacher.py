"""cache.cacher.StreamCacher on the real tiny adapters and real video: exactness, chunk invariance, the A-B-A
camera cut, refresh schedule, stats, memory bound, config errors."""
from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cache.cacher import StreamCacher, make_layer_runner
from cache.config import CacherConfig
from stream.errors import ConfigError
from tests.media import real_video


def _encode(adapter, cacher: StreamCacher, pv: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    outs, start = [], 0
    for n in chunks:
        outs.append(adapter.encode_vision(pv[start:start + n], layer_runner=cacher.runner))
        start += n
    assert start == len(pv)
    return torch.cat(outs)


def _aba_video(path: Path) -> Path:
    """A clip cut from two real videos: vtest.avi (A, 3 s), box.mp4 (B, 3 s), vtest.avi again (A, 3 s later), 1 fps."""
    import decord

    a = decord.VideoReader(str(real_video("vtest.avi"))).get_batch([0, 10, 20, 30, 40, 50]).asnumpy()
    b = decord.VideoReader(str(real_video("box.mp4"))).get_batch([0, 30, 60]).asnumpy()
    frames = [*a[:3], *b, *a[3:]]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for rgb in frames:
            small = np.asarray(Image.fromarray(rgb).resize((320, 240), Image.Resampling.BILINEAR))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(small, format="rgb24")))
        container.mux(stream.encode(None))
    return path


@pytest.fixture(scope="module")
def aba_rgb(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """``[9, 240, 320, 3]``: the A, B, A clip decoded with decord."""
    import decord

    path = _aba_video(tmp_path_factory.mktemp("clips") / "aba.mp4")
    vr = decord.VideoReader(str(path))
    assert len(vr) == 9
    return vr.get_batch(list(range(9))).asnumpy()


@pytest.mark.parametrize(
    "data,match",
    [
        ({"ratio": 1.5}, r"ratio: got 1\.5.*Fix: use a value <= 1"),
        ({"ratios": 0.2}, r"ratios: unknown key\. Allowed keys here: .*ratio"),
        ({"ratio": 0.0}, r"ratio=0 with no threshold would recompute no token"),
        ({"match_threshold": 0.9, "refresh_below": 0.5}, r"refresh_below=0\.5 is below match_threshold=0\.9"),
        ({"max_refs": 0}, r"max_refs: got 0.*>= 1"),
        ({"store_dtype": "int8"}, r"store_dtype: got 'int8'.*'float16'"),
    ],
)
def test_config_errors_name_the_value_and_the_fix(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CacherConfig.parse(data, "cacher")


def test_ratio_one_stream_equals_the_plain_encoder(tiny_adapter, real_frames: np.ndarray) -> None:
    pv = tiny_adapter.preprocess(real_frames)  # 6 frames, 1 fps
    plain = tiny_adapter.encode_vision(pv)
    cacher = StreamCacher(CacherConfig(ratio=1.0, max_reuse=2))
    cached = _encode(tiny_adapter, cacher, pv, [2, 3, 1])
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    s = cacher.stats()
    assert (s["chunks"], s["frames"], s["misses"], s["frames_full"], s["frames_reused"]) == (3, 6, 1, 2, 4)
    assert s["hits"] == 5 and s["refreshes"] == 1 and s["tokens_recomputed"] == s["tokens_reusable"]
    assert s["reuse_rate"] == pytest.approx(4 / 6)


def test_reuse_is_closer_to_the_full_encode_than_copying_the_reference(tiny_llava, real_frames: np.ndarray) -> None:
    pv = tiny_llava.preprocess(real_frames)
    full = tiny_llava.encode_vision(pv)
    copy_err = ((full[1:] - full[:1]) ** 2).sum(dim=(1, 2))  # a frame-level cache: the reference's output
    errs = {}
    for ratio in (0.1, 0.5):
        cacher = StreamCacher(CacherConfig(ratio=ratio, max_reuse=None))
        out = tiny_llava.encode_vision(pv, layer_runner=cacher.runner)
        assert cacher.last_chunk_stats()["frames_reused"] == 5
        torch.testing.assert_close(out[0], full[0], atol=1e-5, rtol=1e-5)  # the reference itself is exact
        errs[ratio] = ((out[1:] - full[1:]) ** 2).sum(dim=(1, 2))
        assert torch.all(errs[ratio] < 0.2 * copy_err), (ratio, errs[ratio] / copy_err)
    assert errs[0.5].sum() < errs[0.1].sum()  # recomputing more tokens is more exact


def test_chunking_does_not_change_results_or_decisions(tiny_llava, aba_rgb: np.ndarray) -> None:
    pv = tiny_llava.preprocess(aba_rgb)
    results = []
    for chunks in ([9], [1] * 9, [2, 4, 3], [5, 4]):
        cacher = StreamCacher(CacherConfig(ratio=0.25, max_reuse=2))
        out = _encode(tiny_llava, cacher, pv, chunks)
        s = cacher.stats()
        results.append((out, {k: s[k] for k in ("frames_full", "frames_reused", "hits", "misses", "refreshes")},
                        s["tokens_recomputed"]))
    for out, decisions, tokens in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=1e-5)
        assert decisions == results[0][1] and tokens == results[0][2]
    assert results[0][1]["misses"] == 2  # A and B; the return to A reuses A's reference
    one_shot = StreamCacher(CacherConfig(ratio=0.25, max_reuse=2))
    one_shot.encode(tiny_llava.vision_embed(pv), tiny_llava.vision_layers)
    kinds = [k for k, _ in one_shot.last_chunk_decisions()]  # a frame may reuse an earlier frame of its own chunk
    assert kinds == ["new", "reuse", "reuse", "new", "reuse", "reuse", "refresh", "reuse", "reuse"]


def test_camera_cut_back_reuses_the_earlier_reference(tiny_adapter, aba_rgb: np.ndarray) -> None:
    pv = tiny_adapter.preprocess(aba_rgb)
    cacher = StreamCacher(CacherConfig(ratio=0.25, max_reuse=None))
    per_chunk, decisions = [], []
    for start in (0, 3, 6):  # one chunk per shot: A, B, A
        tiny_adapter.encode_vision(pv[start:start + 3], layer_runner=cacher.runner)
        per_chunk.append(cacher.last_chunk_stats())
        decisions += cacher.last_chunk_decisions()
    assert [(c["misses"], c["hits"], c["frames_full"]) for c in per_chunk] == [(1, 2, 1), (1, 2, 1), (0, 3, 0)]
    a_then_b = [("new", 0), ("reuse", 0), ("reuse", 0), ("new", 1), ("reuse", 1), ("reuse", 1)]
    assert decisions == a_then_b + [("reuse", 0)] * 3
    refs = cacher.held_references()
    assert [(r["id"], r["hits"]) for r in refs] == [(1, 2), (0, 5)]  # A (id 0) served its 2 + the 3 returning frames
    assert per_chunk[-1]["refs_held"] == 2

    small = StreamCacher(CacherConfig(ratio=0.25, max_reuse=None, max_refs=1))  # STC-like: one reference only
    for start in (0, 3, 6):
        tiny_adapter.encode_vision(pv[start:start + 3], layer_runner=small.runner)
    assert small.last_chunk_stats()["misses"] == 1 and small.stats()["evictions"] == 2


def test_refresh_by_count_and_by_drift(tiny_llava, real_frames: np.ndarray) -> None:
    pv = tiny_llava.preprocess(np.concatenate([real_frames, real_frames[-1:]]))  # 7 frames of one view
    by_count = StreamCacher(CacherConfig(ratio=0.25, max_reuse=2))
    _encode(tiny_llava, by_count, pv, [4, 3])
    s = by_count.stats()
    assert (s["frames_full"], s["refreshes"], s["frames_reused"], s["misses"]) == (3, 2, 4, 1)  # full: 0, 3, 6
    by_drift = StreamCacher(CacherConfig(ratio=0.25, max_reuse=None, match_threshold=0.5, refresh_below=0.99999))
    _encode(tiny_llava, by_drift, pv, [7])
    s = by_drift.stats()
    assert s["frames_reused"] == 1 and s["refreshes"] == 5  # only the repeated last frame is close enough
    never = StreamCacher(CacherConfig(ratio=0.25, max_reuse=None))
    _encode(tiny_llava, never, pv, [7])
    assert never.stats()["frames_full"] == 1 and never.held_references()[0]["uses"] == 6


def test_stats_count_recomputed_tokens_per_layer(tiny_smolvlm, real_frames: np.ndarray) -> None:
    pv = tiny_smolvlm.preprocess(real_frames)
    cacher = StreamCacher(CacherConfig(ratio=0.3, max_reuse=None))
    tiny_smolvlm.encode_vision(pv, layer_runner=cacher.runner)
    s = cacher.last_chunk_stats()
    p, layers = 1024, len(tiny_smolvlm.vision_layers)
    assert s["tokens_recomputed"] == [5 * math.ceil(0.3 * p)] * layers
    assert s["tokens_reusable"] == [5 * p] * layers
    assert s["recompute_fraction"] == pytest.approx(math.ceil(0.3 * p) / p)
    thr = StreamCacher(CacherConfig(ratio=0.0, threshold=0.9999, max_reuse=None))
    tiny_smolvlm.encode_vision(pv, layer_runner=thr.runner)
    assert 0 < thr.stats()["recompute_fraction"] <= 1


@pytest.fixture
def one_thread():
    """Tiny ops on a busy CPU run ~10x faster without intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_memory_stays_under_the_stated_bound_over_many_frames(one_thread) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=56, patch_size=14)
    tower = SiglipVisionModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        hidden = tower.embeddings(torch.randn(8, 3, 56, 56, generator=g))  # [8, 16, 16]: 8 unrelated scenes
    layers, (_, p, d) = tower.encoder.layers, hidden.shape
    for dtype_name, elem, frames, sketch in (("auto", 4, 10_000, None), ("float16", 2, 400, None),
                                             ("auto", 4, 10_000, 4)):  # 4: key sketches stored too
        cacher = StreamCacher(CacherConfig(ratio=0.25, max_refs=3, store_dtype=dtype_name, key_sketch=sketch))
        bound = cacher.memory_bound(len(layers), p, d, torch.float32)
        assert bound == 3 * ((3 * d + (sketch or 0)) * len(layers) * p * elem + 2 * 4 * 16 * d + 8)
        for step in range(frames // 20):  # new scenes and returns of earlier ones, 20 frames per chunk
            chunk = hidden[[(step * 3 + k // 3) % 8 for k in range(20)]]
            cacher.encode(chunk + 0.01 * torch.randn(chunk.shape, generator=g), layers)
            assert cacher.memory_bytes() <= bound and cacher.last_chunk_stats()["refs_held"] <= 3
        s = cacher.stats()
        assert s["frames"] == frames and cacher.memory_bytes() == bound and s["evictions"] > 0
        assert s["hits"] + s["misses"] == frames and s["frames_full"] + s["frames_reused"] == frames
        assert s["frames_reused"] > frames // 2


def test_float16_references_stay_exact_at_ratio_one(tiny_llava, real_frames: np.ndarray) -> None:
    pv = tiny_llava.preprocess(real_frames)
    cacher = StreamCacher(CacherConfig(ratio=1.0, store_dtype="float16", max_reuse=None))
    out = tiny_llava.encode_vision(pv, layer_runner=cacher.runner)
    torch.testing.assert_close(out, tiny_llava.encode_vision(pv), atol=1e-5, rtol=1e-5)
    assert cacher.held_references()[0]["bytes"] == 3 * 2 * 729 * 64 * 2


def test_disabled_reset_and_shape_errors(tiny_llava, real_frames: np.ndarray) -> None:
    pv = tiny_llava.preprocess(real_frames[:2])
    off = StreamCacher(CacherConfig(enabled=False))
    torch.testing.assert_close(tiny_llava.encode_vision(pv, layer_runner=off.runner), tiny_llava.encode_vision(pv))
    assert off.stats()["frames_full"] == 2 and off.memory_bytes() == 0
    assert make_layer_runner(None) is None and make_layer_runner(off) == off.runner

    cacher = StreamCacher()
    hidden = tiny_llava.vision_embed(pv)
    cacher.encode(hidden, tiny_llava.vision_layers)
    with pytest.raises(ValueError, match=r"\(layers, tokens, dim\)=\(2, 729, 64\), got \(2, 100, 64\).*reset\(\)"):
        cacher.encode(hidden[:, :100], tiny_llava.vision_layers)
    with pytest.raises(ValueError, match=r"\[frames, tokens, dim\].*got \[729, 64\]"):
        cacher.encode(hidden[0], tiny_llava.vision_layers)
    cacher.reset()
    assert cacher.memory_bytes() == 0 and cacher.stats()["frames"] == 0
    cacher.encode(hidden[:, :100], tiny_llava.vision_layers)  # a new shape after reset is fine
    assert cacher.stats()["misses"] == 1
