"""Webhook delivery under stalling receivers (all on 127.0.0.1): a receiver that hangs or drips delays only its own
destination, each attempt ends at its deadline, and delivered / failed / dropped are counted per destination
(``/metrics``) and per watch (the watch listing)."""
from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient

from serve.core.config import ServiceConfig
from serve.core.local import LocalBackend
from serve.core.protocol import CONTENT_TYPE, encode_frames
from serve.core import webhooks
from serve.core.webhooks import WebhookSender
from serve.http.app import make_api
from tests.loopback import Receiver, Stall
from tests.service_doubles import FakeLLMStage, FakeVisionStage, frames


def _until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_stalling_destination_does_not_delay_another():
    stall, healthy = Stall(), Receiver()
    sender = WebhookSender(["127.0.0.1"], retries=1, backoff_s=0.05, timeout_s=0.5)
    try:
        t0 = time.monotonic()
        for i in range(10):  # interleaved: the stalling sink's events come first every time
            sender.send(stall.url, {"i": i})
            sender.send(healthy.url, {"i": i})
        assert _until(lambda: len(healthy.got) == 10, 3.0), len(healthy.got)
        assert time.monotonic() - t0 < 3.0
        assert [json.loads(b)["i"] for b in healthy.got] == list(range(10))  # in order
        stats = {s.destination: s for s in sender.stats()}
        assert stats[webhooks.destination_of(healthy.url)].delivered == 10
        assert stats[webhooks.destination_of(stall.url)].delivered == 0
    finally:
        stall.close()
        healthy.close()


def test_each_attempt_ends_at_its_deadline_even_against_a_dripping_receiver():
    drip = Stall(drip_s=0.1)  # answers one byte every 0.1 s, forever: no read timeout ever fires
    try:
        t0 = time.monotonic()
        assert webhooks.post_with_deadline(drip.url, b"{}", 0.5) is None
        assert time.monotonic() - t0 < 1.0
        sender = WebhookSender(["127.0.0.1"], retries=2, backoff_s=0.05, timeout_s=0.4)
        outcomes: list[str] = []
        t0 = time.monotonic()
        sender.send(drip.url, {"x": 1}, outcomes.append)
        assert _until(lambda: outcomes == ["failed"], 5.0), outcomes
        assert time.monotonic() - t0 < 3 * 0.4 + 0.15 + 0.6  # three attempts of 0.4 s, backoff, margin
        assert sender.stats()[0].failed == 1
    finally:
        drip.close()


def test_a_full_destination_queue_drops_and_counts():
    stall = Stall()
    sender = WebhookSender(["127.0.0.1"], retries=0, timeout_s=2.0, max_pending=2)
    outcomes: list[str] = []
    try:
        for i in range(10):
            sender.send(stall.url, {"i": i}, outcomes.append)
        stats = sender.stats()[0]
        assert stats.dropped == outcomes.count("dropped") >= 7 and stats.pending <= 2
    finally:
        stall.close()


def test_counters_reach_the_watch_listing_and_metrics():
    healthy, stall = Receiver(), Stall()
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 4},
                               "serve": {"max_streams": 4, "watches": {
                                   "webhook_hosts": ["127.0.0.1"], "webhook_timeout_s": 0.3, "webhook_retries": 0}}})
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), FakeVisionStage(), FakeLLMStage())
    try:
        with TestClient(make_api(backend, cfg.serve)) as client:
            assert client.post("/streams", json={"stream_id": "cam"}).status_code == 201
            rgb, pts = frames(4)
            client.post("/streams/cam/frames?flush=true", content=encode_frames(rgb, pts),
                        headers={"Content-Type": CONTENT_TYPE})
            for url in (healthy.url, stall.url):
                assert client.post("/streams/cam/watches", json={"question": "what?", "every_s": 0.2,
                                                                 "webhook": url}).status_code == 201

            def counted() -> dict[str, dict]:
                return {w["request"]["webhook"]: w for w in client.get("/streams/cam/watches").json()["watches"]}

            assert _until(lambda: counted()[healthy.url]["webhook_delivered"] >= 2
                          and counted()[stall.url]["webhook_failed"] >= 1, 10.0), counted()
            metrics = client.get("/metrics").text
            good, bad = webhooks.destination_of(healthy.url), webhooks.destination_of(stall.url)
            assert f'stc_webhook_events_total{{destination="{good}",outcome="delivered"}}' in metrics
            assert f'stc_webhook_events_total{{destination="{bad}",outcome="failed"}}' in metrics
    finally:
        backend.shutdown()
        healthy.close()
        stall.close()
