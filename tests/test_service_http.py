"""The HTTP API in-process (FastAPI TestClient + LocalBackend, no Ray): every endpoint, SSE answers, live questions,
two streams, stats, metrics, API key, and a clear 4xx JSON error for every bad input while other streams carry on.

The stages are test doubles (tests/service_doubles.py) whose answers report exactly which frames reached the LLM;
one test runs the real tiny-model stages through the same API.
"""
from __future__ import annotations

import os
import time

import msgpack
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve.http.client import iter_sse
from serve.core.config import ServiceConfig
from serve.http.app import make_api
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core.local import LocalBackend
from tests.media import make_clip
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames

MSGPACK = {"Content-Type": CONTENT_TYPE}


def _config(media_root: str | None, **serve: object) -> ServiceConfig:
    return ServiceConfig.parse({
        "sampler": {"fps": 1000.0, "frames_per_chunk": 4},
        "source": {"open_timeout_s": 2.0, "reconnect_attempts": 0},
        "serve": {"media_root": media_root, "max_streams": 4, "max_push_bytes": 200_000, **serve},
    })


def _client(cfg: ServiceConfig, vision=None, llm=None) -> tuple[TestClient, LocalBackend]:
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), vision or FakeVisionStage(), llm or FakeLLMStage())
    return TestClient(make_api(backend, cfg.serve)), backend


@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    make_clip(root / "clip.mp4", num_frames=24, fps=24, size=(32, 24))
    outside = make_clip(tmp_path / "secret.mp4", num_frames=4, fps=4, size=(32, 24))
    os.symlink(outside, root / "link.mp4")
    return root


@pytest.fixture()
def api(media):
    client, backend = _client(_config(str(media)))
    yield client
    backend.shutdown()


def _push(client: TestClient, sid: str, start: int, n: int, flush: bool = False, encoding: str = "raw"):
    rgb, pts = frames(n, start=start)
    return client.post(f"/streams/{sid}/frames" + ("?flush=true" if flush else ""),
                       content=encode_frames(rgb, pts, encoding), headers=MSGPACK)


def _ask(client: TestClient, sid: str, question: str = "what happened?", wait_s: float = 5.0, **kw):
    resp = client.post(f"/streams/{sid}/questions", json={"question": question, "wait_s": wait_s, **kw})
    return resp, list(iter_sse(resp)) if resp.status_code == 200 else []


