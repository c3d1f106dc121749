"""Standing questions: over the in-process app (LocalBackend + stage doubles) -- text answers as SSE events with the
pts/frame index they saw, yes/no alerts with hysteresis (a held condition fires once), the per-stream bound, watches
ending with their stream (closed, a file that ended, reaped by an ingest host) with a final ``end`` event that closes
the SSE stream, webhooks to a local 127.0.0.1 receiver (allowlisted) -- and the WatchHub alone (a scripted asker):
the event ring bound over 10,000 events, the bound on ended rings, and the rate limit."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fastapi.testclient import TestClient

from serve.core.messages import text_of
from serve.core.runner import StreamPlan
from serve.http.client import iter_sse
from serve.core.config import ServiceConfig
from serve.http.app import make_api
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.local import LocalBackend
from serve.core.watchset import ENDED_KEPT, EventRing, WatchHub, WatchRequest
from serve.http.watches import WatchSettings
from stream.errors import StreamNotFoundError
from tests.media import make_clip
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames, tiny_stages_with_context


class ScriptedLLM(FakeLLMStage):
    """The answer double, plus ``score_choices`` returning P(yes) from a script (then its last value)."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.script = list(script)

    def score_choices(self, stream_id: str, question: str, choices: list[str]) -> list[float]:
        p = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return [p, 1.0 - p]


def _app(script=(0.0,), media=None, **watch):
    serve = {"max_streams": 4, "watches": watch}
    if media is not None:
        serve["media_root"] = str(media)
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4}, "serve": serve})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), ScriptedLLM(list(script)))
    return make_api(backend, cfg.serve), backend


def _open(client: TestClient, sid: str = "cam") -> None:
    assert client.post("/streams", json={"stream_id": sid}).status_code == 201
    rgb, pts = frames(8)
    assert client.post(f"/streams/{sid}/frames?flush=true", content=encode_frames(rgb, pts, "raw"),
                       headers={"Content-Type": CONTENT_TYPE}).status_code == 200
    assert client.post(f"/streams/{sid}/questions", json={"question": "sync", "wait_s": 2}).status_code == 200


