"""Questions across cameras, in-process over HTTP (FastAPI TestClient + LocalBackend, no Ray), with stage doubles
that score by frame brightness (tests/fleet_doubles.py): plumbing only -- which stream must rank first is known from
the pixels, not from a model.

Labels and selectors, the fleet question as SSE (each stream's answer as it finishes, the yes/no ranking), the
questions issued concurrently, ingest carrying on during a slow fleet question, every bound and bad input as a
clear 4xx, several stream:// parts in one OpenAI request, and the Python client over loopback.
"""
from __future__ import annotations

import threading
import time

import openai
import pytest
from fastapi.testclient import TestClient

from serve.core.config import ServiceConfig
from serve.core.local import LocalBackend
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.http.app import make_api
from serve.http.client import StcClient, iter_sse
from tests.fleet_doubles import ScoringLLMStage
from tests.loopback import serve_app
from tests.service_doubles import FakeVisionStage, frames

BRIGHTNESS = {"dock-1": 40, "dock-2": 200, "gate-1": 120}
LABELS = {"dock-1": {"site": "dock", "cam": "1"}, "dock-2": {"site": "dock", "cam": "2"},
          "gate-1": {"site": "gate", "cam": "1"}}


def _setup(delay_s: float = 0.0, **serve: object) -> tuple[TestClient, LocalBackend]:
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"max_streams": 8, **serve}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), ScoringLLMStage(delay_s))
    return TestClient(make_api(backend, cfg.serve)), backend


def _push(client: TestClient, sid: str, start: int, n: int = 8, t0: int = 0) -> None:
    rgb, _ = frames(n, start=start)
    pts = [t0 + i * 0.5 for i in range(n)]
    r = client.post(f"/streams/{sid}/frames?flush=true", content=encode_frames(rgb, pts, "raw"),
                    headers={"Content-Type": CONTENT_TYPE})
    assert r.status_code == 200, r.text


def _cameras(client: TestClient) -> None:
    for sid, labels in LABELS.items():
        assert client.post("/streams", json={"stream_id": sid, "labels": labels}).status_code == 201
        _push(client, sid, BRIGHTNESS[sid])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if all(s["ingest"]["frames_encoded"] == 8 for s in client.get("/streams").json()["streams"]):
            return
        time.sleep(0.02)
    raise AssertionError("frames not encoded")


def _fleet(client: TestClient, body: dict) -> tuple[int, list[tuple[str, dict]]]:
    with client.stream("POST", "/questions", json=body) as resp:
        return resp.status_code, (list(iter_sse(resp)) if resp.status_code == 200 else [])


@pytest.fixture()
def api():
    client, backend = _setup(delay_s=0.3)
    _cameras(client)
    yield client, backend
    backend.shutdown()


def test_labels_are_listed_and_select_streams(api):
    client, _ = api
    streams = client.get("/streams").json()["streams"]
    assert {s["stream_id"]: s["labels"] for s in streams} == LABELS
    dock = client.get("/streams", params={"selector": "site=dock"}).json()["streams"]
    assert [s["stream_id"] for s in dock] == ["dock-1", "dock-2"]
    one = client.get("/streams", params={"selector": "site=dock,cam=2"}).json()["streams"]
    assert [s["stream_id"] for s in one] == ["dock-2"]
    bad = client.get("/streams", params={"selector": "site"})
    assert bad.status_code == 422 and "key=value" in bad.json()["error"]["message"]
    for labels, needle in (({"bad key": "x"}, "bad key"), ({"k": "a\x00b"}, "printable"),
                           ({f"k{i}": "v" for i in range(17)}, "at most 16")):
        r = client.post("/streams", json={"labels": labels})
        assert r.status_code == 422 and needle in r.json()["error"]["message"], r.text