def _error(resp, status: int, kind: str | None = None, fragment: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["status"] == status
    if kind:
        assert err["type"] == kind
    if fragment:
        assert fragment in err["message"], err["message"]
    return err


def test_pushed_stream_question_mid_stream_and_stats(api):
    resp = api.post("/streams", json={"stream_id": "cam1"})
    assert resp.status_code == 201 and resp.json()["kind"] == "push" and resp.json()["state"] == "running"
    assert _push(api, "cam1", 0, 8).json()["accepted"] == 8
    _, events = _ask(api, "cam1")
    assert [e for e, _ in events].count("token") == 3 and events[-1][0] == "done"
    assert events[-1][1]["answer"] == "frames=8 last=0.70"  # both full chunks reached the LLM before answering
    assert events[-1][1]["ttft_ms"] >= 0
    _push(api, "cam1", 8, 6, flush=True)  # 6 more: one full chunk + a flushed partial one
    _, events = _ask(api, "cam1")
    assert events[-1][1]["answer"] == "frames=14 last=1.30"
    stats = api.get("/streams/cam1").json()
    assert stats["ingest"]["frames_in"] == 14 and stats["ingest"]["frames_encoded"] == 14
    assert stats["ingest"]["frames_dropped"] == 0 and stats["questions"] == 2
    assert (stats["tokens_kept"], stats["tokens_total"], stats["kv_tokens"]) == (14, 56, 14)
    assert stats["cache_reuse"] == 0.5 and stats["kv_bytes"] == 14 * 64


def test_two_streams_are_isolated_and_listed_and_closed(api):
    for sid in ("a", "b"):
        assert api.post("/streams", json={"stream_id": sid, "frames_per_chunk": 2}).status_code == 201
    _push(api, "a", 0, 6)
    _push(api, "b", 100, 2, encoding="jpeg")
    assert _ask(api, "a")[1][-1][1]["answer"] == "frames=6 last=0.50"
    assert _ask(api, "b")[1][-1][1]["answer"] == "frames=2 last=10.10"
    listed = {s["stream_id"]: s["ingest"]["frames_in"] for s in api.get("/streams").json()["streams"]}
    assert listed == {"a": 6, "b": 2}
    final = api.delete("/streams/a").json()
    assert final["state"] == "closed" and final["ingest"]["frames_encoded"] == 6
    assert [s["stream_id"] for s in api.get("/streams").json()["streams"]] == ["b"]
    for resp in (api.get("/streams/a"), api.delete("/streams/a"), _push(api, "a", 0, 2), _ask(api, "a")[0]):
        _error(resp, 404, "StreamNotFoundError", "no open stream 'a'")
    assert _ask(api, "b")[1][-1][1]["answer"] == "frames=2 last=10.10"  # b unaffected


def test_file_stream_under_media_root(api):
    resp = api.post("/streams", json={"source": "clip.mp4", "fps": 12, "frames_per_chunk": 4})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["stream_id"]
    assert resp.json()["kind"] == "file"
    deadline = time.monotonic() + 20  # a file is read as fast as the encoder takes it: wait for its end
    while api.get(f"/streams/{sid}").json()["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    _, events = _ask(api, sid, wait_s=20)
    stats = api.get(f"/streams/{sid}").json()
    # 24 frames at 24 fps sampled at 12 fps -> 12 frames, none dropped (files wait for the encoder)
    assert stats["ingest"]["frames_sampled"] == 12 and stats["ingest"]["frames_dropped"] == 0, stats
    assert events[-1][1]["answer"].startswith("frames=12")
    _error(_push(api, sid, 0, 2), 409, "StreamStateError", "frames can only be pushed")


@pytest.mark.parametrize(
    "source, status, kind, fragment",
    [
        ("../secret.mp4", 403, "ForbiddenSourceError", "outside the media root"),
        ("link.mp4", 403, "ForbiddenSourceError", "outside the media root"),  # symlink escaping the root
        ("/etc/passwd", 403, "ForbiddenSourceError", "outside the media root"),
        ("file:///etc/passwd", 403, "ForbiddenSourceError", "outside the media root"),
        ("sub/../../secret.mp4", 403, "ForbiddenSourceError", "outside the media root"),
        ("missing.mp4", 404, "SourceNotFoundError", None),
        ("ftp://example.com/v.mp4", 403, "ForbiddenSourceError", "scheme 'ftp' is not allowed"),
        ("rtsp://127.0.0.1:9/none", 403, "ForbiddenSourceError", "denied network 127.0.0.0/8"),  # own endpoints
        ("http://localhost:8000/health", 403, "ForbiddenSourceError", "denied network"),
        ("http://169.254.169.254/latest/meta-data/", 403, "ForbiddenSourceError", "169.254.0.0/16"),  # metadata
        ("http://[::1]:8000/streams", 403, "ForbiddenSourceError", "::1/128"),
        ("http://0x7f000001/x", 403, "ForbiddenSourceError", "denied network"),  # 127.0.0.1 spelled in hex
        ("clip\x00.mp4", 400, "InvalidSourceError", "control characters (0x00)"),  # hostile: was 500
        ("rtsp:///nohost", 400, "InvalidSourceError", "names no host"),
    ],
)
def test_bad_sources_are_4xx(api, source, status, kind, fragment):
    _error(api.post("/streams", json={"source": source}), status, kind, fragment)
    assert api.get("/streams").json()["streams"] == []  # nothing half-open left behind


def test_loopback_sources_need_an_explicit_allow(media):
    client, backend = _client(_config(str(media), allow_hosts=["127.0.0.1"]))
    try:
        _error(client.post("/streams", json={"source": "rtsp://127.0.0.1:9/none"}), 422, "SourceUnreachableError")
        _error(client.post("/streams", json={"source": "http://169.254.169.254/x"}), 403, "ForbiddenSourceError")
    finally:
        backend.shutdown()
    only, backend = _client(_config(str(media), allow_hosts=["10.0.0.0/8"], only_allowed=True))
    try:
        _error(only.post("/streams", json={"source": "rtsp://192.0.2.1/x"}), 403, "ForbiddenSourceError",
               "not in serve.allow_hosts")
    finally:
        backend.shutdown()


def test_bad_requests_leave_other_streams_working(api):
    api.post("/streams", json={"stream_id": "ok", "frames_per_chunk": 2})
    _push(api, "ok", 0, 2)
    rgb, pts = frames(2)
    bad_dtype = msgpack.packb({"v": 1, "encoding": "raw", "pts": pts, "shape": list(rgb.shape), "dtype": "float32",
                               "data": rgb.tobytes()})
    bad_shape = msgpack.packb({"v": 1, "encoding": "raw", "pts": pts, "shape": [2, 32, 48, 4],
                               "dtype": "uint8", "data": rgb.tobytes()})
    cases = [
        (api.post("/streams/ok/frames", content=b"\x93\x01\x02", headers=MSGPACK), 400, "ProtocolError"),
        (api.post("/streams/ok/frames", content=b"", headers=MSGPACK), 400, "ProtocolError"),
        (api.post("/streams/ok/frames", content=encode_frames(rgb, pts)), 415, None),  # no content type
        (api.post("/streams/ok/frames", content=bad_dtype, headers=MSGPACK), 422, "FrameFormatError"),
        (api.post("/streams/ok/frames", content=bad_shape, headers=MSGPACK), 422, "FrameFormatError"),
        (api.post("/streams/ok/frames", content=b"x" * 200_001, headers=MSGPACK), 413, "PayloadTooLargeError"),
        (_push(api, "ok", 0, 1), 422, "FrameFormatError"),  # pts behind the last pushed frame
        (api.post("/streams/nope/frames", content=encode_frames(rgb, pts), headers=MSGPACK), 404, None),
        (api.post("/streams", json={"stream_id": "ok"}), 409, "StreamExistsError"),
        (api.post("/streams", json={"stream_id": "bad id!"}), 422, "ValidationError"),
        (api.post("/streams", json={"sauce": "x.mp4"}), 422, "ValidationError"),
        (api.post("/streams", json={"options": {"pruner": {"nope": 1}}}), 400, "ConfigError"),
        (api.post("/streams/ok/questions", json={"question": "x" * 5000}), 413, None),
        (api.post("/streams/ok/questions", json={"question": "x" * 2000}), 413, "PayloadTooLargeError"),  # hostile
        (api.post("/streams/ok/questions", json={"question": "hi", "max_new_tokens": 10_000}), 422, None),
        (api.post("/streams/ok/questions", json={"question": ""}), 422, "ValidationError"),
    ]
    for resp, status, kind in cases:
        _error(resp, status, kind)
    assert _ask(api, "ok")[1][-1][1]["answer"] == "frames=2 last=0.10"


def test_capacity_limit_is_429(api):
    for i in range(4):
        assert api.post("/streams", json={}).status_code == 201
    _error(api.post("/streams", json={}), 429, "CapacityError", "maximum of 4 streams")


def test_api_key_guards_every_endpoint(media):
    client, backend = _client(_config(str(media), api_key="s3cret"))
    try:
        for method, path in (("get", "/health"), ("get", "/metrics"), ("get", "/streams"), ("post", "/streams"),
                             ("get", "/openapi.json"), ("delete", "/streams/x")):
            _error(getattr(client, method)(path), 401, "UnauthorizedError", "API key")
        _error(client.get("/streams", headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/streams", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health", headers={"X-API-Key": "s3cret"}).json()["status"] == "ok"
    finally:
        backend.shutdown()


def test_metrics_health_and_openapi(api):
    api.post("/streams", json={"stream_id": "m"})
    _push(api, "m", 0, 4)
    _ask(api, "m")
    text = api.get("/metrics").text
    assert 'stc_stream_frames_in{stream="m"} 4.0' in text
    assert "stc_streams_open 1.0" in text and "stc_ttft_seconds_count 1.0" in text
    assert 'stc_http_requests_total{route="/streams/{stream_id}/frames",status="200"} 1.0' in text
    assert api.get("/health").json() == {"status": "ok", "streams": 1, "deployments": {"local": "HEALTHY"},
                                         "parameter_bytes": {}}
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/streams", "/streams/{stream_id}", "/streams/{stream_id}/frames", "/streams/{stream_id}/questions",
            "/health", "/metrics"} <= set(paths)


def test_drops_are_counted_when_the_encoder_lags(media):
    cfg = _config(str(media), ingest={"queue_chunks": 1})
    client, backend = _client(cfg, vision=FakeVisionStage(delay_s=0.05))
    try:
        client.post("/streams", json={"stream_id": "fast"})
        for i in range(10):
            _push(client, "fast", 8 * i, 8)
        _, events = _ask(client, "fast", wait_s=10)
        st = client.get("/streams/fast").json()["ingest"]
        assert st["frames_in"] == 80 and st["frames_dropped"] > 0
        assert st["frames_encoded"] + st["frames_dropped"] == 80
        assert events[-1][1]["answer"] == f"frames={st['frames_encoded']} last=7.90"  # newest frames kept
    finally:
        backend.shutdown()


def test_real_tiny_model_through_the_api(media):
    from serve.core.stages import LLMStage, VisionStage
    from stream.models import load_adapter

    cfg = _config(str(media))
    adapter = load_adapter(None)
    vision = VisionStage(adapter, cfg.stream_options())
    llm = LLMStage(adapter, cfg.stream_options(), cfg.kv_replica_budget_bytes())
    client, backend = _client(cfg, vision, llm)
    try:
        client.post("/streams", json={"stream_id": "real"})
        rgb = np.stack([np.full((48, 64, 3), 40 * i, np.uint8) for i in range(4)])
        client.post("/streams/real/frames?flush=true", content=encode_frames(rgb, [0, 1, 2, 3]), headers=MSGPACK)
        resp, events = _ask(client, "real", max_new_tokens=4)
        assert resp.status_code == 200 and events[-1][0] == "done", events
        assert events[-1][1]["tokens"] >= 1
        stats = client.get("/streams/real").json()
        assert stats["ingest"]["frames_encoded"] == 4 and stats["kv_bytes"] > 0 and stats["tokens_kept"] > 0
        # device / host bytes by component (tests/test_device_bytes.py holds them to the tensors): the KV session's
        # slots add up to at most its reservation (which counts keys for all sink_tokens); references on the host
        memory, cache = stats["llm"]["memory"], stats["vision"]["cache"]
        parts = memory["kv_window"] + memory["kv_sinks"] + memory["kv_reserve"] + memory["kv_retrieved"]
        assert memory["kv_window"] > 0 and memory["kv_bytes"] == parts <= llm.engine.bytes_per_stream()
        assert cache["reference_device_bytes"] == 0 and cache["reference_host_bytes"] > 0
        from prometheus_client.parser import text_string_to_metric_families

        samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
                   for fam in text_string_to_metric_families(client.get("/metrics").text) for m in fam.samples}
        assert samples["stc_stream_device_bytes", (("component", "kv_window"), ("stream", "real"))] == memory["kv_window"]
        assert samples["stc_stream_host_bytes", (("component", "references"), ("stream", "real"))] \
            == cache["reference_host_bytes"]
        pruner_bytes = stats["vision"]["pruner"]["state_bytes"]  # the pruner's state, in host memory
        assert pruner_bytes > 0 and samples["stc_stream_host_bytes", (("component", "pruner"), ("stream", "real"))] \
            == pruner_bytes
        assert samples["stc_replica_device_bytes", (("component", "kv_reserve"), ("replica", "local"),
                                                    ("stage", "llm"))] == memory["kv_reserve"]
    finally:
        backend.shutdown()
