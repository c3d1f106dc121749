"""The OpenAI-compatible endpoints, driven by the official `openai` client over the in-process app (LocalBackend +
the deterministic stage doubles, whose answers name the frames the LLM saw): the answer equals what
POST /streams/{id}/questions gives, streamed == non-streamed, stop/max_tokens/usage, media-root videos, and errors in
OpenAI's shape with the right status."""
from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from serve.core.messages import text_of
from serve.http.client import iter_sse
from serve.core.config import ServiceConfig
from serve.http.app import make_api
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.local import LocalBackend
from tests.media import make_clip
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames, tiny_stages_with_context


@pytest.fixture()
def app(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    make_clip(root / "clip.mp4", num_frames=8, fps=8, size=(32, 24))
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "source": {"open_timeout_s": 2.0, "reconnect_attempts": 0},
                               "serve": {"media_root": str(root), "max_streams": 4, "api_key": "k"}})
    llm = FakeLLMStage()
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), llm)
    client = TestClient(make_api(backend, cfg.serve), headers={"Authorization": "Bearer k"})
    client.llm_double = llm
    rgb, pts = frames(8)
    assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
    r = client.post("/streams/cam/frames?flush=true", content=encode_frames(rgb, pts, "raw"),
                    headers={"Content-Type": CONTENT_TYPE})
    assert r.status_code == 200
    yield client
    backend.shutdown()


def _oa(client: TestClient, key: str = "k") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def _msg(url: str, text: str = "what happened?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                          {"type": "video_url", "video_url": {"url": url}}]}]


def _native(client: TestClient, sid: str) -> str:
    r = client.post(f"/streams/{sid}/questions", json={"question": "what happened?", "wait_s": 2})
    return [e for e in iter_sse(r) if e[0] == "done"][0][1]["answer"]


def test_models_and_non_streamed_answer_equals_native_question(app):
    oa = _oa(app)
    assert [m.id for m in oa.models.list().data] == ["stc-serve"]
    native = _native(app, "cam")
    assert native == "frames=8 last=0.70"  # the doubles saw all 8 pushed frames
    out = oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), max_tokens=16)
    assert out.choices[0].message.content == native
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 3  # the double answers in 3 tokens
    # the double's exact prompt: one context token per frame it holds (8) + one per question word (2)
    assert out.usage.prompt_tokens == 10 and out.usage.total_tokens == 13


def test_streamed_equals_non_streamed(app):
    oa = _oa(app)
    whole = oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), temperature=0.0)
    chunks = list(oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == 10


def test_stop_and_max_tokens(app):
    oa = _oa(app)
    cut = oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), stop=[" last"])
    assert cut.choices[0].message.content == "frames=8" and cut.choices[0].finish_reason == "stop"
    streamed = oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), stop="=8", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "frames"
    short = oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), max_tokens=3)
    assert short.choices[0].finish_reason == "length"


def test_media_root_video_opens_a_stream_for_the_request(app):
    oa = _oa(app)
    out = oa.chat.completions.create(model="stc-serve", messages=_msg("clip.mp4"))
    assert out.choices[0].message.content == "frames=8 last=0.88"  # the 8-frame clip at 8 fps, all ingested
    assert [s["stream_id"] for s in app.get("/streams").json()["streams"]] == ["cam"]  # closed afterwards


def test_errors_in_openai_shape(app):
    oa = _oa(app)
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="stc-serve", messages=_msg("stream://nope"))
    assert "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="stc-serve", messages=[{"role": "user", "content": "no video"}])
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), max_tokens=10**6)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), temperature=5)
    with pytest.raises(openai.AuthenticationError):
        _oa(app, key="wrong").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        oa.chat.completions.create(model="stc-serve", messages=_msg("../secret.mp4"))


def test_temperature_top_p_and_seed_reach_the_llm(app):
    oa = _oa(app)
    oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), temperature=0.7, top_p=0.9, seed=3)
    got = app.llm_double.last_sampling
    assert (got.temperature, got.top_p, got.seed) == (0.7, 0.9, 3)
    oa.chat.completions.create(model="stc-serve", messages=_msg("stream://cam"))
    assert app.llm_double.last_sampling.temperature == 0.0  # absent = greedy


def test_real_llm_samples_reproducibly_with_a_seed():
    """The real tiny-model LLM stage: temperature > 0 with a seed repeats itself; temperature 0 is greedy."""
    from cache.kv.config import Sampling

    _, _, llm = tiny_stages_with_context()
    hot = Sampling(temperature=1.5, seed=7)
    a = text_of(llm.ask("s", "what moves?", 12, sampling=hot))
    assert a == text_of(llm.ask("s", "what moves?", 12, sampling=hot))
    greedy = text_of(llm.ask("s", "what moves?", 12))
    assert greedy == text_of(llm.ask("s", "what moves?", 12, sampling=Sampling()))
    assert a != greedy  # near-uniform random-weight logits: sampling at 1.5 leaves the greedy path


def test_real_llm_usage_is_exact_context_attended_plus_question_tokens():
    """The real tiny-model stages (random weights) behind the app: usage.prompt_tokens is the KV tokens the question
    attended to (here every token the stream holds: nothing was evicted) plus the question's tokens as the tokenizer
    counts them (end-of-video piece + templated question); completion_tokens is what the LLM generated. The native
    SSE 'done' event reports the same numbers."""
    import numpy as np

    from serve.core.options import StreamOptions
    from serve.core.stages import LLMStage, VisionStage
    from stream.models import load_adapter

    adapter = load_adapter(None)
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4}, "serve": {"max_streams": 2}})
    llm = LLMStage(adapter, StreamOptions(), 1 << 28)
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), VisionStage(adapter, StreamOptions()), llm)
    client = TestClient(make_api(backend, cfg.serve))
    try:
        assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
        rgb = np.random.default_rng(0).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)  # [frames, H, W, 3]
        r = client.post("/streams/cam/frames?flush=true", content=encode_frames(rgb, [0.0, 0.5, 1.0, 1.5], "raw"),
                        headers={"Content-Type": CONTENT_TYPE})
        assert r.status_code == 200
        _native(client, "cam")  # waits until the chunk is in the KV
        kv = llm.stats("cam")
        question = "what happened?"
        q_tokens = len(adapter.question_ids(question)) + int(adapter.video_end_embeds().shape[0])
        assert q_tokens == adapter.question_embeds(question).shape[0]
        expected = kv.resident_tokens + q_tokens
        assert kv.resident_tokens == kv.stream_tokens > len(adapter.stream_prefix_ids())  # prefix + frames
        out = _oa(client).chat.completions.create(model="stc-serve", messages=_msg("stream://cam"), max_tokens=5)
        assert out.usage.prompt_tokens == expected
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
        done = [e for e in iter_sse(client.post("/streams/cam/questions", json={
            "question": question, "max_new_tokens": 5})) if e[0] == "done"][0][1]
        assert done["prompt_tokens"] == expected and done["completion_tokens"] == 5
    finally:
        backend.shutdown()
