"""A short, bounded hostile run on loopback: a canary stream pushes and asks throughout while decompression bombs,
oversized batches, bad fields, a reader flood, a stalling webhook and a lost LLM replica hit the service. Asserts 0
canary failures and no 5xx anywhere but the 503s (with Retry-After) of questions on the stream whose replica is being
replaced; prints one JSON line of figures (docs/operations.md#reliability).

The service is the real HTTP app under uvicorn on 127.0.0.1 over one ingest host whose vision/LLM "replicas" are
in-process doubles behind a rendezvous router (tests/replica_doubles.py), so a replica can be killed mid-run. The
real-Ray replica kills are in tests/test_service_ray.py and ``benchmarks/bench_soak.py --kill-llm-after``."""
from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack

from serve.core.config import ServiceConfig
from serve.core.flow import LLM, VISION
from serve.core.hosts import IngestHost
from serve.core.local import LocalBackend
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.http.app import make_api
from tests.loopback import Receiver, Stall, serve_app
from tests.replica_doubles import ReplicaSetTransport
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames
from tests.test_push_bombs import _jpeg_batch, _solid, bomb

MSGPACK = {"Content-Type": CONTENT_TYPE}
READERS = 40


class Canary:
    """Pushes 2 frames every 50 ms and asks every 4th time; every answer that is not 2xx is a failure."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.pushes = self.asks = 0
        self.ask_s: list[float] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            rgb, pts = frames(2, start=2 * k)
            self._check("push", self.client.post("/streams/canary/frames?flush=true", content=encode_frames(rgb, pts),
                                                 headers=MSGPACK))
            self.pushes += 1
            if k % 4 == 0:
                t0 = time.monotonic()
                resp = self.client.post("/streams/canary/questions", json={"question": "what now?", "wait_s": 2})
                self._check("ask", resp)
                if resp.status_code == 200 and "event: done" not in resp.text:
                    self.failures.append(f"ask without a done event: {resp.text[:200]}")
                self.ask_s.append(time.monotonic() - t0)
                self.asks += 1
            k += 1
            time.sleep(0.05)

    def _check(self, what: str, resp: httpx.Response) -> None:
        if resp.status_code >= 300:
            self.failures.append(f"{what}: {resp.status_code} {resp.text[:200]}")


class PeakRss:
    """The largest growth of this process's resident memory while inside (sampled every 5 ms), in MB."""

    def __enter__(self) -> "PeakRss":
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak_mb = round((self.peak - self.base) / 2**20, 1)


def _pick_victim(transport: ReplicaSetTransport) -> str:
    canary = transport.owner(LLM, "canary")
    return next(f"victim{i}" for i in range(100) if transport.owner(LLM, f"victim{i}") != canary)


