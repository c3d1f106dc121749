"""``/metrics`` in Prometheus' text format: the ingress's own series, and per-stream gauges and webhook counters read
from the backend at scrape time. Memory: ``stc_stream_device_bytes`` / ``stc_stream_host_bytes`` per stream and
component (measured on the tensors held, ``cache.memory.MemoryReport``), ``stc_replica_device_bytes`` their sum per
replica (stage ``llm``: the KV sessions and queued chunks; ``vision``: references on the device)."""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.core.api import StreamStats
from serve.core.stats import stream_memory
from serve.core.webhooks import WebhookStats


class Metrics:
    """Ingress-side series (requests by route and status, time to first answer piece, questions, long-lived
    requests refused); :meth:`render` adds the backend's numbers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stc_http_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=self.registry)
        self.ttft = Histogram("stc_ttft_seconds", "Question time to first answer piece (ingress).",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)
        self.questions = Counter("stc_questions", "Questions answered.", registry=self.registry)

    def render(self, streams: list[StreamStats], webhooks: list[WebhookStats], gate: dict[str, int]) -> bytes:
        """The whole scrape: the ingress's series, then the streams', webhooks' and long-lived requests' gauges."""
        scraped = CollectorRegistry()
        scraped.register(_Collector(streams, webhooks, gate))
        return generate_latest(self.registry) + generate_latest(scraped)


class _Collector:
    _FIELDS = (
        ("frames_in", "Frames decoded or pushed."),
        ("frames_encoded", "Frames through the encoder."),
        ("frames_dropped", "Frames dropped because the encoder lagged or a replica was being replaced."),
        ("reconnects", "Live-source reconnects."),
        ("state_resets", "Cold restarts of the stream's model state."),
    )

    def __init__(self, streams: list[StreamStats], webhooks: list[WebhookStats], gate: dict[str, int]) -> None:
        self.streams, self.webhooks, self.gate = streams, webhooks, gate

    def collect(self) -> Iterator[Any]:
        yield _gauge("stc_streams_open", "Open streams.", [((), len(self.streams))])
        for name, doc in self._FIELDS:
            rows = [((s.stream_id,), getattr(s.ingest, name)) for s in self.streams]
            yield _gauge(f"stc_stream_{name}", doc, rows, ["stream"])
        for name, doc in (("kv_bytes", "KV cache bytes."), ("tokens_kept", "Visual tokens kept by the pruner."),
                          ("cache_reuse", "Share of frames reusing cached ViT states (0..1).")):
            rows = [((s.stream_id,), getattr(s, name)) for s in self.streams if getattr(s, name) is not None]
            yield _gauge(f"stc_stream_{name}", doc, rows, ["stream"])
        yield from self._memory()
        events = CounterMetricFamily("stc_webhook_events", "Webhook events by destination and outcome (delivered, "
                                     "failed after every retry, dropped from a full queue).",
                                     labels=["destination", "outcome"])
        for w in self.webhooks:
            for outcome in ("delivered", "failed", "dropped"):
                events.add_metric([w.destination, outcome], float(getattr(w, outcome)))
        yield events
        yield _gauge("stc_webhook_pending", "Webhook events waiting per destination.",
                     [((w.destination,), w.pending) for w in self.webhooks], ["destination"])
        yield _gauge("stc_long_lived_open", "Event readers and answers streaming now (this ingress replica).",
                     [((), self.gate.get("open", 0))])
        refused = CounterMetricFamily("stc_long_lived_refused", "Event readers and answers refused with 429 "
                                      "(this ingress replica).")
        refused.add_metric([], float(self.gate.get("refused", 0)))
        yield refused


    _DEVICE = ("kv_window", "kv_sinks", "kv_reserve", "kv_retrieved", "references", "queued_chunks")
    _HOST = (("kv_offloaded", "host_offloaded"), ("references", "host_references"), ("pruner", "host_pruner"),
             ("gate", "host_gate"))

    def _memory(self) -> Iterator[Any]:
        """Device and host bytes per stream and component; device bytes summed per replica."""
        device, host, replicas = [], [], {}
        for s in self.streams:
            if s.llm is None and s.vision is None:
                continue
            mem = stream_memory(s.vision, s.llm)
            device += [((s.stream_id, c), getattr(mem, c)) for c in self._DEVICE]
            host += [((s.stream_id, c), getattr(mem, field)) for c, field in self._HOST]
            for stage, stats, parts in (("llm", s.llm, self._DEVICE[:4] + ("queued_chunks",)),
                                        ("vision", s.vision, ("references",))):
                if stats is None:
                    continue
                for c in parts:
                    key = (stage, stats.replica or "local", c)
                    replicas[key] = replicas.get(key, 0) + getattr(mem, c)
        yield _gauge("stc_stream_device_bytes", "Device bytes a stream holds, by component (measured).", device,
                     ["stream", "component"])
        yield _gauge("stc_stream_host_bytes", "Host bytes a stream holds, by component (measured).", host,
                     ["stream", "component"])
        yield _gauge("stc_replica_device_bytes", "Device bytes of a replica's streams, by component.",
                     list(replicas.items()), ["stage", "replica", "component"])


def _gauge(name: str, doc: str, rows: list[tuple[tuple[Any, ...], float]],
           labels: list[str] | None = None) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(name, doc, labels=labels or [])
    for values, value in rows:
        fam.add_metric([str(v) for v in values], float(value))
    return fam
