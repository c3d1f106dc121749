"""Each finding of the hostile test of the service, as a test (in-process: LocalBackend, IngestHost, no Ray).

The real-cluster ones (SIGKILLed replicas and hosts, 20 concurrent creates) are in tests/test_service_ray.py.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.core.runner import StreamPlan
from serve.core.api import QuestionRequest, StreamExistsError, StreamStateError
from serve.core.config import ServiceConfig
from serve.core.flow import DirectTransport
from serve.core.hosts import IngestHost
from serve.http.app import make_api
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.local import LocalBackend
from stream.errors import ConfigError, StreamNotFoundError
from stream.frames import FrameBatch
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames

MSGPACK = {"Content-Type": CONTENT_TYPE}


def _cfg(**serve) -> ServiceConfig:
    return ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 2}, "serve": {"max_streams": 4,
                                                                                            **serve}})


@pytest.fixture()
def api():
    cfg = _cfg()
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), FakeLLMStage())
    yield TestClient(make_api(backend, cfg.serve), raise_server_exceptions=False), backend
    backend.shutdown()


def test_an_internal_error_is_counted_as_5xx_and_keeps_the_error_shape(api):
    client, backend = api

    async def broken(stream_id):
        raise RuntimeError("disk on fire")

    backend.stats = broken
    resp = client.get("/streams/x")
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "RuntimeError"
    assert 'stc_http_requests_total{route="/streams/{stream_id}",status="500"} 1.0' in client.get("/metrics").text


def test_unknown_routes_answer_the_error_shape(api):
    client, _ = api
    resp = client.get("/nope")
    assert resp.status_code == 404 and set(resp.json()) == {"error"}
    assert "GET /nope" in resp.json()["error"]["message"]
    assert client.put("/streams").status_code == 405 and "error" in client.put("/streams").json()


def test_question_limits_agree_with_the_kv_reserve():
    with pytest.raises(ConfigError, match="kv.reserve_tokens=1536"):
        _cfg(max_question_chars=4000)
    cfg = ServiceConfig.parse({})
    assert cfg.serve.max_question_chars + cfg.serve.max_new_tokens + 64 <= cfg.kv.reserve_tokens


def test_absurd_pts_is_refused_and_the_stream_stays_usable(api):
    client, _ = api
    client.post("/streams", json={"stream_id": "p"})
    rgb, _ = frames(1)
    bad = client.post("/streams/p/frames", content=encode_frames(rgb, [1e308]), headers=MSGPACK)
    assert bad.status_code == 422 and "within" in bad.json()["error"]["message"]
    good = client.post("/streams/p/frames", content=encode_frames(rgb, [0.0]), headers=MSGPACK)
    assert good.status_code == 200  # before the fix every later push was 422 ('pts backwards')


def test_nul_byte_in_a_source_is_a_400(api):
    client, _ = api
    resp = client.post("/streams", json={"source": "a\u0000b.mp4"})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "InvalidSourceError"


class _SlowOpenVision(FakeVisionStage):
    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def open(self, stream_id, options=None):
        self.gate.wait(5)
        super().open(stream_id, options)


def _host(vision=None, ttl_s: float = 60.0) -> IngestHost:
    cfg = _cfg()
    return IngestHost(DirectTransport(vision or FakeVisionStage(), FakeLLMStage()), cfg.source, cfg.serve.ingest,
                      ttl_s)


def test_delete_while_the_create_is_in_flight_is_a_4xx_and_the_create_completes():
    gate = threading.Event()
    host = _host(_SlowOpenVision(gate))
    opts = _cfg().stream_options()
    made = []
    t = threading.Thread(target=lambda: made.append(host.create(StreamPlan("s", None, "memory://", opts))))
    t.start()
    time.sleep(0.2)
    with pytest.raises(StreamStateError, match="still being created"):
        host.close("s")
    gate.set()
    t.join(5)
    assert made and host.ids() == ["s"]
    assert host.close("s").state == "closed" and host.ids() == []


def test_idle_and_ended_streams_are_reaped_and_free_their_stage_state():
    vision, llm = FakeVisionStage(), FakeLLMStage()
    cfg = _cfg()
    host = IngestHost(DirectTransport(vision, llm), cfg.source, cfg.serve.ingest, ttl_s=0.3)
    host.create(StreamPlan("idle", None, "memory://", cfg.stream_options()))
    host.create(StreamPlan("busy", None, "memory://", cfg.stream_options()))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "idle" in host.ids():
        rgb, pts = frames(2, start=int((3 - (deadline - time.monotonic())) * 100))
        host.push("busy", FrameBatch(rgb=rgb, pts=np.asarray(pts), indices=np.arange(2)), False)
        time.sleep(0.05)
    assert host.ids() == ["busy"] and host.reaped >= 1
    assert "idle" not in vision.streams and "idle" not in llm.seen  # its state on the stages is freed too
    with pytest.raises(StreamNotFoundError):
        host.stats("idle")


def test_ingest_for_many_streams_costs_threads_not_processes():
    import psutil

    host = _host()
    opts = _cfg().stream_options()
    rss0 = psutil.Process().memory_info().rss
    for i in range(16):
        host.create(StreamPlan(f"s{i}", None, "memory://", opts))
    per_stream_mb = (psutil.Process().memory_info().rss - rss0) / 2**20 / 16
    assert len(host.ids()) == 16 and per_stream_mb < 50, per_stream_mb  # was one ~470 MB process per stream
    for i in range(16):
        host.close(f"s{i}")


def test_a_restarted_host_lists_the_streams_it_lost_as_failed_and_frees_their_state():
    """The directory outlives the host: its restart reports each lost stream as failed (with the reason), answers
    pushes and questions 409, frees the stages' state, and DELETE / the TTL remove the failed entry."""
    from serve.core.directory import StreamDirectory

    vision, llm = FakeVisionStage(), FakeLLMStage()
    cfg = _cfg()
    directory = StreamDirectory(16)
    first = IngestHost(DirectTransport(vision, llm), cfg.source, cfg.serve.ingest, 60.0, directory=directory,
                       name="h0")
    for sid in ("a", "b", "c"):
        first.create(StreamPlan(sid, None, "memory://", cfg.stream_options()))
    first.close("c")  # closed cleanly: forgotten, not "lost"
    assert len(directory) == 2
    for sid in ("a", "b"):  # the process dies: its threads stop, but nothing is closed
        first._streams[sid].runner.worker.close()
    restarted = IngestHost(DirectTransport(vision, llm), cfg.source, cfg.serve.ingest, 0.5, restarted=True,
                           directory=directory, name="h0")
    assert restarted.ids() == ["a", "b"] and len(directory) == 0
    stats = restarted.stats("a")
    assert stats.state == "failed" and "ingest host h0 died" in stats.error and "Fix: DELETE" in stats.error
    assert stats.vision is None and stats.llm is None
    rgb, pts = frames(2)
    with pytest.raises(StreamStateError, match="failed: its ingest host h0 died"):
        restarted.push("a", FrameBatch(rgb=rgb, pts=np.asarray(pts), indices=np.arange(2)), False)
    with pytest.raises(StreamStateError):
        list(restarted.ask("a", QuestionRequest(question="what?")))
    with pytest.raises(StreamExistsError):
        restarted.create(StreamPlan("a", None, "memory://", cfg.stream_options()))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and (vision.streams or llm.seen):
        time.sleep(0.02)
    assert not vision.streams and not llm.seen  # the lost streams' stage state was freed
    assert restarted.close("a").state == "closed" and restarted.ids() == ["b"]
    restarted.reap(time.monotonic() + 1.0)  # past the TTL: the failed entry goes too
    assert restarted.ids() == []
    with pytest.raises(StreamNotFoundError):
        restarted.stats("b")


def test_the_stream_directory_is_bounded():
    from serve.core.directory import StreamDirectory, StreamRecord

    directory = StreamDirectory(3)
    for k in range(10_000):  # churn: record + forget keeps it at one entry
        directory.record(StreamRecord(f"s{k}", "h", "push", None, 0.0))
        assert directory.forget("h", f"s{k}")
    assert len(directory) == 0
    for k in range(3):
        directory.record(StreamRecord(f"s{k}", "h", "push", None, 0.0))
    directory.record(StreamRecord("s0", "h", "push", None, 1.0))  # an update is not a new record
    with pytest.raises(OverflowError, match="maximum of 3 records"):
        directory.record(StreamRecord("s9", "h", "push", None, 0.0))
    assert [r.stream_id for r in directory.take("h")] == ["s0", "s1", "s2"] and len(directory) == 0
