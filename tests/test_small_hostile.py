"""The small findings of the hostile probe, each as a test (in process: LocalBackend + stage doubles): out-of-range
seeds, over-long watch questions, too many frames, OpenAI fields the service cannot honour, an offline /docs, an
unknown id on a restarted host, the done event's token count, and model state freed when a stream stops."""
from __future__ import annotations

import re
import time

import msgpack
import pytest
from fastapi.testclient import TestClient

from serve.core.messages import AnswerStats
from serve.core.config import ServiceConfig
from serve.core.directory import StreamDirectory
from serve.core.flow import DirectTransport
from serve.core.hosts import IngestHost
from serve.core.local import LocalBackend
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.http.app import make_api
from serve.http.client import iter_sse
from stream.errors import StreamNotFoundError
from tests.media import make_clip
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames

MSGPACK = {"Content-Type": CONTENT_TYPE}


def _api(llm=None, vision=None, **serve):
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "source": {"reconnect_attempts": 0}, "serve": {"max_streams": 4, **serve}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), vision or FakeVisionStage(),
                           llm or FakeLLMStage())
    return TestClient(make_api(backend, cfg.serve), raise_server_exceptions=False), backend


@pytest.fixture()
def api():
    client, backend = _api()
    assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
    rgb, pts = frames(4)
    assert client.post("/streams/cam/frames?flush=true", content=encode_frames(rgb, pts), headers=MSGPACK)\
        .status_code == 200
    yield client, backend
    backend.shutdown()


def test_a_seed_out_of_range_is_a_4xx_naming_the_range(api):
    client, _ = api
    resp = client.post("/streams/cam/questions", json={"question": "q", "temperature": 1, "seed": 2**80})
    assert resp.status_code == 422 and "seed" in resp.json()["error"]["message"], resp.text
    assert "9223372036854775807" in resp.json()["error"]["message"]
    chat = client.post("/v1/chat/completions", json={"model": "stc-serve", "seed": -1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "q"},
                                     {"type": "video_url", "video_url": {"url": "stream://cam"}}]}]})
    assert chat.status_code == 400 and "seed" in chat.json()["error"]["message"]
    ok = client.post("/streams/cam/questions", json={"question": "q", "temperature": 1, "seed": 2**63 - 1})
    assert ok.status_code == 200


def test_a_watch_question_has_the_question_limit(api):
    client, _ = api
    resp = client.post("/streams/cam/watches", json={"question": "x" * 2000, "every_s": 1})
    assert resp.status_code == 413, resp.text
    msg = resp.json()["error"]["message"]
    assert "2000 characters" in msg and "960" in msg and "serve.max_question_chars" in msg and "Fix:" in msg
    assert client.post("/streams/cam/watches", json={"question": "x" * 960, "every_s": 1}).status_code == 201


def test_too_many_frames_is_a_413_however_many(api):
    client, _ = api
    for n in (257, 5000):
        body = msgpack.packb({"v": 1, "encoding": "raw", "pts": [i / 10 for i in range(n)], "shape": [n, 2, 2, 3],
                              "dtype": "uint8", "data": bytes(n * 12)}, use_bin_type=True)
        resp = client.post("/streams/cam/frames", content=body, headers=MSGPACK)
        assert resp.status_code == 413, (n, resp.text)
        assert "256" in resp.json()["error"]["message"] and "Fix:" in resp.json()["error"]["message"]


def _chat(**fields):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                      {"type": "video_url", "video_url": {"url": "stream://cam"}}]}],
            **fields}


def test_the_openai_endpoint_refuses_an_unknown_model_and_several_choices(api):
    client, _ = api
    bad = client.post("/v1/chat/completions", json=_chat(model="gpt-4o"))
    assert bad.status_code == 400 and "'gpt-4o'" in bad.json()["error"]["message"]
    assert "'stc-serve'" in bad.json()["error"]["message"]
    two = client.post("/v1/chat/completions", json=_chat(model="stc-serve", n=2))
    message = two.json()["error"]["message"]
    assert two.status_code == 400 and "n=2" in message and "n=1" in message
    ok = client.post("/v1/chat/completions", json=_chat(model="stc-serve", n=1))
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_docs_work_offline(api):
    client, _ = api
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert "/streams/{stream_id}/questions" in text and "QuestionRequest" in text
    links = re.findall(r"(?:src|href)=['\"]?([^'\" >]+)", text)
    assert "<script" not in text and all(not link.startswith(("http", "//")) for link in links), links  # offline
    assert "/docs/swagger" in text and client.get("/docs/swagger").status_code == 200


