"""Ingest hosts in the Ray service: :class:`serve.core.hosts.IngestHost` as detached actors over Serve handles.

A few service-owned actors (``<app>/ingest/<k>`` in namespace ``stc-serve``), created on first use by whichever
ingress replica needs one, each run many streams; a stream id maps to a host by consistent hashing, so every ingress
replica finds every stream and ingress replicas can scale or die without touching streams. A host that dies is
restarted by Ray empty and accounts for the streams it lost through the app's
:class:`serve.core.directory.StreamDirectory` actor.
"""
from __future__ import annotations

from typing import Any, Iterator

import ray
from ray import serve

from serve.core.directory import StreamRecord
from serve.core.flow import LLM, VISION
from serve.core.hosts import IngestHost
from serve.core.settings import IngestSettings, TimelineSettings, WatchSettings
from serve.deploy.replicas import call_stream, stream_call
from stream.config import SourceConfig
from stream.memory import freeze_startup_objects

STREAM_NAMESPACE = "stc-serve"


class ServeTransport:
    """:class:`serve.core.flow.StageTransport` over the vision and LLM deployment handles (routed by stream id)."""

    def __init__(self, vision: Any, llm: Any, ingest: IngestSettings) -> None:
        self.handles = {VISION: vision, LLM: llm}
        self.ingest = ingest

    def _retry_s(self, method: str) -> float:
        if method == "close":
            return 1.0
        if method == "stats":  # best effort: a lost stream's stats must not hold the caller for long
            return min(2.0, self.ingest.misroute_retry_s)
        return self.ingest.misroute_retry_s

    def call(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Any:
        return call_stream(self.handles[kind], method, stream_id, token, *args,
                           timeout_s=self.ingest.call_timeout_s, retry_s=self._retry_s(method))

    def stream(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Iterator[Any]:
        return stream_call(self.handles[kind], method, stream_id, token, *args, retry_s=self._retry_s(method))


class RemoteDirectory:
    """A :class:`StreamDirectory` actor called synchronously from a host's threads (``timeout_s`` per call)."""

    def __init__(self, handle: Any, timeout_s: float = 10.0) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    def _call(self, method: str, *args: Any) -> Any:
        return ray.get(getattr(self.handle, method).remote(*args), timeout=self.timeout_s)

    def record(self, rec: StreamRecord) -> None:
        self._call("record", rec)

    def forget(self, host: str, stream_id: str) -> bool:
        return self._call("forget", host, stream_id)

    def take(self, host: str) -> list[StreamRecord]:
        return self._call("take", host)


class IngestHostActor(IngestHost):
    """The Ray actor form of :class:`serve.core.hosts.IngestHost` (deployment handles looked up inside the actor)."""

    def __init__(self, app_name: str, source_config: SourceConfig, ingest: IngestSettings, ttl_s: float,
                 watches: WatchSettings | None = None, trim_on_close: bool = False, gc_freeze: bool = False,
                 timeline: TimelineSettings | None = None) -> None:
        handles = [serve.get_deployment_handle(kind, app_name=app_name) for kind in (VISION, LLM)]
        context = ray.get_runtime_context()
        directory = RemoteDirectory(ray.get_actor(directory_name(app_name), namespace=STREAM_NAMESPACE))
        super().__init__(ServeTransport(*handles, ingest), source_config, ingest, ttl_s,
                         context.was_current_actor_reconstructed, watches, directory, context.get_actor_name(),
                         trim_on_close, timeline=timeline)
        if gc_freeze:  # after start-up: torch, Ray and the handles are loaded (serve.process.gc_freeze)
            freeze_startup_objects()


def directory_name(app_name: str) -> str:
    """The name of the app's detached :class:`serve.core.directory.StreamDirectory` actor."""
    return f"{app_name}/directory"