def test_yes_no_fleet_question_streams_answers_and_ranks_them_concurrently(api):
    client, backend = api
    t0 = time.perf_counter()
    status, events = _fleet(client, {"question": "Is there a truck?", "selector": {}, "mode": "yes_no"})
    took = time.perf_counter() - t0
    assert status == 200
    answers = [d for e, d in events if e == "answer"]
    done = events[-1][1]
    assert events[-1][0] == "done" and len(answers) == 3 and done["answered"] == 3 and done["failed"] == 0
    assert [r["stream_id"] for r in done["ranking"]] == ["dock-2", "gate-1", "dock-1"]  # brightest first
    for a in answers:
        assert a["status"] == 200 and a["pts"] == 3.5 and a["frame_index"] == 7
        assert a["score"] == pytest.approx((BRIGHTNESS[a["stream_id"]] + 5.5) / 255, abs=1e-3)  # newest chunk mean
    assert backend.llm.most_active == 3  # the three questions were in the LLM at once, not one after another
    assert took < 3 * 0.3, f"3 questions of 0.3 s took {took:.2f} s: asked serially"
    assert done["first_ms"] <= done["total_ms"]


def test_text_fleet_question_by_ids_with_an_unknown_stream(api):
    client, _ = api
    status, events = _fleet(client, {"question": "what now?", "streams": ["dock-1", "nope", "gate-1", "dock-1"],
                                     "max_new_tokens": 8})
    assert status == 200
    answers = {d["stream_id"]: d for e, d in events if e == "answer"}
    assert set(answers) == {"dock-1", "nope", "gate-1"}  # duplicates asked once
    assert answers["dock-1"]["answer"] == "frames=8 last=3.50" and answers["dock-1"]["completion_tokens"] == 3
    assert answers["dock-1"]["prompt_tokens"] == 8 + 2  # the double: a token per frame seen + per question word
    assert answers["nope"]["status"] == 404 and "nope" in answers["nope"]["error"]["message"]
    assert events[-1][1]["answered"] == 2 and events[-1][1]["failed"] == 1 and events[-1][1]["ranking"] == []


def test_bad_fleet_requests_are_clear_4xx(api):
    client, _ = api
    cases = [
        ({"question": "q", "streams": ["a"], "selector": {"x": "y"}}, 422, "exactly one of"),
        ({"question": "q"}, 422, "exactly one of"),
        ({"question": "q", "streams": ["bad id!"]}, 422, "not a valid id"),
        ({"question": "q", "selector": {"site": "moon"}}, 404, "no open stream matches"),
        ({"question": "q", "selector": {}, "max_new_tokens": 65}, 422, "serve.fleet.max_new_tokens"),
        ({"question": "q" * 961, "selector": {}}, 413, "max_question_chars"),
        ({"question": "q", "selector": {}, "mode": "maybe"}, 422, "mode"),
    ]
    for body, status, needle in cases:
        code, _ = _fleet(client, body)
        r = client.post("/questions", json=body)
        assert (code, r.status_code) == (status, status) and needle in r.json()["error"]["message"], (body, r.text)


def test_fleet_bounds_streams_per_question_and_concurrent_questions():
    client, backend = _setup(delay_s=1.0, fleet={"max_streams": 2, "max_concurrent": 1})
    try:
        _cameras(client)
        r = client.post("/questions", json={"question": "q", "selector": {}})
        assert r.status_code == 413 and "serve.fleet.max_streams" in r.json()["error"]["message"]
        slow = threading.Thread(target=_fleet, args=(client, {"question": "q", "selector": {"site": "dock"},
                                                                "mode": "yes_no"}))
        slow.start()
        deadline = time.monotonic() + 5
        while backend.llm.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = client.post("/questions", json={"question": "q", "streams": ["gate-1"]})
        moments = client.post("/streams/gate-1/moments", json={"query": "q"})
        slow.join()
        for r in (busy, moments):
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert "serve.fleet.max_concurrent=1" in r.json()["error"]["message"]
        assert _fleet(client, {"question": "q", "streams": ["gate-1"]})[0] == 200  # the slot came back
    finally:
        backend.shutdown()


