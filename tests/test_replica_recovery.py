"""A lost vision/LLM replica, in process (tests/replica_doubles.py: slotted replicas behind a rendezvous router):
every stream survives with a counted cold reset, concurrent callers rebuild the state once, questions during the
recovery answer 503 with Retry-After (never 500, 404 or 409), pushed chunks the model side cannot take are dropped
and counted, and a stream id is free again the moment DELETE answers.

The real-cluster SIGKILL of the replicas is in tests/test_service_ray.py."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.core.api import ServiceUnavailableError, StreamMisroutedError
from serve.core.config import ServiceConfig
from serve.core.flow import LLM, VISION, StageFlow
from serve.core.hosts import IngestHost
from serve.core.local import LocalBackend
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.slots import SlottedStage, StreamSlots
from serve.http.app import make_api
from serve.http.client import iter_sse
from stream.frames import FrameBatch
from tests.replica_doubles import ReplicaSetTransport
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames

MSGPACK = {"Content-Type": CONTENT_TYPE}


def _transport() -> ReplicaSetTransport:
    return ReplicaSetTransport({VISION: FakeVisionStage, LLM: FakeLLMStage}, replicas=2)


def _batch(n: int, start: int) -> FrameBatch:
    rgb, pts = frames(n, start=start)
    return FrameBatch(rgb=rgb, pts=np.asarray(pts), indices=np.arange(start, start + n))


def test_concurrent_callers_meeting_a_lost_replica_rebuild_the_state_once():
    """The ingest sender's append and a question both find the LLM state gone at the same moment (a barrier lines
    them up): the stream is reset once, both calls then succeed on the new state, and nothing closed under them."""
    transport = _transport()
    flow = StageFlow(transport)
    flow.open("s", None)
    flow.encode_append("s", _batch(2, 0))
    transport.kill(LLM, transport.owner(LLM, "s"))
    barrier = threading.Barrier(2, timeout=5)
    transport.hook = lambda kind, method, sid: barrier.wait() if kind == LLM and method != "close" else None
    results: dict[str, object] = {}

    def append() -> None:
        try:
            results["append"] = flow.encode_append("s", _batch(2, 2))
        except Exception as exc:  # noqa: BLE001
            results["append"] = exc

    def ask() -> None:
        try:
            results["ask"] = "".join(p for p in flow.ask("s", "what?", 8) if isinstance(p, str))
        except Exception as exc:  # noqa: BLE001
            results["ask"] = exc

    threads = [threading.Thread(target=f) for f in (append, ask)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not isinstance(results["append"], Exception), results
    assert not isinstance(results["ask"], Exception), results
    assert flow.resets == 1 and flow.frames_lost == 2  # one cold reset; the lost state held one chunk
    holders = transport.holders(LLM, "s")
    assert list(holders.values()) == [["s"]], holders  # exactly one incarnation, held by one replica


def test_a_replica_open_frees_state_an_earlier_incarnation_left_behind():
    """A close that went elsewhere (router moved) leaves state without a slot; a new incarnation of the id opens
    anyway (no 'already open' 409) and the stale state is freed."""
    stage = FakeLLMStage()
    replica = SlottedStage(stage, StreamSlots(LLM, "r0", 4))
    replica.open("cam", "t1", None)
    replica.slots.release("cam", "t1")  # the slot went, the stage still holds the id
    assert "cam" in stage.seen
    assert replica.open("cam", "t2", None) is True
    assert replica.slots.ids() == ["cam"] and stage.seen["cam"] == []
    with pytest.raises(StreamMisroutedError):
        replica.call("stats", "cam", "t1")  # the old incarnation is refused, never answered


def test_open_and_close_of_one_id_never_interleave():
    """Close (slot released, state being freed) and a new open of the same id on one replica: serialized."""
    freeing, go_on = threading.Event(), threading.Event()

    class SlowClose(FakeLLMStage):
        def close(self, stream_id: str) -> None:
            freeing.set()
            go_on.wait(5)
            super().close(stream_id)

    stage = SlowClose()
    replica = SlottedStage(stage, StreamSlots(LLM, "r0", 4))
    replica.open("cam", "t1", None)
    closer = threading.Thread(target=replica.close, args=("cam", "t1"))
    closer.start()
    freeing.wait(5)
    opened: list[object] = []
    opener = threading.Thread(target=lambda: opened.append(replica.open("cam", "t2", None)))
    opener.start()
    time.sleep(0.1)
    assert not opened  # waits for the close to finish
    go_on.set()
    closer.join(5)
    opener.join(5)
    assert opened == [True] and replica.slots.ids() == ["cam"] and "cam" in stage.seen


def _service(transport: ReplicaSetTransport) -> tuple[TestClient, LocalBackend]:
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 2}, "serve": {"max_streams": 8}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), FakeLLMStage())
    backend.host.shutdown()
    backend.host = IngestHost(transport, cfg.source, cfg.serve.ingest, cfg.serve.stream_ttl_s)
    return TestClient(make_api(backend, cfg.serve), raise_server_exceptions=False), backend


def _push(client: TestClient, sid: str, start: int):
    rgb, pts = frames(2, start=start)
    return client.post(f"/streams/{sid}/frames?flush=true", content=encode_frames(rgb, pts), headers=MSGPACK)


def _wait(predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_questions_during_recovery_get_503_with_retry_after_and_the_stream_survives():
    transport = _transport()
    client, backend = _service(transport)
    try:
        assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
        assert _push(client, "cam", 0).status_code == 200
        _wait(lambda: client.get("/streams/cam").json()["ingest"]["frames_encoded"] == 2)
        transport.kill(LLM, transport.owner(LLM, "cam"), refresh_view=False)  # the router still sends calls there
        resp = client.post("/streams/cam/questions", json={"question": "what now?"})
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"] == "2"
        err = resp.json()["error"]
        assert err["type"] == "ServiceUnavailableError" and "Fix: retry after 2 s" in err["message"]
        assert _push(client, "cam", 2).status_code == 200  # pushes still land: the chunk is dropped and counted
        _wait(lambda: client.get("/streams/cam").json()["ingest"]["frames_dropped"] == 2)
        assert client.get("/streams/cam").json()["state"] == "running"
        transport.refresh()  # the replacement is known: the next call rebuilds the state cold
        resp = client.post("/streams/cam/questions", json={"question": "and now?", "wait_s": 2})
        events = [kind for kind, _ in iter_sse(resp)]
        assert resp.status_code == 200 and events[-1] == "done", events
        assert _push(client, "cam", 4).status_code == 200
        _wait(lambda: client.get("/streams/cam").json()["ingest"]["frames_encoded"] == 4)
        st = client.get("/streams/cam").json()
        assert st["state"] == "running" and st["ingest"]["state_resets"] == 1 and st["ingest"]["frames_lost"] == 2
        ing = st["ingest"]
        assert ing["frames_in"] == ing["frames_encoded"] + ing["frames_dropped"]  # every frame accounted for
    finally:
        backend.shutdown()


def test_an_id_is_free_the_moment_delete_answers_even_with_state_left_on_a_lost_route():
    """The stream's LLM state sits on a replica the router no longer maps it to (its close cannot reach it): DELETE
    answers, and the same id is created again at once."""
    transport = _transport()
    client, backend = _service(transport)
    try:
        assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
        owner = transport.owner(LLM, "cam")
        other = next(r for r in transport.live[LLM] if r != owner)
        with transport.lock:  # the router now believes only the other replica exists
            transport.view[LLM] = [other]
        assert client.delete("/streams/cam").status_code == 200
        created = client.post("/streams", json={"stream_id": "cam"})
        assert created.status_code == 201, created.text
        assert _push(client, "cam", 0).status_code == 200
        _wait(lambda: client.get("/streams/cam").json()["ingest"]["frames_encoded"] == 2)
        transport.refresh()  # the old route comes back: the stale incarnation there is refused, never adopted
        with pytest.raises(StreamMisroutedError):
            transport.live[LLM][owner].call("stats", "cam", backend.host._streams["cam"].runner.flow.token(LLM))
    finally:
        backend.shutdown()


def test_a_misroute_that_outlasts_the_rebuild_is_a_503_not_a_500():
    transport = _transport()
    flow = StageFlow(transport)
    flow.open("s", None)
    transport.kill(LLM, transport.owner(LLM, "s"), refresh_view=False)
    with pytest.raises(ServiceUnavailableError, match="rebuilt cold") as info:
        flow.ask("s", "q", 4)
    assert info.value.status == 503 and info.value.retry_after_s == 2.0
    with pytest.raises(ServiceUnavailableError):
        flow.encode_append("s", _batch(2, 0))
