"""When did it happen, and the timeline: moments from block scores (pure functions), the moment and timeline routes
in-process with stage doubles that score by brightness (plumbing only), and every bound over 10,000 frames/items.
The LLM side of the scores is tested against oracles in tests/test_kv_blocks.py, with the tiny model end to end in
tests/test_fleet_model.py."""
from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.core.api import CreateStreamRequest
from serve.core.config import ServiceConfig
from serve.core.local import LocalBackend
from serve.core.moments import BlockScan, Moment, MomentsRequest, ScoredBlock, rank_moments
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.settings import TimelineSettings
from serve.core.timeline import StreamTimeline, ThumbnailRing, build_timeline
from serve.core.watch_events import EventRing
from serve.http.app import make_api
from stream.frames import FrameBatch
from tests.fleet_doubles import ScoringLLMStage
from tests.service_doubles import FakeVisionStage


def _scan(scores: list[float | None], method: str = "yes_no", ids: list[int] | None = None) -> BlockScan:
    ids = ids or list(range(len(scores)))
    return BlockScan(method=method, blocks=[ScoredBlock(block_id=i, tokens=4, pts_start=4.0 * i, pts_end=4.0 * i + 3,
                                                        offloaded=i < 2, score=s) for i, s in zip(ids, scores)])


def test_adjacent_yes_blocks_merge_into_one_moment_from_onset_to_end():
    req = MomentsRequest(query="q", top_k=3, threshold=0.5)
    found = rank_moments("s", req, _scan([0.1, 0.6, 0.9, 0.7, 0.2, 0.55, None]))
    assert [(m.pts_start, m.pts_end, m.blocks, m.best_block) for m in found] == [
        (4.0, 15.0, 3, 2), (20.0, 23.0, 1, 5), (16.0, 19.0, 1, 4)]
    assert found[0].score == 0.9 and found[0].best_pts == 8.0
    gap = rank_moments("s", req, _scan([0.9, 0.9], ids=[3, 5]))  # a dropped block between: two moments
    assert [m.blocks for m in gap] == [1, 1]
    retrieval = rank_moments("s", req.model_copy(update={"top_k": 2}), _scan([0.3, 0.8, 0.9], method="retrieval"))
    assert [m.best_block for m in retrieval] == [2, 1] and all(m.blocks == 1 for m in retrieval)


def test_moments_request_validation():
    with pytest.raises(ValueError, match="since=5.0 is after until=1.0"):
        MomentsRequest(query="q", since=5, until=1)
    with pytest.raises(ValueError):
        MomentsRequest(query="q", top_k=0)


def _frames(values: list[int], t0: float) -> tuple[np.ndarray, list[float]]:
    rgb = np.stack([np.full((24, 32, 3), v, np.uint8) for v in values])
    return rgb, [t0 + i for i in range(len(values))]


@pytest.fixture()
def api():
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"max_streams": 4, "timeline": {"thumbnails_per_stream": 3, "max_top_k": 4},
                                         "watches": {"min_every_s": 0.05}}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), ScoringLLMStage())
    client = TestClient(make_api(backend, cfg.serve))
    client.post("/streams", json={"stream_id": "cam"})
    for k, value in enumerate([20, 20, 240, 230, 20]):  # something bright from t=8 to t=15
        rgb, pts = _frames([value] * 4, 4.0 * k)
        client.post("/streams/cam/frames?flush=true", content=encode_frames(rgb, pts, "raw"),
                    headers={"Content-Type": CONTENT_TYPE})
    deadline = time.monotonic() + 10
    while client.get("/streams/cam").json()["ingest"]["frames_encoded"] < 20:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield client
    backend.shutdown()