def _events(backend, sid: str, n: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        page = backend.watches.events(sid, 0, 0.2)
        if len(page.events) >= n:
            return [e.body() for e in page.events]
    raise AssertionError(f"fewer than {n} events after {timeout}s")


def test_text_watch_answers_as_sse_with_pts_and_frame_index():
    app, backend = _app()
    with TestClient(app) as client:
        _open(client)
        r = client.post("/streams/cam/watches", json={"question": "what?", "every_s": 0.2})
        assert r.status_code == 201
        _events(backend, "cam", 2)
        with client.stream("GET", "/streams/cam/events") as resp:
            got = []
            for kind, data in iter_sse(resp):
                got.append((kind, data))
                if len(got) == 2:
                    break
        assert [k for k, _ in got] == ["answer", "answer"]
        ev = got[0][1]
        assert ev["answer"] == "frames=8 last=0.70" and ev["frame_index"] == 7 and ev["pts"] == pytest.approx(0.7)
        assert [w["watch_id"] for w in client.get("/streams/cam/watches").json()["watches"]] == [r.json()["watch_id"]]
        assert client.delete(f"/streams/cam/watches/{r.json()['watch_id']}").status_code == 200
        assert client.get("/streams/cam/watches").json()["watches"] == []
        assert client.delete(f"/streams/cam/watches/{r.json()['watch_id']}").status_code == 404
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
        evs = _events(backend, "cam", len(script) + 2)
    backend.shutdown()
    answers = [e["score"] for e in evs if e["type"] == "answer"][:len(script)]
    assert answers == pytest.approx(script)
    alerts = [e for e in evs if e["type"] == "alert"]
    assert [a["score"] for a in alerts] == pytest.approx([0.9, 0.8])  # 0.95/0.55/0.9 held; re-armed by 0.2
    assert alerts[0]["frame_index"] == 7


def _read_until_end(client: TestClient, sid: str, out: list) -> None:
    with client.stream("GET", f"/streams/{sid}/events") as resp:
        out.extend(iter_sse(resp))  # returns only when the server closes the stream


def test_bounds_and_watches_end_when_their_stream_is_closed():
    app, backend = _app(max_watches_per_stream=2, max_events_per_stream=3)
    with TestClient(app) as client:
        _open(client)
        body = {"question": "q", "every_s": 0.2}
        assert client.post("/streams/cam/watches", json=body).status_code == 201
        assert client.post("/streams/cam/watches", json=body).status_code == 201
        r = client.post("/streams/cam/watches", json=body)
        assert r.status_code == 429 and "maximum" in r.json()["error"]["message"]
        assert client.post("/streams/nope/watches", json=body).status_code == 404
        assert client.get("/streams/nope/events").status_code == 404
        assert client.post("/streams/cam/watches", json={**body, "every_s": 0.01}).status_code == 400
        assert client.post("/streams/cam/watches", json={**body, "bogus": 1}).status_code == 422
        _events(backend, "cam", 3)
        time.sleep(0.6)
        page = backend.watches.events("cam", 0)
        assert len(page.events) == 3 and page.last_seq > 3  # the ring holds its bound; readers skip to the oldest
        got: list = []
        reader = threading.Thread(target=_read_until_end, args=(client, "cam", got))
        reader.start()
        time.sleep(0.5)
        assert client.delete("/streams/cam").status_code == 200
        reader.join(timeout=10)
        assert not reader.is_alive(), "the SSE stream did not close after the end event"
        assert got[-1][0] == "end" and got[-1][1]["reason"] == "closed" and got[-1][1]["watches_stopped"] == 2
        asked = backend.watches.counts()["asked"]
        time.sleep(0.6)
        assert backend.watches.counts() == {"watches": 0, "rings": 0, "ended_rings": 1, "asked": asked}
        assert client.get("/streams/cam/watches").status_code == 404
        assert backend.watches.events("cam", 0).ended  # a late reader of the closed stream gets its end
        _open(client)  # the id names a new stream now: its events start afresh, not with the old end
        page = backend.watches.events("cam", 0)
        assert not page.ended and page.events == []
    backend.shutdown()


def test_watches_end_when_a_file_stream_reaches_its_end(tmp_path):
    make_clip(tmp_path / "clip.mp4", num_frames=40, fps=10, size=(32, 24))
    app, backend = _app(media=tmp_path)
    backend.vision.delay_s = 0.3  # 10 chunks of 4 frames: ingest takes ~3 s, the watch ticks meanwhile
    with TestClient(app) as client:
        assert client.post("/streams", json={"stream_id": "file", "source": "clip.mp4"}).status_code == 201
        assert client.post("/streams/file/watches", json={"question": "what?", "every_s": 0.2}).status_code == 201
        got: list = []
        _read_until_end(client, "file", got)  # returns when the stream's file ended
        assert client.get("/streams/file").json()["state"] == "ended"
        assert got[-1][0] == "end" and got[-1][1]["reason"] == "ended"
        assert [k for k, _ in got[:-1]] and {k for k, _ in got[:-1]} == {"answer"}
        assert client.get("/streams/file/watches").json()["watches"] == []
        r = client.post("/streams/file/watches", json={"question": "what?", "every_s": 0.2})
        assert r.status_code == 409 and "ended" in r.json()["error"]["message"]
        late: list = []
        _read_until_end(client, "file", late)  # a late reader still gets the end event, then the stream closes
        assert late[-1][1]["reason"] == "ended"
    backend.shutdown()


def test_an_ingest_host_ends_watches_of_a_reaped_stream():
    """The in-process IngestHost (the class the Ray actor runs, here over direct stage calls) owns the watches."""
    from serve.core.flow import DirectTransport
    from serve.core.hosts import IngestHost

    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4}})
    host = IngestHost(DirectTransport(FakeVisionStage(), FakeLLMStage()), cfg.source, cfg.serve.ingest, ttl_s=1.5)
    host.create(StreamPlan("cam", None, "memory://", cfg.stream_options()))
    watch = host.add_watch("cam", WatchRequest(question="what?", every_s=0.2))
    assert [w.watch_id for w in host.list_watches("cam")] == [watch.watch_id]
    deadline = time.monotonic() + 15
    page = host.watch_events("cam", 0, 1.0)
    while not page.ended and time.monotonic() < deadline:  # watch ticks do not count as activity: it is reaped
        page = host.watch_events("cam", page.last_seq, 1.0)
    assert page.ended and page.events[-1].type == "end" and page.events[-1].reason == "reaped"
    while host.reaped == 0 and time.monotonic() < deadline:  # the reaper counts it once close() returned
        time.sleep(0.05)
    assert host.ids() == [] and host.reaped == 1
    with pytest.raises(StreamNotFoundError):
        host.list_watches("cam")


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
        assert backend.watches.webhooks.delivered >= 1
    finally:
        server.shutdown()
        backend.shutdown()