def test_hostile_run_keeps_the_canary_whole_and_answers_no_5xx():
    transport = ReplicaSetTransport({VISION: lambda: FakeVisionStage(delay_s=0.005), LLM: FakeLLMStage}, replicas=2)
    cfg = ServiceConfig.parse({
        "sampler": {"fps": 1000.0, "frames_per_chunk": 2},
        "serve": {"max_streams": 16, "max_readers_per_stream": 4, "max_long_lived_per_replica": 24,
                  "watches": {"webhook_hosts": ["127.0.0.1"], "webhook_timeout_s": 0.5, "webhook_retries": 0}},
    })
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), FakeLLMStage())
    backend.host.shutdown()
    backend.host = IngestHost(transport, cfg.source, cfg.serve.ingest, cfg.serve.stream_ttl_s,
                              watches=cfg.serve.watches)
    healthy, stall = Receiver(), Stall()
    statuses: list[int] = []
    figures: dict[str, object] = {}
    t_start = time.monotonic()
    try:
        with serve_app(make_api(backend, cfg.serve)) as url, httpx.Client(base_url=url, timeout=30) as c:
            victim = _pick_victim(transport)
            for sid in ("canary", victim, "quiet"):
                assert c.post("/streams", json={"stream_id": sid}).status_code == 201
            canary = Canary(url)
            canary.thread.start()

            def hit(method: str, path: str, **kw) -> httpx.Response:
                resp = c.request(method, path, **kw)
                statuses.append(resp.status_code)
                return resp

            # 1. decompression bombs and oversized batches: refused on their headers, 413
            with PeakRss() as bombs:
                t0 = time.monotonic()
                for _ in range(5):
                    assert hit("POST", f"/streams/{victim}/frames", content=_jpeg_batch([bomb()] * 32),
                               headers=MSGPACK).status_code == 413
                figures["bomb_refusal_ms"] = round((time.monotonic() - t0) / 5 * 1000, 1)
            figures["bomb_rss_peak_mb"] = bombs.peak_mb
            with PeakRss() as biggest:  # the largest push accepted: one 4096x4096 frame (16.8 M pixels)
                t0 = time.monotonic()
                assert hit("POST", f"/streams/{victim}/frames", content=_jpeg_batch([_solid(4096)]),
                           headers=MSGPACK).status_code == 200
                figures["max_push_ms"] = round((time.monotonic() - t0) * 1000, 1)
            figures["max_push_rss_peak_mb"] = biggest.peak_mb
            assert hit("POST", f"/streams/{victim}/frames", content=_jpeg_batch([_solid(4096)] * 2),
                       headers=MSGPACK).status_code == 413
            many = msgpack.packb({"v": 1, "encoding": "raw", "pts": [i / 10 for i in range(257)],
                                  "shape": [257, 2, 2, 3], "dtype": "uint8", "data": bytes(257 * 12)},
                                 use_bin_type=True)
            assert hit("POST", f"/streams/{victim}/frames", content=many, headers=MSGPACK).status_code == 413
            # 2. fields out of range
            assert hit("POST", f"/streams/{victim}/questions",
                       json={"question": "q", "temperature": 1, "seed": 2**80}).status_code == 422
            assert hit("POST", f"/streams/{victim}/watches", json={"question": "x" * 2000, "every_s": 1}).status_code \
                == 413
            chat = {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "q"}, {"type": "video_url", "video_url": {"url": f"stream://{victim}"}}]}]}
            assert hit("POST", "/v1/chat/completions", json={**chat, "model": "gpt-x"}).status_code == 400
            assert hit("POST", "/v1/chat/completions", json={**chat, "model": "stc-serve", "n": 3}).status_code == 400
            # 3. a stalling webhook beside a healthy one
            for sid, hook in ((victim, stall.url), ("canary", healthy.url)):
                assert hit("POST", f"/streams/{sid}/watches",
                           json={"question": "anyone?", "every_s": 0.2, "webhook": hook}).status_code == 201
            # 4. a reader flood: 40 readers on 3 streams against caps of 4 per stream and 24 per replica
            readers: list[int] = []
            flood = _flood(url, [victim, "quiet", "canary"] * (READERS // 3 + 1), readers)
            health_s = []
            for _ in range(10):
                t0 = time.monotonic()
                assert hit("GET", "/health").status_code == 200
                health_s.append(time.monotonic() - t0)
            flood.set()
            statuses.extend(readers)
            assert readers.count(200) == 3 * 4 and readers.count(429) == READERS - 12  # 4 per stream
            figures["health_ms_max_during_flood"] = round(max(health_s) * 1000, 1)
            # 5. the victim's LLM replica dies; the router learns the replacement 0.5 s later
            transport.kill(LLM, transport.owner(LLM, victim), refresh_view=False)
            during = [hit("POST", f"/streams/{victim}/questions", json={"question": "still there?"})
                      for _ in range(3)]
            assert {r.status_code for r in during} == {503} and all(r.headers["Retry-After"] for r in during)
            time.sleep(0.5)
            transport.refresh()
            after = hit("POST", f"/streams/{victim}/questions", json={"question": "and now?"})
            assert after.status_code == 200 and "event: done" in after.text
            assert hit("GET", f"/streams/{victim}").json()["ingest"]["state_resets"] == 1
            # 6. DELETE frees the id at once
            assert hit("DELETE", f"/streams/{victim}").status_code == 200
            assert hit("POST", "/streams", json={"stream_id": victim}).status_code == 201
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(healthy.got) < 3:
                time.sleep(0.05)
            figures["healthy_webhook_events"] = len(healthy.got)
            canary.stop.set()
            canary.thread.join(30)
            st = c.get("/streams/canary").json()
            metrics = c.get("/metrics").text
    finally:
        backend.shutdown()
        healthy.close()
        stall.close()
    ing = st["ingest"]
    assert canary.failures == [], canary.failures[:5]
    assert st["state"] == "running" and ing["state_resets"] == 0
    assert ing["frames_in"] == ing["frames_encoded"] + ing["frames_dropped"]
    # no 5xx but the three 503s (with Retry-After) of questions on the stream whose replica was being replaced
    assert [s for s in statuses if s >= 500] == [503] * 3 and 'status="500"' not in metrics
    assert figures["healthy_webhook_events"] >= 3  # the stalling sink did not hold the healthy one back
    assert figures["bomb_rss_peak_mb"] < 64  # 537 M declared pixels (1.6 GB of RGB) never decoded
    figures.update(seconds=round(time.monotonic() - t_start, 1), canary_pushes=canary.pushes, canary_asks=canary.asks,
                   canary_failures=len(canary.failures), canary_frames_in=ing["frames_in"],
                   canary_ask_ms_p50=round(statistics.median(canary.ask_s) * 1000, 1),
                   canary_ask_ms_max=round(max(canary.ask_s) * 1000, 1),
                   readers=READERS, readers_accepted=readers.count(200), readers_refused_429=readers.count(429),
                   responses=len(statuses), responses_503_in_recovery=statuses.count(503), responses_500=0)
    print(json.dumps({"test": "hostile_run", **figures}))


def _flood(url: str, streams: list[str], statuses: list[int]) -> threading.Event:
    """Open ``READERS`` event readers at once (each holds its connection until the returned event is set)."""
    done, opened = threading.Event(), threading.Barrier(READERS + 1, timeout=30)

    def reader(sid: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client, client.stream("GET", f"/streams/{sid}/events") as r:
            statuses.append(r.status_code)
            opened.wait()
            done.wait(30)

    pool = ThreadPoolExecutor(READERS)
    for sid in streams[:READERS]:
        pool.submit(reader, sid)
    opened.wait()
    pool.shutdown(wait=False)
    return done
