"""Standing questions over the in-process app (LocalBackend + stage doubles): text answers as SSE events with the
pts/frame index they saw, yes/no alerts with hysteresis (a held condition fires once), the per-stream bound, watches
ending with their stream, the event ring bound, and webhooks to a local 127.0.0.1 receiver (allowlisted)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fastapi.testclient import TestClient

from serve.client import iter_sse
from serve.config import ServiceConfig
from serve.http_app import make_api
from serve.protocol import CONTENT_TYPE, encode_frames
from serve.streams import LocalBackend
from serve.watches import WatchSettings
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames


class ScriptedLLM(FakeLLMStage):
    """The answer double, plus ``score_choices`` returning P(yes) from a script (then its last value)."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.script = list(script)

    def score_choices(self, stream_id: str, question: str, choices: list[str]) -> list[float]:
        p = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return [p, 1.0 - p]


def _app(script=(0.0,), **watch):
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"max_streams": 4}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), ScriptedLLM(list(script)))
    app = make_api(backend, cfg.serve)
    if watch:  # tighter bounds for a test
        app.state.watches.settings = WatchSettings(**{**app.state.watches.settings.model_dump(), **watch})
        app.state.watches.webhooks.allowed = set(watch.get("webhook_hosts", []))
    return app, backend


def _open(client: TestClient, sid: str = "cam") -> None:
    assert client.post("/streams", json={"stream_id": sid}).status_code == 201
    rgb, pts = frames(8)
    assert client.post(f"/streams/{sid}/frames?flush=true", content=encode_frames(rgb, pts, "raw"),
                       headers={"Content-Type": CONTENT_TYPE}).status_code == 200
    assert client.post(f"/streams/{sid}/questions", json={"question": "sync", "wait_s": 2}).status_code == 200


def _events(app, sid: str, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = app.state.watches.events.get(sid)
        if log is not None and len(log.since(0)) >= n:
            return log.since(0)
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} events after {timeout}s")


def test_text_watch_answers_as_sse_with_pts_and_frame_index():
    app, backend = _app()
    with TestClient(app) as client:
        _open(client)
        r = client.post("/streams/cam/watches", json={"question": "what?", "every_s": 0.2})
        assert r.status_code == 201
        _events(app, "cam", 2)
        with client.stream("GET", "/streams/cam/events") as resp:
            got = []
            for kind, data in iter_sse(resp.iter_lines()):
                got.append((kind, data))
                if len(got) == 2:
                    break
        assert [k for k, _ in got] == ["answer", "answer"]
        ev = got[0][1]
        assert ev["answer"] == "frames=8 last=0.70" and ev["frame_index"] == 7 and ev["pts"] == pytest.approx(0.7)
        assert [w["watch_id"] for w in client.get("/streams/cam/watches").json()["watches"]] == [r.json()["watch_id"]]
        assert client.delete(f"/streams/cam/watches/{r.json()['watch_id']}").status_code == 200
        assert client.get("/streams/cam/watches").json()["watches"] == []
    backend.shutdown()


def test_yes_no_alert_fires_once_while_held_and_rearms_with_hysteresis():
    # P(yes) per tick: rises, holds above, dips inside the hysteresis band (no re-arm), falls, rises again
    script = [0.1, 0.9, 0.95, 0.55, 0.9, 0.2, 0.8, 0.1]
    app, backend = _app(script)
    with TestClient(app) as client:
        _open(client)
        assert client.post("/streams/cam/watches", json={"question": "is there a person?", "every_s": 0.2,
                                                         "mode": "yes_no", "threshold": 0.6,
                                                         "hysteresis": 0.1}).status_code == 201
        evs = _events(app, "cam", len(script) + 2)
    backend.shutdown()
    answers = [e["score"] for e in evs if e["type"] == "answer"][:len(script)]
    assert answers == pytest.approx(script)
    alerts = [e for e in evs if e["type"] == "alert"]
    assert [a["score"] for a in alerts] == pytest.approx([0.9, 0.8])  # 0.95/0.55/0.9 held; re-armed by 0.2
    assert alerts[0]["frame_index"] == 7


