"""The in-process pipeline end to end: exactness against plain HF generation, chunking invariance, the cacher and
pruner switches, and per-stream stats."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.core.options import StreamOptions
from serve.core.pipeline import StreamPipeline
from stream.frames import Frame, FrameBatch
from tests.media import moving_square

QUESTION = "What is happening?"


def _frames(n: int, w: int = 96, h: int = 72, fps: float = 1.0) -> list[Frame]:
    return [Frame(moving_square(5 * i, w, h), i / fps, i) for i in range(n)]


def _options(**sections) -> StreamOptions:
    base = {"cacher": {"enabled": False}, "pruner": {"enabled": False}, "sampler": {"fps": 1.0, "frames_per_chunk": 2}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return StreamOptions.parse(base)


def _answer(adapter, frames: list[Frame], options: StreamOptions, max_new_tokens: int = 6) -> tuple[str, StreamPipeline]:
    pipe = StreamPipeline(adapter, options)
    sid = pipe.open("s")
    pipe.ingest(sid, frames)
    return "".join(pipe.ask(sid, QUESTION, max_new_tokens)), pipe


def _hf_greedy(adapter, frames: list[Frame], max_new_tokens: int) -> str:
    """Reference: HF generate on placeholder ids + pixel values, greedy."""
    rgb = np.stack([f.rgb for f in frames])
    pts = [f.pts for f in frames]
    end = torch.full((adapter.video_end_embeds().shape[0],), adapter.placeholder_id)
    ids = torch.cat([adapter.stream_prefix_ids(), adapter.chunk_placeholder_ids(len(frames), pts), end,
                     adapter.question_ids(QUESTION)])[None]
    pv = adapter.preprocess(rgb)[None]
    kw = {"pixel_values_videos": pv} if adapter.family == "llava_onevision" else {"pixel_values": pv}
    out = adapter.model.generate(input_ids=ids, **kw, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=sorted(adapter.eos_token_ids), pad_token_id=adapter.tokenizer.pad_token_id)
    return adapter.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_answer_equals_hf_generate_without_compression(tiny_adapter) -> None:
    frames = _frames(4)
    answer, _ = _answer(tiny_adapter, frames, _options())
    assert answer == _hf_greedy(tiny_adapter, frames, 6)
    assert answer  # random weights still produce tokens


def test_chunk_size_does_not_change_the_answer(tiny_llava) -> None:
    frames = _frames(6)
    a2, _ = _answer(tiny_llava, frames, _options(sampler={"frames_per_chunk": 2}, pruner={"enabled": True}))
    a6, _ = _answer(tiny_llava, frames, _options(sampler={"frames_per_chunk": 6}, pruner={"enabled": True}))
    assert a2 == a6


def test_cache_ratio_one_equals_no_cache(tiny_llava) -> None:
    frames = _frames(4)
    plain, _ = _answer(tiny_llava, frames, _options())
    cached, pipe = _answer(tiny_llava, frames, _options(cacher={"enabled": True, "ratio": 1.0}))
    assert cached == plain
    assert pipe.stats["s"].cache  # cacher stats reported


def test_pruning_budget_shows_in_stats(tiny_llava) -> None:
    _, pipe = _answer(tiny_llava, _frames(4), _options(pruner={"enabled": True, "tokens_per_frame": 20}))
    st = pipe.stats["s"].as_dict()
    assert st["frames"] == 4 and st["visual_tokens"] == 4 * 20 and st["visual_tokens_in"] == 4 * 196
    assert st["kv_tokens"] > st["visual_tokens"]  # prompt text + question turn on top


def test_sampler_keeps_target_fps(tiny_llava) -> None:
    frames = _frames(20, fps=10.0)  # 2 s of 10 fps video
    _, pipe = _answer(tiny_llava, frames, _options(sampler={"fps": 2.0}))
    assert pipe.stats["s"].frames == 4


def test_streams_are_isolated(tiny_llava) -> None:
    pipe = StreamPipeline(tiny_llava, _options())
    a, b = pipe.open("a"), pipe.open("b")
    pipe.push_chunk(a, FrameBatch.from_frames(_frames(2)))
    before = "".join(pipe.ask(a, QUESTION, 5))
    pipe.push_chunk(b, FrameBatch.from_frames(_frames(4)[2:]))
    assert "".join(pipe.ask(a, QUESTION, 5)) == before  # b's frames did not leak into a; the answer did not stick
    pipe.close(b)
    with pytest.raises(Exception, match="not open"):
        pipe.push_chunk(b, FrameBatch.from_frames(_frames(1)))


def test_attention_policy_runs_and_conflicts_with_cacher_clearly(tiny_llava) -> None:
    from stream.errors import ConfigError

    _, pipe = _answer(tiny_llava, _frames(2), _options(pruner={"enabled": True, "policy": "attention",
                                                                "tokens_per_frame": 30}))
    assert pipe.stats["s"].visual_tokens == 2 * 30
    with pytest.raises(ConfigError, match="cacher.enabled=false"):
        _options(pruner={"enabled": True, "policy": "attention"}, cacher={"enabled": True})


def test_per_stream_kv_override_is_refused_clearly(tiny_llava) -> None:
    from stream.errors import RequestError

    pipe = StreamPipeline(tiny_llava, _options())
    other = _options().merged({"kv": {"budget_tokens": 4096}})
    with pytest.raises(RequestError, match="per-stream KV settings are not supported"):
        pipe.open("x", other)
    assert "x" not in pipe.vision.streams()  # nothing half-open left behind
