"""The service on a real Ray cluster with the real tiny-model pipeline (one module-scoped ``serve.run``).

The cluster (``ray.cluster_utils.Cluster``, two raylets on this machine) is a head without GPUs plus a node with one
fake GPU; vision and LLM replicas ask for GPU quarters, so all four must land on the GPU node while the ingress and
the per-stream actors stay schedulable anywhere. Two vision and two LLM replicas exercise stickiness: every
stream's state must sit on exactly one replica of each, and every chunk of the stream must reach it. Covers a real
RTSP stream (GStreamer on loopback serving ../shared/media/vtest.avi) with a question answered mid-stream and a
reconnect after the server drops, pushed streams, two concurrent streams, every bad input, metrics, and the
misroute guard.
"""
from __future__ import annotations

import json
import os
import threading
from collections import Counter
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from serve.core.api import StreamMisroutedError  # noqa: E402
from serve.deploy.app import LLM, VISION, start_service, stop_service, unwrap  # noqa: E402
from serve.http.client import ServiceError, StcClient  # noqa: E402
from serve.core.config import ServiceConfig  # noqa: E402
from serve.deploy.hosts import STREAM_NAMESPACE  # noqa: E402
from tests.media import make_clip, moving_square, real_video  # noqa: E402
from tests.rtsp_server import free_port, rtsp_server  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0, "include_dashboard": False})
    gpu_node = c.add_node(num_cpus=2, num_gpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield gpu_node
    finally:
        stop_service()
        c.shutdown()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_llava_dir, cluster):
    media = tmp_path_factory.mktemp("media")
    make_clip(media / "clip.mp4", num_frames=20, fps=10, size=(64, 48))
    secret = make_clip(tmp_path_factory.mktemp("outside") / "secret.mp4", num_frames=4, size=(32, 24))
    os.symlink(secret, media / "link.mp4")
    cfg = ServiceConfig.parse({
        "model": {"name": str(tiny_llava_dir)},
        "sampler": {"fps": 2.0, "frames_per_chunk": 2},
        "source": {"open_timeout_s": 5, "read_timeout_s": 3, "reconnect_attempts": 6, "reconnect_backoff_s": 0.5,
                   "reconnect_backoff_max_s": 1.0},
        "serve": {
            "http": {"port": free_port()}, "media_root": str(media), "max_push_bytes": 2_000_000,
            "allow_hosts": ["127.0.0.1"],  # the RTSP tests serve from loopback, denied by default
            "max_streams": 48, "max_streams_per_replica": 40,  # 20 at once may hash unevenly
            "ingress": {"num_cpus": 0, "num_replicas": 2}, "ingest": {"num_cpus": 0, "misroute_retry_s": 5, "hosts": 2},
            "vision": {"num_cpus": 0, "num_gpus": 0.25, "num_replicas": 2},
            "llm": {"num_cpus": 0, "num_gpus": 0.25, "num_replicas": 2},
        },
    })
    url = start_service(cfg)
    yield StcClient(url, timeout_s=120), cluster, cfg