def test_bounds_and_watches_end_with_their_stream():
    app, backend = _app(max_watches_per_stream=2, max_events_per_stream=3)
    with TestClient(app) as client:
        _open(client)
        body = {"question": "q", "every_s": 0.2}
        assert client.post("/streams/cam/watches", json=body).status_code == 201
        assert client.post("/streams/cam/watches", json=body).status_code == 201
        r = client.post("/streams/cam/watches", json=body)
        assert r.status_code == 429 and "maximum" in r.json()["error"]["message"]
        assert client.post("/streams/nope/watches", json=body).status_code == 404
        assert client.post("/streams/cam/watches", json={**body, "every_s": 0.01}).status_code == 400
        assert client.post("/streams/cam/watches", json={**body, "bogus": 1}).status_code == 422
        _events(app, "cam", 3)
        time.sleep(0.6)
        assert len(app.state.watches.events["cam"].ring) == 3  # the ring holds its bound
        tasks = list(app.state.watches.tasks.values())
        assert client.delete("/streams/cam").status_code == 200
        time.sleep(0.1)
        assert all(t.done() for t in tasks) and app.state.watches.tasks == {}
        assert client.get("/streams/cam/watches").status_code == 404
    backend.shutdown()


class _Receiver(BaseHTTPRequestHandler):
    got: list[dict] = []
    fail_first = 1

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Receiver.fail_first > 0:  # the first delivery fails: the sender must retry
            _Receiver.fail_first -= 1
            self.send_response(503)
        else:
            _Receiver.got.append(body)
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_delivery_with_retry_and_allowlist():
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    app, backend = _app([0.9], webhook_hosts=["127.0.0.1"])
    try:
        with TestClient(app) as client:
            _open(client)
            bad = client.post("/streams/cam/watches", json={"question": "q", "every_s": 0.2,
                                                            "webhook": "http://example.com/x"})
            assert bad.status_code == 403 and "not allowed" in bad.json()["error"]["message"]
            assert client.post("/streams/cam/watches", json={"question": "person?", "every_s": 0.2, "mode": "yes_no",
                                                             "webhook": url}).status_code == 201
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(e["type"] == "alert" for e in _Receiver.got):
                time.sleep(0.05)
        assert any(e["type"] == "alert" and e["stream_id"] == "cam" for e in _Receiver.got)
        assert app.state.watches.webhooks.delivered >= 1
    finally:
        server.shutdown()
        backend.shutdown()


def test_real_llm_score_choices_matches_greedy_and_restores_context():
    """The real tiny-model LLM stage (random weights): the scoring logits' argmax is the greedy answer's first token,
    scoring leaves the context untouched (the answer after it is the same), and the yes/no score is a probability."""
    import numpy as np
    import torch

    from serve.stages import LLMStage, VisionStage
    from serve.options import StreamOptions
    from stream.frames import FrameBatch
    from stream.models import load_adapter

    adapter = load_adapter(None)
    vision, llm = VisionStage(adapter, StreamOptions()), LLMStage(adapter, StreamOptions(), 1 << 28)
    vision.open("s")
    llm.open("s")
    rgb = np.random.default_rng(0).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)  # [frames, H, W, 3]
    llm.append(vision.encode("s", FrameBatch(rgb, np.arange(4) / 1.0, np.arange(4))))
    q = adapter.question_embeds("is there a person?")  # [Lq, d]
    before = "".join(llm.ask("s", "is there a person?", 4))
    logits = llm.engine.next_logits("s", q)  # [vocab]
    assert int(logits.argmax()) == next(iter(llm.engine.ask("s", q, 1, [])))
    p = llm.score_choices("s", "is there a person?", ["yes", "no"])
    assert p == llm.score_choices("s", "is there a person?", ["yes", "no"])
    assert all(0 < x < 1 for x in p) and sum(p) <= 1
    assert torch.equal(llm.engine.next_logits("s", q), logits)
    assert "".join(llm.ask("s", "is there a person?", 4)) == before