def test_ingest_and_other_questions_carry_on_during_a_slow_fleet_question():
    client, backend = _setup(delay_s=1.5)
    try:
        _cameras(client)
        slow = threading.Thread(target=_fleet, args=(client, {"question": "q", "selector": {}, "mode": "yes_no"}))
        slow.start()
        time.sleep(0.2)
        _push(client, "dock-1", 0, n=8, t0=10)  # a new chunk of a stream being asked right now
        with client.stream("POST", "/streams/gate-1/questions", json={"question": "and you?"}) as resp:
            answered = [d for e, d in iter_sse(resp) if e == "done"]
        deadline = time.monotonic() + 5
        while client.get("/streams/dock-1").json()["ingest"]["frames_encoded"] < 16:
            assert time.monotonic() < deadline, "ingest waited for the fleet question"
            time.sleep(0.02)
        assert slow.is_alive(), "the checks above ran while the fleet question was still in the LLM"
        assert answered and answered[0]["answer"] == "frames=8 last=3.50"
        slow.join()
    finally:
        backend.shutdown()


def test_several_stream_parts_in_one_openai_request(api):
    client, _ = api
    oa = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    content = [{"type": "text", "text": "what now?"}] + [
        {"type": "video_url", "video_url": {"url": f"stream://{sid}"}} for sid in ("gate-1", "dock-1")]
    msg = [{"role": "user", "content": content}]
    out = oa.chat.completions.create(model="stc-serve", messages=msg, max_tokens=8)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.model_extra["stream_id"] for c in out.choices] == ["gate-1", "dock-1"]
    assert [c.message.content for c in out.choices] == ["frames=8 last=3.50"] * 2
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens == 2 * (8 + 2)
    chunks = list(oa.chat.completions.create(model="stc-serve", messages=msg, max_tokens=8, stream=True, stop=[" "]))
    got = {c.choices[0].index: c.choices[0].delta.content for c in chunks if c.choices}
    assert got == {0: "frames=8", 1: "frames=8"} and chunks[-1].usage.total_tokens == 2 * (8 + 2 + 3)
    mixed = [{"role": "user", "content": content + [{"type": "video_url", "video_url": {"url": "clip.mp4"}}]}]
    with pytest.raises(openai.BadRequestError, match="must all be live streams"):
        oa.chat.completions.create(model="stc-serve", messages=mixed)


def test_python_client_over_loopback():
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4}, "serve": {"max_streams": 4}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), ScoringLLMStage())
    try:
        with serve_app(make_api(backend, cfg.serve)) as url, StcClient(url) as c:
            for sid, value in (("a", 30), ("b", 220)):
                c.create_stream(stream_id=sid, labels={"site": "dock"})
                rgb, _ = frames(8, start=value)
                c.push_frames(sid, rgb, [i * 0.5 for i in range(8)], encoding="raw", flush=True)
            assert [s["stream_id"] for s in c.list_streams(selector={"site": "dock"})] == ["a", "b"]
            answers, done = c.fleet("Is it bright?", selector={"site": "dock"}, mode="yes_no", wait_s=5)
            assert len(answers) == 2 and [r["stream_id"] for r in done["ranking"]] == ["b", "a"]
            found = c.moments("b", "Is it bright?", top_k=1)["moments"][0]
            assert (found["pts_start"], found["pts_end"]) == (0.0, 3.5)  # both chunks bright: merged
            assert c.thumbnail("b", found["thumbnail"]["id"])[:2] == b"\xff\xd8"  # a JPEG
            best = c.fleet_moments("Is it bright?", streams=["a", "b"], top_k=1)["moments"]
            assert [m["stream_id"] for m in best] == ["b"]
            assert [e["kind"] for e in c.timeline("b", kinds=["moment"])["entries"]] == ["moment", "moment"]
    finally:
        backend.shutdown()