def test_encoder_and_llm_replicas_land_on_the_gpu_node(service):
    _, gpu_node, _ = service
    for kind in (VISION, LLM):
        placed = _where(kind)
        assert len(placed) == 2
        assert {w["node_id"] for w in placed} == {gpu_node.node_id}, f"{kind} replicas off the GPU node"
        assert all(w["gpu_ids"] for w in placed), f"{kind} replica got no GPU id"
    assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0)  # 4 x 0.25 GPU taken
    from stream.models.loading import load_adapter_part, parameter_bytes

    whole = parameter_bytes(load_adapter_part(service[2].model.name).model)
    sizes = _retry(lambda: service[0].health()["parameter_bytes"])
    assert 0 < sizes[VISION] < whole and 0 < sizes[LLM] < whole  # half the weights per replica, in /health
    assert sizes[VISION] + sizes[LLM] <= whole + 4096


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_stateful_processes_run_with_the_configured_malloc_env(service):
    client = service[0]
    sid = client.create_stream(stream_id="env-probe")["stream_id"]  # starts the ingest hosts
    try:
        pids = [w["pid"] for kind in (VISION, LLM) for w in _where(kind)]
        memory = [ray.get(ray.get_actor(f"stc/ingest/{k}", namespace=STREAM_NAMESPACE).memory.remote())
                  for k in range(2)]
        hosts = [m.pid for m in memory]
        assert len(pids) == 4 and len(hosts) == 2
        assert all(m.gc_frozen > 100_000 for m in memory), memory  # serve.process.gc_freeze: torch, Ray frozen
        for pid in pids + hosts:
            assert _environ(pid).get("MALLOC_ARENA_MAX") == "2", f"process {pid} lacks serve.process.env"
        for pid in pids:  # serve.process.host_env: the ingest hosts' only
            assert "MALLOC_MMAP_THRESHOLD_" not in _environ(pid), f"model replica {pid} got the hosts' env"
        for pid in hosts:
            assert _environ(pid).get("MALLOC_MMAP_THRESHOLD_") == "131072", f"host {pid} lacks process.host_env"
    finally:
        client.close_stream(sid)


def _frames(n: int, start: int = 0) -> tuple[np.ndarray, list[float]]:
    rgb = np.stack([moving_square(i, 64, 48) for i in range(start, start + n)])
    return rgb, [i * 0.5 for i in range(start, start + n)]  # 2 fps: the sampler keeps every frame