# ---- the hub alone ------------------------------------------------------------------------------------------------
class _Asker:
    """A scripted :class:`serve.core.watchset.WatchAsker`: streams in ``open``, each ask counted."""

    def __init__(self, streams=("a",)) -> None:
        self.open = {s: "running" for s in streams}
        self.asks: list[float] = []

    def seen(self, sid):
        if sid not in self.open:
            raise StreamNotFoundError(f"no open stream {sid!r}")
        return 1.0, 9, self.open[sid]

    def ask_text(self, sid, question, max_new_tokens):
        self.asks.append(time.monotonic())
        return "ok"

    def score_yes_no(self, sid, question):
        self.asks.append(time.monotonic())
        return 0.0


def test_event_ring_holds_its_bound_over_10000_events():
    ring = EventRing(256)
    for i in range(10_000):
        ring.add({"type": "answer", "stream_id": "s", "answer": str(i)})
        assert len(ring.ring) <= 256
    assert ring.seq == 10_000 and len(ring.ring) == 256
    kept = ring.since(0)
    assert [e.seq for e in kept] == list(range(10_000 - 255, 10_001)) and kept[-1].answer == "9999"
    assert ring.since(9_990) == kept[-10:]
    assert ring.end({"type": "end", "stream_id": "s", "reason": "closed"})
    assert not ring.end({"type": "end", "stream_id": "s", "reason": "again"})
    assert ring.add({"type": "answer", "stream_id": "s"}) is None and ring.since(10_000)[0].reason == "closed"
    t0 = time.monotonic()
    ring.wait(10_001, timeout_s=5.0)  # an ended ring never makes a reader wait
    assert time.monotonic() - t0 < 1.0


def test_hub_keeps_a_bounded_number_of_ended_rings_and_frees_live_ones():
    asker = _Asker([f"s{i}" for i in range(ENDED_KEPT + 40)])
    hub = WatchHub(asker, WatchSettings(max_events_per_stream=8))
    for sid in list(asker.open):
        hub.events(sid)  # a reader made the ring
        for _ in range(20):
            hub._rings[sid].add({"type": "answer", "stream_id": sid})
        assert hub.end_stream(sid, "closed") == 0
    counts = hub.counts()
    assert counts["rings"] == 0 and counts["ended_rings"] == ENDED_KEPT
    assert all(len(r.ring) == 8 for r in hub._ended.values())
    with pytest.raises(StreamNotFoundError):  # s0's ring was dropped, and the stream is gone
        asker.open.pop("s0")
        hub.events("s0")
    hub.shutdown()


def test_hub_rate_limit_bounds_watch_questions():
    asker = _Asker(["a", "b"])
    hub = WatchHub(asker, WatchSettings(asks_per_s=5.0, min_every_s=0.05, max_watches_per_stream=4))
    for sid in ("a", "b"):
        for _ in range(4):
            hub.add(sid, WatchRequest(question="q", every_s=0.05))  # 8 watches wanting 160 asks/s
    time.sleep(2.0)
    hub.shutdown()
    gaps = [b - a for a, b in zip(asker.asks, asker.asks[1:])]
    assert 5 <= len(asker.asks) <= 12  # ~5/s over 2 s, not 320
    assert min(gaps) >= 0.19  # one at a time, at most asks_per_s
    with pytest.raises(Exception) as e:
        WatchHub(asker, WatchSettings(max_watches_per_stream=1)).add("gone", WatchRequest(question="q", every_s=1))
    assert isinstance(e.value, StreamNotFoundError)


def test_real_llm_score_choices_matches_greedy_and_restores_context():
    """The real tiny-model LLM stage (random weights): the scoring logits' argmax is the greedy answer's first token,
    scoring leaves the context untouched (the answer after it is the same), and the yes/no score is a probability."""
    import torch

    adapter, _, llm = tiny_stages_with_context()
    q = adapter.question_embeds("is there a person?")  # [Lq, d]
    before = text_of(llm.ask("s", "is there a person?", 4))
    logits = llm.engine.next_logits("s", q)  # [vocab]
    assert int(logits.argmax()) == next(iter(llm.engine.ask("s", q, 1, [])))
    p = llm.score_choices("s", "is there a person?", ["yes", "no"])
    assert p == llm.score_choices("s", "is there a person?", ["yes", "no"])
    assert all(0 < x < 1 for x in p) and sum(p) <= 1
    assert torch.equal(llm.engine.next_logits("s", q), logits)
    assert text_of(llm.ask("s", "is there a person?", 4)) == before
