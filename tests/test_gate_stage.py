"""The frame gate in the vision stage: skipped frames are dropped as redundant, consistently for the LLM side.

Oracles: with the gate on, a stream's chunks, answer and KV equal those of the gate off fed only the frames that
passed (same chunk boundaries); with every frame passing they equal the gate off; a chunk skipped whole appends
nothing.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.core.options import StreamOptions
from serve.core.pipeline import StreamPipeline
from stream.errors import StreamNotFoundError
from stream.frames import FrameBatch
from tests.media import moving_square
from tests.test_gate import camera, synthetic

QUESTION = "What is happening?"


def _options(gate: bool, **cacher) -> StreamOptions:
    return StreamOptions.parse({"cacher": {"gate": {"enabled": gate, "max_skip_s": None}, **cacher},
                                "sampler": {"fps": 1.0, "frames_per_chunk": 4},
                                "kv": {"policy": "sink_window", "budget_tokens": 4096}})


def _event_stream(n: int = 16, h: int = 72, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """``[n, h, w, 3]`` a still wall under noise and flicker; a square appears at frame 5, moves at 9, leaves at 11;
    frames 12-15 are still again (a chunk the gate skips whole). Returns (rgb, pts)."""
    rng = np.random.default_rng(0)
    base = synthetic(h, w)
    frames = []
    for i in range(n):
        f = base.copy()
        if 5 <= i < 11:
            left = 20 if i < 9 else 50
            f[20:44, left:left + 24] = (240, 40, 40)
        frames.append(camera(f, rng, 1 + rng.uniform(-0.04, 0.04), noise=4.0))
    return np.stack(frames), np.arange(n, dtype=float)


def _run(adapter, options: StreamOptions, chunks: list[FrameBatch]) -> tuple[list, str, StreamPipeline]:
    pipe = StreamPipeline(adapter, options, 1 << 30)
    sid = pipe.open("s")
    encoded = [pipe.push_chunk(sid, batch) for batch in chunks]
    answer = "".join(pipe.ask(sid, QUESTION, 6))
    return encoded, answer, pipe


def _chunks(rgb: np.ndarray, pts: np.ndarray, keep: np.ndarray | None = None, size: int = 4) -> list[FrameBatch]:
    out = []
    for s in range(0, len(rgb), size):
        k = np.ones(min(size, len(rgb) - s), bool) if keep is None else keep[s:s + size]
        if k.any():
            idx = np.arange(s, s + len(k))[k]
            out.append(FrameBatch(rgb[idx], pts[idx], idx))
    return out


def test_gate_on_equals_gate_off_fed_the_passing_frames(tiny_adapter) -> None:
    _check_drop_oracle(tiny_adapter)


def test_gate_on_equals_gate_off_fed_the_passing_frames_qwen(qwen) -> None:
    """Qwen pairs frames into temporal patches: a chunk of passing frames is paired as that chunk would be."""
    _check_drop_oracle(qwen)


def _check_drop_oracle(adapter) -> None:
    rgb, pts = _event_stream()
    on, answer_on, pipe = _run(adapter, _options(True), _chunks(rgb, pts))
    gate = pipe.vision.stats("s").gate
    assert gate is not None and gate.frames == 16
    keep = np.zeros(16, bool)
    keep[[0, 5, 9, 11]] = True  # the first frame, the square appearing, moving, leaving
    assert gate.passed == 4 and gate.skipped == 12
    if adapter.family in ("llava_onevision", "smolvlm"):  # one pts per frame (Qwen: per temporal patch)
        assert [p for c in on for p in c.pts] == [0.0, 5.0, 9.0, 11.0]
    assert on[-1].pts == [] and on[-1].embeds.shape[0] == 0  # frames 12-15 skipped whole: an empty chunk
    off, answer_off, pipe_off = _run(adapter, _options(False), _chunks(rgb, pts, keep))
    nonempty = [c for c in on if c.pts]
    assert len(nonempty) == len(off)
    for a, b in zip(nonempty, off, strict=True):
        assert a.pts == b.pts and a.tokens_per_frame == b.tokens_per_frame
        assert torch.equal(a.embeds, b.embeds)
    assert answer_on == answer_off
    assert pipe.llm.stats("s").model_dump() == pipe_off.llm.stats("s").model_dump()


def test_every_frame_passing_equals_no_gate(tiny_llava) -> None:
    rgb = np.stack([moving_square(5 * i, 96, 72) for i in range(8)])
    pts = np.arange(8, dtype=float)
    on, answer_on, pipe = _run(tiny_llava, _options(True), _chunks(rgb, pts))
    off, answer_off, _ = _run(tiny_llava, _options(False), _chunks(rgb, pts))
    assert pipe.vision.stats("s").gate.skipped == 0
    assert all(torch.equal(a.embeds, b.embeds) and a.pts == b.pts for a, b in zip(on, off))
    assert answer_on == answer_off


def test_a_chunk_skipped_whole_appends_nothing(tiny_llava) -> None:
    rgb, pts = _event_stream()
    pipe = StreamPipeline(tiny_llava, _options(True), 1 << 30)
    sid = pipe.open("s")
    pipe.push_chunk(sid, FrameBatch(rgb[:4], pts[:4], np.arange(4)))
    before = pipe.llm.stats(sid)
    chunk = pipe.push_chunk(sid, FrameBatch(rgb[12:16], pts[12:16], np.arange(12, 16)))  # still: skipped whole
    assert chunk.pts == [] and chunk.tokens_per_frame == [] and chunk.embeds.shape == (0, tiny_llava.llm.hidden_size)
    assert pipe.llm.append(sid, chunk).llm_tokens == 0
    assert pipe.llm.stats(sid).model_dump() == before.model_dump()
    vision = pipe.vision.stats(sid)
    assert vision.frames == 8 and vision.tokens_in == 196  # 8 frames received, 1 encoded
    assert pipe.stats[sid].frames == 8
    assert "".join(pipe.ask(sid, QUESTION, 4))  # the stream still answers
    with pytest.raises(StreamNotFoundError):
        pipe.llm.append("nope", chunk.__class__("nope", chunk.embeds, [], []))


def test_gate_is_on_by_default_and_off_with_the_cacher_off() -> None:
    assert StreamOptions().make_gate() is not None
    opts = StreamOptions.parse({"cacher": {"enabled": False}})
    assert opts.cacher.gate.enabled and opts.make_gate() is None
    assert StreamOptions.parse({"cacher": {"gate": {"enabled": False}}}).make_gate() is None