def test_moments_route_finds_when_and_keeps_thumbnails_while_the_ring_holds_them(api):
    r = api.post("/streams/cam/moments", json={"query": "Is it bright?", "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    best = body["moments"][0]
    assert (best["pts_start"], best["pts_end"], best["blocks"]) == (8.0, 15.0, 2)
    assert body["scored_blocks"] == body["candidates"] == 5
    thumb = best["thumbnail"]
    assert thumb["pts_start"] == 8.0 and thumb["url"] == f"/streams/cam/thumbnails/{thumb['id']}.jpg"
    jpeg = api.get(thumb["url"])
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert body["moments"][1]["thumbnail"] is None or body["moments"][1]["thumbnail"]["id"] >= 2
    gone = api.get("/streams/cam/thumbnails/0.jpg")  # 5 chunks, a ring of 3
    assert gone.status_code == 404 and "thumbnails_per_stream" in gone.json()["error"]["message"]
    ranged = api.post("/streams/cam/moments", json={"query": "q", "since": 15.5, "top_k": 4}).json()
    assert ranged["candidates"] == 1 and ranged["moments"][0]["pts_start"] == 16.0
    for body, status, needle in (({"query": "q", "top_k": 5}, 422, "serve.timeline.max_top_k"),
                                 ({"query": "q", "since": 3, "until": 1}, 422, "since=3.0 is after"),
                                 ({"query": "q", "method": "guess"}, 422, "method"),
                                 ({"query": "q" * 961}, 413, "max_question_chars")):
        r = api.post("/streams/cam/moments", json=body)
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert api.post("/streams/nope/moments", json={"query": "q", "top_k": 1}).status_code == 404


def test_fleet_moments_rank_streams_together_and_name_failures(api):
    api.post("/streams", json={"stream_id": "dark", "labels": {"site": "x"}})
    rgb, pts = _frames([10] * 4, 0.0)
    api.post("/streams/dark/frames?flush=true", content=encode_frames(rgb, pts, "raw"),
             headers={"Content-Type": CONTENT_TYPE})
    time.sleep(0.3)
    r = api.post("/moments", json={"query": "Is it bright?", "streams": ["dark", "cam", "ghost"], "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["stream_id"] for m in body["moments"]] == ["cam", "cam"]
    assert {s["stream_id"] for s in body["streams"]} == {"dark", "cam"} and "ghost" in body["errors"]
    selected = api.post("/moments", json={"query": "q", "selector": {"site": "x"}, "top_k": 1}).json()
    assert selected["moments"][0]["stream_id"] == "dark"


def test_timeline_orders_alerts_scores_captions_and_moments_with_thumbnails(api):
    api.post("/streams/cam/watches", json={"question": "bright?", "every_s": 0.05, "mode": "yes_no",
                                           "threshold": 0.05})  # the newest chunk is dark: P(yes) = 20 / 255
    api.post("/streams/cam/watches", json={"question": "what?", "every_s": 0.05, "mode": "text"})
    api.post("/streams/cam/moments", json={"query": "Is it bright?", "top_k": 1})
    deadline = time.monotonic() + 10
    while True:
        entries = api.get("/streams/cam/timeline").json()["entries"]
        kinds = {e["kind"] for e in entries}
        if kinds == {"alert", "score", "caption", "moment"}:
            break
        assert time.monotonic() < deadline, kinds
        time.sleep(0.05)
    pts = [e["pts"] for e in entries]
    assert pts == sorted(pts)
    caption = next(e for e in entries if e["kind"] == "caption")
    assert caption["text"] == "frames=20 last=19.00" and caption["thumbnail"]["pts_end"] == 19.0
    moment = next(e for e in entries if e["kind"] == "moment")
    assert (moment["pts"], moment["pts_end"], moment["text"]) == (8.0, 15.0, "Is it bright?")
    only = api.get("/streams/cam/timeline", params={"kinds": "moment,alert", "until": 10}).json()
    assert {e["kind"] for e in only["entries"]} == {"moment"} and [t["pts_start"] for t in only["thumbnails"]] == [8.0]
    bad = api.get("/streams/cam/timeline", params={"kinds": "gossip"})
    assert bad.status_code == 422 and "alert, score, caption, moment" in bad.json()["error"]["message"]
    assert api.get("/streams/nope/timeline").status_code == 404


def test_thumbnail_ring_and_timeline_stores_stay_bounded_over_10000_items():
    ring = ThumbnailRing("s", 64, side=32)
    rgb = np.zeros((48, 64, 3), np.uint8)
    for i in range(10_000):
        rgb[:] = i % 256
        ring.add(rgb, float(i), i + 0.5)
    assert len(ring) == 64 and ring.get(0) is None and ring.get(9_999) is not None
    assert ring.nbytes() < 64 * 32 * 24 * 3  # each at most one raw thumbnail
    assert ring.find(9_950.2).id == 9_950 and ring.find(10.0) is None
    timeline = StreamTimeline("s", TimelineSettings(moments_kept=8, thumbnails_per_stream=4))
    captions = EventRing(16, captions=32)
    for i in range(10_000):
        timeline.add_moments([Moment(stream_id="s", pts_start=float(i), pts_end=i + 1.0, score=0.5, best_block=i,
                                     query="q", method="yes_no")])
        captions.add({"type": "answer", "stream_id": "s", "answer": str(i), "pts": float(i)})
        captions.add({"type": "answer", "stream_id": "s", "score": 0.1, "pts": float(i)})
    events, kept = captions.history()
    assert len(timeline.moments()) == 8 and len(events) == 16 and len(kept) == 32
    assert [e.answer for e in kept][-1] == "9999"
    out = build_timeline("s", timeline, events, kept, limit=20)
    assert len(out.entries) == 20 and out.truncated == (8 + 32 + 8) - 20  # moments, captions, the ring's score ticks
    assert [e.pts for e in out.entries] == sorted(e.pts for e in out.entries)


def test_a_stream_keeps_bounded_thumbnails_over_10000_frames():
    import asyncio

    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"timeline": {"thumbnails_per_stream": 16}}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), ScoringLLMStage())

    async def run() -> None:
        await backend.create(CreateStreamRequest(stream_id="long"))
        for k in range(0, 10_000, 16):  # within the source queue and the chunk queue (4 chunks)
            rgb = np.full((16, 24, 32, 3), k % 256, np.uint8)
            batch = FrameBatch(rgb, np.arange(k, k + 16, dtype=np.float64), np.arange(16))
            await backend.push("long", batch, True)
            backend.host._runner("long").wait_idle(30)
        runner = backend.host._runner("long")
        assert runner.stats().ingest.frames_encoded == 10_000
        assert len(runner.timeline.thumbs) == 16
        assert runner.timeline.thumbs.refs()[-1].pts_end == 9_999.0
        tl = await backend.timeline("long", None, None, None)
        assert len(tl.thumbnails) == 16

    try:
        asyncio.run(run())
    finally:
        backend.shutdown()
