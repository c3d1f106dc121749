"""Long-lived requests cannot take the API down: event readers and streamed answers are capped per stream and per
ingress replica (429 with Retry-After past either), their slots come back when a client goes away, and while the
cap is full, health checks, pushes and creates still answer at once. Served by uvicorn on 127.0.0.1 (LocalBackend
+ stage doubles), with real concurrent SSE readers."""
from __future__ import annotations

import time
from contextlib import ExitStack

import httpx
import pytest

from serve.core.config import ServiceConfig
from serve.core.local import LocalBackend
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.http.app import make_api
from stream.errors import ConfigError
from tests.loopback import serve_app
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames

MSGPACK = {"Content-Type": CONTENT_TYPE}


def test_readers_are_capped_per_stream_and_per_replica_and_short_requests_still_answer():
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 2},
                               "serve": {"max_streams": 8, "max_readers_per_stream": 2,
                                         "max_long_lived_per_replica": 4}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), FakeLLMStage())
    app = make_api(backend, cfg.serve)
    try:
        with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as client, ExitStack() as readers:
            for sid in ("a", "b", "c"):
                assert client.post("/streams", json={"stream_id": sid}).status_code == 201

            def reader(sid: str) -> httpx.Response:
                return readers.enter_context(client.stream("GET", f"/streams/{sid}/events"))

            assert [reader("a").status_code for _ in range(2)] == [200, 200]
            third = reader("a")
            assert third.status_code == 429 and third.headers["Retry-After"] == "1"
            third.read()
            assert "serve.max_readers_per_stream=2" in third.json()["error"]["message"]
            assert [reader("b").status_code for _ in range(2)] == [200, 200]
            full = reader("c")  # 4 readers open on this replica: its maximum
            assert full.status_code == 429
            full.read()
            assert "serve.max_long_lived_per_replica=4" in full.json()["error"]["message"]
            asked = client.post("/streams/c/questions", json={"question": "q"})  # answers are long-lived too
            assert asked.status_code == 429
            t0 = time.monotonic()  # the short requests are never starved by the readers
            assert client.get("/health").status_code == 200
            assert client.post("/streams", json={"stream_id": "d"}).status_code == 201
            rgb, pts = frames(2)
            assert client.post("/streams/d/frames", content=encode_frames(rgb, pts), headers=MSGPACK).status_code \
                == 200
            assert client.get("/streams").status_code == 200
            assert time.monotonic() - t0 < 2.0
            assert 'stc_long_lived_open 4.0' in client.get("/metrics").text
            readers.close()  # the clients go away: their slots come back
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and app.state.gate.counts()["open"]:
                time.sleep(0.05)
            assert app.state.gate.counts()["open"] == 0
            with client.stream("GET", "/streams/c/events") as again:
                assert again.status_code == 200
            resp = client.post("/streams/c/questions", json={"question": "q"})
            assert resp.status_code == 200
    finally:
        backend.shutdown()


def test_long_lived_requests_may_not_take_the_ingress_slots():
    with pytest.raises(ConfigError, match="max_long_lived_per_replica=250") as info:
        ServiceConfig.parse({"serve": {"max_long_lived_per_replica": 250}})  # ingress.max_ongoing_requests = 256
    assert "<= 192" in str(info.value) and "Fix:" in str(info.value)
    ok = ServiceConfig.parse({"serve": {"max_long_lived_per_replica": 250, "ingress": {"max_ongoing_requests": 400}}})
    assert ok.serve.max_long_lived_per_replica == 250