def _where(kind: str) -> list[dict]:
    handle = serve.get_deployment_handle(kind, app_name="stc")
    seen: dict[str, dict] = {}
    deadline = time.time() + 20
    while len(seen) < 2 and time.time() < deadline:  # two replicas: ask until both answered
        info = handle.where.remote().result().model_dump()
        seen[info["replica"]] = {**info, "streams": info["stream_ids"]}
    return list(seen.values())


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_pushed_streams_concurrently_are_sticky_and_answered(service):
    client, _, _ = service
    ids = [client.create_stream(stream_id=f"push{i}")["stream_id"] for i in range(2)]

    def feed(sid: str, offset: int) -> None:
        for k in range(3):
            rgb, pts = _frames(2, offset + 2 * k)
            client.push_frames(sid, rgb, pts, encoding="jpeg")

    threads = [threading.Thread(target=feed, args=(sid, 10 * i)) for i, sid in enumerate(ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sid in ids:
        text, done = client.ask_text(sid, "What moves?", max_new_tokens=4, wait_s=60)
        assert done["tokens"] >= 1 and done["ttft_ms"] > 0 and done["answer"] == text
        st = client.stats(sid)
        assert st["ingest"]["frames_encoded"] == 6 and st["ingest"]["frames_dropped"] == 0
        assert st["vision"]["frames"] == 6, "every chunk must reach the one vision replica holding the stream"
        assert st["kv_bytes"] > 0 and st["tokens_kept"] > 0 and st["ingest"]["state_resets"] == 0
        assert 0.0 <= st["cache_reuse"] <= 1.0 and st["vision"]["cache"]["frames"] == 6
    for kind in (VISION, LLM):
        holders = {sid: [w["replica"] for w in _where(kind) if sid in w["streams"]] for sid in ids}
        assert all(len(h) == 1 for h in holders.values()), f"{kind}: each stream on exactly one replica: {holders}"
    kv_before = client.stats(ids[0])["kv_tokens"]
    rgb, pts = _frames(2, 40)
    client.push_frames(ids[0], rgb, pts, encoding="raw")
    client.ask_text(ids[0], "And now?", max_new_tokens=2, wait_s=60)
    assert client.stats(ids[0])["kv_tokens"] > kv_before  # the new chunk was appended, the question was not kept
    for sid in ids:
        assert client.close_stream(sid)["state"] == "closed"
    for kind in (VISION, LLM):  # closed streams leave the replicas and the router's table
        assert not any(set(ids) & set(w["streams"]) for w in _where(kind))


@pytest.mark.rtsp
def test_rtsp_stream_question_mid_stream_and_reconnect(service):
    client, _, _ = service
    with rtsp_server(real_video("vtest.avi"), width=320, fps=10) as server:
        sid = client.create_stream(server.url, stream_id="cam")["stream_id"]
        assert client.stats(sid)["kind"] == "live"
        _wait(lambda: client.stats(sid)["ingest"]["frames_encoded"] >= 4, 90, "4 RTSP frames encoded")
        text, done = client.ask_text(sid, "What do you see?", max_new_tokens=3)
        assert done["tokens"] >= 1
        st = client.stats(sid)
        assert st["state"] == "running" and st["kv_tokens"] > 0
        server.kill()
        time.sleep(1.0)
        server.start()
        _wait(lambda: client.stats(sid)["ingest"]["reconnects"] >= 1, 60, "a reconnect")
        before = client.stats(sid)["ingest"]["frames_encoded"]
        _wait(lambda: client.stats(sid)["ingest"]["frames_encoded"] > before, 60, "frames after the reconnect")
        assert client.stats(sid)["state"] == "running"
        client.close_stream(sid)


def test_file_stream_and_bad_inputs_leave_others_working(service):
    client, _, _ = service
    good = client.create_stream("clip.mp4", fps=10, frames_per_chunk=4)["stream_id"]
    url = client.url
    cases = [
        (lambda: client.create_stream("../outside/secret.mp4"), 403, "ForbiddenSourceError"),
        (lambda: client.create_stream("link.mp4"), 403, "ForbiddenSourceError"),
        (lambda: client.create_stream("missing.mp4"), 404, "SourceNotFoundError"),
        (lambda: client.create_stream(f"rtsp://127.0.0.1:{free_port()}/x"), 422, "SourceUnreachableError"),
        (lambda: client.create_stream(stream_id=good), 409, "StreamExistsError"),
        (lambda: client.stats("nope"), 404, "StreamNotFoundError"),
        (lambda: client.ask_text("nope", "hi"), 404, "StreamNotFoundError"),
        (lambda: client.push_frames(good, *_frames(1)), 409, "StreamStateError"),
        (lambda: _post(url + f"/streams/{good}/frames", b"\xc1\x00"), 400, "ProtocolError"),
        (lambda: _post(url + f"/streams/{good}/frames", b"\x00" * 2_000_001), 413, "PayloadTooLargeError"),
    ]
    for call, status, kind in cases:
        with pytest.raises(ServiceError) as info:
            call()
        assert (info.value.status, info.value.kind) == (status, kind), info.value
    _wait(lambda: client.stats(good)["state"] == "ended", 90, "the file stream to end")
    st = client.stats(good)
    assert st["ingest"]["frames_encoded"] == 20 and st["ingest"]["frames_dropped"] == 0
    assert client.ask_text(good, "Summarize.", max_new_tokens=2)[1]["tokens"] >= 1
    metrics = client.metrics()
    assert f'stc_stream_frames_encoded{{stream="{good}"}} 20.0' in metrics
    assert client.health()["deployments"] == {"ingress": "HEALTHY", "vision": "HEALTHY", "llm": "HEALTHY"}
    client.close_stream(good)


def test_a_replica_without_the_stream_refuses_instead_of_guessing(service):
    handle = serve.get_deployment_handle(VISION, app_name="stc")
    with pytest.raises(Exception) as info:
        handle.stats.remote("ghost", "some-token").result()
    assert isinstance(unwrap(info.value), StreamMisroutedError)
    assert "holds no state for stream 'ghost'" in str(unwrap(info.value))


def _post(url: str, body: bytes) -> dict:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/msgpack"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        err = json.loads(exc.read())["error"]
        raise ServiceError(err["status"], err["type"], err["message"]) from None


# ---- one stream flow: the Ray service answers exactly what the in-process pipeline answers --------------------------
def test_ray_served_answer_equals_the_in_process_pipeline(service, tiny_llava_dir):
    from serve.core.pipeline import StreamPipeline
    from stream.frames import Frame
    from stream.models import load_adapter

    client, _, cfg = service
    rgb, pts = _frames(6)
    pipe = StreamPipeline(load_adapter(cfg.model.name, cfg.model.device, cfg.model.dtype), cfg.stream_options(),
                          cfg.kv_replica_budget_bytes())
    pipe.open("ref")
    pipe.ingest("ref", [Frame(rgb[i], pts[i], i) for i in range(len(pts))])
    expected = "".join(pipe.ask("ref", "What moves?", max_new_tokens=6))
    sid = client.create_stream(stream_id="same")["stream_id"]
    client.push_frames(sid, rgb, pts, encoding="raw")  # raw: the same pixels as the pipeline's
    text, done = client.ask_text(sid, "What moves?", max_new_tokens=6, wait_s=60)
    assert text == expected and done["tokens"] >= 1
    assert client.stats(sid)["ingest"]["frames_encoded"] == 6
    client.close_stream(sid)


def test_latest_frame_and_yes_no_scores_through_the_cluster(service):
    """The console's frame.jpg and the watches' yes/no score reach the stream's ingest host and LLM replica."""
    from serve.deploy.hosts import STREAM_NAMESPACE

    client, _, cfg = service
    sid = client.create_stream(stream_id="scored")["stream_id"]
    rgb, pts = _frames(4)
    client.push_frames(sid, rgb, pts, encoding="raw")
    _wait(lambda: client.stats(sid)["ingest"]["frames_encoded"] == 4, 60, "4 frames encoded")
    with urllib.request.urlopen(f"{client.url}/streams/{sid}/frame.jpg", timeout=60) as resp:
        assert resp.headers["Content-Type"] == "image/jpeg" and resp.read(2) == b"\xff\xd8"
    from serve.deploy.hosts import directory_name

    directory = ray.get_actor(directory_name(cfg.serve.app_name), namespace=STREAM_NAMESPACE)
    token = ray.get(directory.get.remote(_host_of(sid), sid)).tokens[LLM]  # the stream's incarnation on the LLM
    llm = serve.get_deployment_handle(LLM, app_name=cfg.serve.app_name)
    yes, no = llm.score_choices.remote(sid, token, "Is something moving?", ["yes", "no"]).result()
    assert 0.0 < yes < 1.0 and 0.0 < no < 1.0
    with pytest.raises(Exception) as info:  # another incarnation's token is refused, never answered
        llm.score_choices.remote(sid, "stale-token", "Is something moving?", ["yes", "no"]).result()
    assert isinstance(unwrap(info.value), StreamMisroutedError)
    client.close_stream(sid)


def test_watches_live_in_the_ingest_host_and_every_ingress_sees_them(service):
    """A watch made over HTTP (through either of the 2 ingress replicas) is listed, polled and deleted through a second
    ingress instance -- a fresh RayBackend in this process, which finds the stream's host by name -- and vice versa;
    its events stream as SSE through the HTTP ingress; closing the stream ends them (an 'end' event, then the SSE
    stream closes). The answer's usage is exact: the KV tokens attended + the question's tokens."""
    import asyncio

    from serve.deploy.app import RayBackend
    from serve.core.watchset import WatchRequest
    from stream.models import load_adapter

    client, _, cfg = service
    sid = client.create_stream(stream_id="watched")["stream_id"]
    rgb, pts = _frames(4)
    client.push_frames(sid, rgb, pts, encoding="raw")
    _wait(lambda: client.stats(sid)["ingest"]["frames_encoded"] == 4, 60, "4 frames encoded")
    _, done = client.ask_text(sid, "What moves?", max_new_tokens=3, wait_s=60)
    q_tokens = load_adapter(cfg.model.name).question_embeds("What moves?").shape[0]
    assert done["prompt_tokens"] == client.stats(sid)["kv_tokens"] + q_tokens and done["completion_tokens"] >= 1

    made = client.add_watch(sid, "What moves?", 0.5, max_new_tokens=2)
    other = RayBackend(cfg, serve.get_deployment_handle(VISION, app_name=cfg.serve.app_name),
                       serve.get_deployment_handle(LLM, app_name=cfg.serve.app_name))
    assert [w.watch_id for w in asyncio.run(other.list_watches(sid))] == [made["watch_id"]]
    second = asyncio.run(other.add_watch(sid, WatchRequest(question="Is it red?", every_s=0.5, mode="yes_no")))
    for _ in range(8):  # each HTTP call lands on either ingress replica
        listed = client.list_watches(sid)
        assert sorted(w["watch_id"] for w in listed) == sorted([made["watch_id"], second.watch_id])
    assert client.delete_watch(sid, second.watch_id)["watch_id"] == second.watch_id
    assert [w.watch_id for w in asyncio.run(other.list_watches(sid))] == [made["watch_id"]]

    got: list = []

    def read() -> None:
        for item in client.events(sid):  # ends when the server ends the SSE stream
            got.append(item)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _wait(lambda: any(k == "answer" for k, _ in got), 60, "a watch answer over SSE")
    page = asyncio.run(other.watch_events(sid, 0, 2.0))  # the same events, polled through the other instance
    assert any(e.type == "answer" and e.watch_id == made["watch_id"] for e in page.events)
    assert client.close_stream(sid)["state"] == "closed"
    reader.join(timeout=30)
    assert not reader.is_alive(), "the SSE stream did not close after the stream was closed"
    assert got[-1][0] == "end" and got[-1][1]["reason"] == "closed"
    with pytest.raises(ServiceError) as info:
        client.list_watches(sid)
    assert info.value.status == 404


def test_twenty_streams_created_concurrently(service):
    from concurrent.futures import ThreadPoolExecutor

    client, _, _ = service
    t0 = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        made = list(pool.map(lambda i: _created_or_none(client, f"many{i}"), range(20)))
    took = time.monotonic() - t0
    try:
        listed = {s["stream_id"] for s in client.list_streams()}
        assert set(made) <= listed and None not in made
    finally:
        for sid in made:
            if sid is not None:
                client.close_stream(sid)
    assert not {s["stream_id"] for s in client.list_streams()} & set(made)
    print(f"20 concurrent creates answered in {took:.1f}s")


def _created_or_none(client, sid: str) -> str | None:
    try:
        return client.create_stream(stream_id=sid)["stream_id"]
    except ServiceError:
        return None


def test_fleet_question_and_moments_fan_out_over_both_ingest_hosts(service):
    client = service[0]
    names = [f"fleet-{i}" for i in range(50)]
    ids = [names[0], next(n for n in names if _host_of(n) != _host_of(names[0]))]  # one stream on each host
    for k, sid in enumerate(ids):
        client.create_stream(stream_id=sid, labels={"group": "fleet"})
        rgb, pts = _frames(4, 10 * k)
        client.push_frames(sid, rgb, pts, encoding="jpeg", flush=True)
    try:
        answers, done = client.fleet("Is there a square?", selector={"group": "fleet"}, mode="yes_no", wait_s=60)
        assert sorted(a["stream_id"] for a in answers) == sorted(ids) and all(a["status"] == 200 for a in answers)
        assert len(done["ranking"]) == 2 and all(a["frame_index"] == 3 for a in answers)
        texts, _ = client.fleet("What moves?", streams=ids, max_new_tokens=3)
        for a in texts:  # the same greedy answer as the stream's own question
            assert a["answer"] == client.ask_text(a["stream_id"], "What moves?", max_new_tokens=3)[0]
        found = client.fleet_moments("Is there a square?", selector={"group": "fleet"}, top_k=4)
        assert found["errors"] == {} and {m["stream_id"] for m in found["moments"]} == set(ids)
        best = found["moments"][0]
        assert client.thumbnail(best["stream_id"], best["thumbnail"]["id"])[:2] == b"\xff\xd8"
        assert {e["kind"] for e in client.timeline(best["stream_id"])["entries"]} == {"moment"}
    finally:
        for sid in ids:
            client.close_stream(sid)


# ---- faults: SIGKILL a replica, an ingress replica, an ingest host mid-stream --------------------------------------
def _host_of(sid: str) -> str:
    from serve.core.slots import rendezvous_pick

    return rendezvous_pick(sid, ["stc/ingest/0", "stc/ingest/1"])


def _ids_on_two_hosts() -> tuple[str, str]:
    names = [f"f{i}" for i in range(50)]
    a = names[0]
    return a, next(n for n in names if _host_of(n) != _host_of(a))


def _retry(call, timeout_s: float = 60):
    deadline = time.time() + timeout_s
    while True:
        try:
            return call()
        except Exception:  # noqa: BLE001 - a dead ingress may answer 5xx or drop the connection meanwhile
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _feed_and_check(client, sids, start: int) -> None:
    for sid in sids:
        rgb, pts = _frames(2, start)
        _retry(lambda: client.push_frames(sid, rgb, pts, encoding="jpeg"))
    for sid in sids:
        _, done = _retry(lambda: client.ask_text(sid, "And now?", max_new_tokens=2, wait_s=60))
        assert done["tokens"] >= 1
        ing = client.stats(sid)["ingest"]
        assert ing["frames_in"] == ing["frames_encoded"] + ing["frames_dropped"], ing  # nothing unaccounted


def _sigkill(pid: int) -> None:
    import signal

    os.kill(pid, signal.SIGKILL)


class _Questioner:
    """Asks both streams over and over (raw HTTP, to see statuses and headers) while a replica is killed."""

    def __init__(self, url: str, sids: tuple[str, ...]) -> None:
        import httpx

        self.client, self.sids = httpx.Client(base_url=url, timeout=120), sids
        self.seen: list[tuple[int, str | None, str]] = []  # (status, Retry-After, type) per answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        from serve.http.client import iter_sse

        while not self.stop.is_set():
            for sid in self.sids:
                resp = self.client.post(f"/streams/{sid}/questions", json={"question": "Now?", "max_new_tokens": 2})
                if resp.status_code != 200:
                    self.seen.append((resp.status_code, resp.headers.get("Retry-After"), resp.json()["error"]["type"]))
                    continue
                errors = [data for kind, data in iter_sse(resp) if kind == "error"]  # failed after it started
                self.seen.append((errors[0]["status"], str(errors[0].get("retry_after_s")), errors[0]["type"])
                                 if errors else (200, None, "done"))
            time.sleep(0.2)

    def finish(self) -> list[tuple[int, str | None, str]]:
        self.stop.set()
        self.thread.join(180)
        return self.seen


def test_sigkill_replicas_ingress_and_a_host_mid_stream(service):
    """Replica kills mid-stream, with questions asked all along: every stream survives (cold reset, counted),
    questions answer 200 or 503 with Retry-After (never 500, 404 or 409), and a deleted id is free at once."""
    import psutil

    client, _, _ = service
    a, b = _ids_on_two_hosts()
    for sid in (a, b):
        client.create_stream(stream_id=sid)
    _feed_and_check(client, (a, b), 0)
    for step, kind in enumerate((VISION, LLM)):  # kill the replica holding stream a
        owner = next(w for w in _where(kind) if a in w["streams"])
        asking = _Questioner(client.url, (a, b))
        time.sleep(0.5)
        _sigkill(owner["pid"])
        _feed_and_check(client, (a, b), 10 * (step + 1))
        seen = asking.finish()
        assert seen and {status for status, _, _ in seen} <= {200, 503}, seen
        assert all(retry for status, retry, _ in seen if status == 503), seen
        print(f"{kind} replica SIGKILLed: answers {sorted(Counter(status for status, _, _ in seen).items())}")
        st = client.stats(a)
        assert st["state"] == "running" and st["ingest"]["state_resets"] >= 1, st["ingest"]
        assert st["ingest"]["frames_lost"] >= 2  # the killed replica's state held a's first chunk
        assert client.stats(b)["state"] == "running"
    assert client.close_stream(b)["state"] == "closed"
    assert client.create_stream(stream_id=b)["stream_id"] == b  # the id is free the moment DELETE answered
    _feed_and_check(client, (b,), 35)
    ingress = [p for p in psutil.process_iter(["cmdline"]) if "ServeReplica:stc:ingress" in " ".join(
        p.info["cmdline"] or [])]
    assert ingress, "no ingress replica process found"
    _sigkill(ingress[0].pid)  # streams live in the ingest hosts, not in the ingress
    _feed_and_check(client, (a, b), 40)
    host = ray.get_actor(_host_of(a), namespace="stc-serve")
    _sigkill(ray.get(host.memory.remote()).pid)
    time.sleep(1.0)
    st = _retry(lambda: _expect_failed(client, a), 60)  # a's host died: a is listed as failed, not a 5xx or gone
    assert "ingest host" in st["error"] and "died" in st["error"], st
    assert a in {s["stream_id"]: s for s in client.list_streams() if s["state"] == "failed"}
    with pytest.raises(ServiceError) as info:  # a failed stream takes no frames: 409 with the reason
        client.push_frames(a, *_frames(2))
    assert info.value.status == 409 and "failed" in info.value.message
    _feed_and_check(client, (b,), 50)  # the stream on the other host carries on
    client.close_stream(b)
    assert client.close_stream(a)["state"] == "closed"  # DELETE frees the failed entry ...
    assert _retry(lambda: client.create_stream(stream_id=a))["stream_id"] == a  # ... and the id is free again
    client.close_stream(a)


def _expect_failed(client, sid) -> dict:
    st = client.stats(sid)
    if st["state"] != "failed":
        raise RuntimeError(f"not yet: {st['state']}")
    return st


def test_a_busy_owner_is_waited_for_and_never_split(service):
    """Real Serve with the service's router: two replicas taking one request at a time. While a stream's owner is
    busy with a slow call, the stream's next calls wait for that replica instead of going to the idle one (which
    would build split state). Control: Serve's default router does send them to the idle replica."""
    from ray.serve.config import RequestRouterConfig

    from serve.deploy.routing import StreamAffinityRouter

    def deploy(name: str, router: Any) -> Any:
        opts = {"request_router_config": RequestRouterConfig(request_router_class=router)} if router else {}

        @serve.deployment(num_replicas=2, max_ongoing_requests=1, ray_actor_options={"num_cpus": 0}, **opts)
        class Slow:
            def __init__(self) -> None:
                self.replica = serve.get_replica_context().replica_id.unique_id

            def work(self, stream_id: str, sleep_s: float) -> tuple[str, float, float]:
                start = time.time()
                time.sleep(sleep_s)
                return self.replica, start, time.time()

        return serve.run(Slow.bind(), name=name, route_prefix=None)

    def run(handle: Any) -> tuple[tuple[str, float, float], list[tuple[str, float, float]]]:
        for _ in range(4):  # both replicas up and warm
            handle.work.remote("warm", 0.0).result(timeout_s=60)
        slow = handle.work.remote("cam-1", 3.0)
        time.sleep(0.8)  # the slow call holds its replica's only slot now
        rest = [handle.work.remote("cam-1", 0.0) for _ in range(3)]
        return slow.result(timeout_s=60), [r.result(timeout_s=60) for r in rest]

    try:
        (owner, _, slow_end), rest = run(deploy("slow-affinity", StreamAffinityRouter))
        assert {r[0] for r in rest} == {owner}, "a call of the stream went to a replica that does not own it"
        assert all(r[1] >= slow_end - 0.05 for r in rest), "the calls must wait for the busy owner"
        (owner, _, _), rest = run(deploy("slow-default", None))
        assert {r[0] for r in rest} - {owner}, "control: the default router falls back to the idle replica"
    finally:
        for name in ("slow-affinity", "slow-default"):
            serve.delete(name)