def test_an_id_that_never_existed_is_not_blamed_on_a_restart():
    cfg = ServiceConfig.parse({})
    host = IngestHost(DirectTransport(FakeVisionStage(), FakeLLMStage()), cfg.source, cfg.serve.ingest, 60.0,
                      restarted=True, directory=StreamDirectory(4), name="h0")
    with pytest.raises(StreamNotFoundError) as info:
        host.stats("never-was")
    assert "restarted" not in str(info.value) and "no open stream 'never-was'" in str(info.value)


class _SilentLLM(FakeLLMStage):
    """An answer of 16 tokens that decode to no text (special tokens): no text piece at all."""

    def ask(self, stream_id, question, max_new_tokens=64, sampling=None):
        yield AnswerStats(attended_tokens=3, question_tokens=2, prompted=True)
        yield AnswerStats(attended_tokens=3, question_tokens=2, prompted=True, new_tokens=16, done=True)


def test_the_done_event_counts_tokens_as_usage_does():
    client, backend = _api(llm=_SilentLLM())
    try:
        assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
        resp = client.post("/streams/cam/questions", json={"question": "q"})
        done = [data for kind, data in iter_sse(resp) if kind == "done"][0]
        assert done["answer"] == "" and done["tokens"] == done["completion_tokens"] == 16
    finally:
        backend.shutdown()


def test_a_file_stream_that_ended_frees_its_vision_state_and_keeps_answering(tmp_path):
    make_clip(tmp_path / "clip.mp4", num_frames=8, fps=8, size=(32, 24))
    vision, llm = FakeVisionStage(), FakeLLMStage()
    client, backend = _api(llm=llm, vision=vision, media_root=str(tmp_path))
    try:
        assert client.post("/streams", json={"source": "clip.mp4", "stream_id": "f"}).status_code == 201
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ("f" in vision.streams or client.get("/streams/f").json()["state"]
                                               != "ended"):
            time.sleep(0.02)
        st = client.get("/streams/f").json()
        assert st["state"] == "ended" and "f" not in vision.streams  # the slot is free at once, not after the TTL
        assert st["vision"]["frames"] == 8 and st["cache_reuse"] == 0.5  # the last counters stay readable
        assert "f" in llm.seen  # the context stays: questions about the file still work
        resp = client.post("/streams/f/questions", json={"question": "what?"})
        assert resp.status_code == 200 and "frames=8" in [d for k, d in iter_sse(resp) if k == "done"][0]["answer"]
        assert client.delete("/streams/f").status_code == 200 and "f" not in llm.seen
    finally:
        backend.shutdown()


class _BrokenLLM(FakeLLMStage):
    def append(self, stream_id, chunk):
        raise RuntimeError("the LLM broke")


def test_a_failed_stream_frees_its_model_state_and_its_capacity():
    vision, llm = FakeVisionStage(), _BrokenLLM()
    client, backend = _api(llm=llm, vision=vision, max_streams=2)
    try:
        assert client.post("/streams", json={"stream_id": "bad"}).status_code == 201
        rgb, pts = frames(4)
        client.post("/streams/bad/frames?flush=true", content=encode_frames(rgb, pts), headers=MSGPACK)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and ("bad" in vision.streams or "bad" in llm.seen):
            time.sleep(0.02)
        st = client.get("/streams/bad").json()
        assert st["state"] == "failed" and "the LLM broke" in st["error"]
        assert "bad" not in vision.streams and "bad" not in llm.seen  # both freed at once
        asked = client.post("/streams/bad/questions", json={"question": "q"})
        assert asked.status_code == 409 and "the LLM broke" in asked.json()["error"]["message"]  # never rebuilt
        assert [client.post("/streams", json={"stream_id": f"s{i}"}).status_code for i in range(2)] == [201, 201]
        assert client.post("/streams", json={"stream_id": "s3"}).status_code == 429  # the failed one holds no slot
    finally:
        backend.shutdown()
