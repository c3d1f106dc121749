"""Ingest hosts: a few service-owned actors that each run many streams (no process per stream).

An :class:`IngestHost` holds :class:`serve.streams.StreamRunner` objects (threads and bounded buffers, tens of MB per
stream at most) whose chunks go through one :class:`serve.flow.StageFlow` each, over :class:`ServeTransport`. Hosts
are detached named actors (``<app>/ingest/<k>`` in namespace ``stc-serve``), created on first use by whichever
ingress replica needs one; a stream id maps to a host by consistent hashing, so every ingress replica finds every
stream and ingress replicas can scale or die without touching streams. A host that dies is restarted by Ray
empty; the :class:`serve.directory.StreamDirectory` still knows the streams it ran, so the restarted host lists them
as ``failed`` with the reason (409 to pushes and questions, DELETE frees them) and frees their replica state at
once (the replicas' ``state_ttl_s`` reaper is the backstop). Ended, failed and idle streams are closed after ``serve.stream_ttl_s``. A host also owns its
streams' standing questions (a :class:`serve.watchset.WatchHub`: watches, event rings, the watch rate limit), so any
ingress replica reaches a watch the way it reaches the stream; they end with the stream.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from serve.api import (
    IngestStats,
    PushResponse,
    StreamExistsError,
    StreamMisroutedError,
    StreamNotFoundError,
    StreamStateError,
    StreamStats,
)
from serve.directory import RemoteDirectory, StreamRecord
from serve.flow import LLM, VISION, StageFlow
from serve.protocol import jpeg_bytes
from serve.replicas import call_stream, replica_gone, unwrap
from serve.service_config import IngestSettings, WatchSettings
from serve.streams import StreamRunner
from serve.watchset import EventsPage, FlowAsker, Watch, WatchHub, WatchRequest
from serve.webhooks import WebhookSender
from stream.config import SourceConfig
from stream.frames import FrameBatch
from stream.memory import freeze_startup_objects, gc_stats, heap_stats, trim_heap

STREAM_NAMESPACE = "stc-serve"


class ServeTransport:
    """:class:`serve.flow.StageTransport` over the vision and LLM deployment handles (routed by stream id)."""

    def __init__(self, vision: Any, llm: Any, ingest: IngestSettings) -> None:
        self.handles = {VISION: vision, LLM: llm}
        self.ingest = ingest

    def call(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Any:
        retry_s = 1.0 if method == "close" else self.ingest.misroute_retry_s
        return call_stream(self.handles[kind], method, stream_id, token, *args,
                           timeout_s=self.ingest.call_timeout_s, retry_s=retry_s)

    def ask(self, stream_id: str, token: str, question: str, max_new_tokens: int, **kw: Any) -> Iterator[Any]:
        """The answer's items from the LLM replica holding the stream (text pieces and ``AnswerUsage``); blocking,
        for the host's threads (watch questions)."""
        try:
            gen = self.handles[LLM].options(stream=True).ask.remote(stream_id, token, question, max_new_tokens,
                                                                    kw.get("sampling"))
            yield from gen
        except Exception as exc:
            err = unwrap(exc)
            if replica_gone(err):
                err = StreamMisroutedError(f"the replica serving stream {stream_id!r} is gone ({type(err).__name__})")
            raise err from None


def failed_stats(rec: StreamRecord, reason: str) -> StreamStats:
    """The stats a host reports for a stream it lost: ``failed`` with the reason, counters unknown (zero)."""
    return StreamStats(stream_id=rec.stream_id, kind=rec.kind, source=rec.source, state="failed", error=reason,
                       created_at=rec.created_at, ingest=IngestStats())


@dataclass
class _Entry:
    runner: StreamRunner
    flow: StageFlow
    touched: float = field(default_factory=time.monotonic)


class IngestHost:
    """Many streams' ingest in one process.

    Args:
        transport: how the streams' flows reach the stages.
        source_config: how sources are opened.
        ingest: queue sizes and timeouts.
        ttl_s: ended, failed or idle streams are closed after this long.
        restarted: this host is a restart of one that died (its streams were lost).
        watches: bounds and rate limit of the standing questions on this host's streams.
        directory: where the host records its open streams (a :class:`serve.directory.StreamDirectory` or its
            remote form); ``None``: a restart cannot name the streams it lost.
        name: this host's name in the directory.
    """

    def __init__(self, transport: Any, source_config: SourceConfig, ingest: IngestSettings, ttl_s: float,
                 restarted: bool = False, watches: WatchSettings | None = None, directory: Any | None = None,
                 name: str = "ingest", trim_on_close: bool = False) -> None:
        self.transport = transport
        self.trim_on_close = trim_on_close  # give the closed stream's freed decoder buffers back (malloc_trim)
        self.source_config = source_config
        self.ingest = ingest
        self.ttl_s = ttl_s
        self.restarted_at = time.time() if restarted else None
        self.reaped = 0
        self.reap_errors: collections.deque[str] = collections.deque(maxlen=32)  # bounded: the latest only
        self._streams: dict[str, _Entry] = {}
        self._starting: set[str] = set()
        self._lock = threading.Lock()
        self.directory, self.name = directory, name
        self._lost: dict[str, tuple[StreamRecord, str, float]] = {}  # id -> (record, reason, since): failed
        if restarted and directory is not None:
            self._account_for_lost()
        ws = watches or WatchSettings()
        self._watches = WatchHub(FlowAsker(self._runner), ws, WebhookSender(ws.webhook_hosts))
        threading.Thread(target=self._reap_forever, name="stc-reaper", daemon=True).start()

    def _account_for_lost(self) -> None:
        """List the streams the dead incarnation ran as ``failed``; free their replica state in the background."""
        when = time.strftime("%H:%M:%S", time.gmtime(self.restarted_at or time.time()))
        reason = (f"its ingest host {self.name} died and was restarted at {when} UTC: the stream's ingest and context "
                  "are lost. Fix: DELETE it and create it again.")
        records = self.directory.take(self.name)
        for rec in records:
            self._lost[rec.stream_id] = (rec, reason, time.monotonic())

        def free() -> None:
            for rec in records:
                for kind, token in rec.tokens.items():
                    try:
                        self.transport.call(kind, "close", rec.stream_id, token)
                    except Exception:  # noqa: BLE001 - already gone; the replicas' reaper is the backstop
                        pass
        threading.Thread(target=free, name="stc-free-lost", daemon=True).start()

    def _record(self, stream_id: str, entry: _Entry) -> None:
        """Tell the directory the stream is open (best effort: a directory outage must not fail the stream)."""
        if self.directory is None:
            return
        rec = StreamRecord(stream_id, self.name, entry.runner.kind, entry.runner.source_spec, entry.runner.created_at,
                           {k: entry.flow.token(k) for k in (VISION, LLM)})
        try:
            self.directory.record(rec)
        except Exception:  # noqa: BLE001
            pass

    def _forget(self, stream_id: str) -> None:
        if self.directory is not None:
            try:
                self.directory.forget(self.name, stream_id)
            except Exception:  # noqa: BLE001
                pass

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def create(self, stream_id: str, source_spec: str | None, resolved: str, options: Any) -> StreamStats:
        """Open the stream (source, then stage state) and start its ingest threads."""
        with self._lock:
            if stream_id in self._streams or stream_id in self._starting or stream_id in self._lost:
                raise StreamExistsError(f"stream {stream_id!r} is already open (or failed). Fix: pick another id or "
                                        "DELETE it first.")
            self._starting.add(stream_id)
        flow = StageFlow(self.transport)
        runner = StreamRunner(stream_id, source_spec, resolved, options, self.source_config, self.ingest, flow)
        try:
            runner.start()
        finally:
            with self._lock:
                self._starting.discard(stream_id)
        entry = _Entry(runner, flow)
        with self._lock:
            self._streams[stream_id] = entry
        self._record(stream_id, entry)
        return runner.stats()

    def close(self, stream_id: str) -> StreamStats:
        """Stop the stream and free its state everywhere; returns its final stats."""
        with self._lock:
            if stream_id in self._starting:
                raise StreamStateError(f"stream {stream_id!r} is still being created. Fix: DELETE it again once "
                                       "POST /streams answered.")
            entry = self._streams.pop(stream_id, None)
            lost = self._lost.pop(stream_id, None)
        if lost is not None:
            return failed_stats(lost[0], lost[1]).model_copy(update={"state": "closed"})
        if entry is None:
            raise self._not_found(stream_id)
        final = entry.runner.stats()
        entry.runner.close()
        self._forget(stream_id)
        self._watches.end_stream(stream_id, "closed")
        if self.trim_on_close:
            trim_heap()
        return final.model_copy(update={"state": "closed"})

    def ids(self) -> list[str]:
        """Open and failed (lost) streams."""
        with self._lock:
            return sorted([*self._streams, *self._lost])

    def reap(self, now: float | None = None) -> list[str]:
        """Close streams ended, failed or idle for longer than the TTL."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [sid for sid, e in self._streams.items()
                   if now - max(e.touched, e.runner.worker.last_activity if e.runner.worker else 0.0) > self.ttl_s]
            for sid in [sid for sid, (_, _, since) in self._lost.items() if now - since > self.ttl_s]:
                del self._lost[sid]
        for sid in due:
            self._watches.end_stream(sid, "reaped")
            try:
                self.close(sid)
                self.reaped += 1
            except (StreamNotFoundError, StreamStateError):
                pass
            except Exception as exc:  # noqa: BLE001 - a stage that fails to close must not stop the reaper
                self.reap_errors.append(f"{sid}: {type(exc).__name__}: {exc}"[:300])
        return due

    def _reap_forever(self) -> None:
        while True:
            time.sleep(max(0.05, min(self.ttl_s / 4, 30.0)))
            self.reap()

    # -- per-stream calls --------------------------------------------------------------------------------------------
    def _get(self, stream_id: str) -> _Entry:
        with self._lock:
            entry = self._streams.get(stream_id)
            if entry is not None:
                entry.touched = time.monotonic()
                return entry
            lost = self._lost.get(stream_id)
        if lost is not None:
            raise StreamStateError(f"stream {stream_id!r} failed: {lost[1]}")
        raise self._not_found(stream_id)

    def _not_found(self, stream_id: str) -> StreamNotFoundError:
        lost = ""
        if self.restarted_at is not None:
            lost = (f" (its ingest host was restarted at {time.strftime('%H:%M:%S', time.gmtime(self.restarted_at))}"
                    " UTC after it died: the streams it ran are lost)")
        return StreamNotFoundError(f"no open stream {stream_id!r}{lost}. Fix: list streams with GET /streams, or "
                                   "create one with POST /streams.")

    def push(self, stream_id: str, batch: FrameBatch, flush: bool) -> PushResponse:
        return self._get(stream_id).runner.push(batch, flush)

    def wait_idle(self, stream_id: str, timeout_s: float) -> bool:
        return self._get(stream_id).runner.wait_idle(timeout_s)

    def begin_question(self, stream_id: str) -> str:
        """Count a question; returns the LLM incarnation token the question must carry."""
        entry = self._get(stream_id)
        entry.runner.questions += 1
        return entry.flow.token(LLM)

    def token(self, stream_id: str, kind: str) -> str:
        """The stream's current incarnation token on one stage (calls to that stage must carry it)."""
        return self._get(stream_id).flow.token(kind)

    def frame_jpeg(self, stream_id: str) -> bytes | None:
        """The stream's newest sampled frame as JPEG (None before the first chunk)."""
        frame = self._get(stream_id).runner.last_frame
        return None if frame is None else jpeg_bytes(frame)

    def reopen(self, stream_id: str, kind: str) -> str:
        """Rebuild one stage's state cold (its replica lost it); returns the new token."""
        entry = self._get(stream_id)
        entry.flow.reopen(kind, stream_id)
        self._record(stream_id, entry)  # the new token, so a restarted host frees the right state
        return entry.flow.token(kind)

    def stats(self, stream_id: str) -> tuple[StreamStats, dict[str, str]]:
        """The runner's stats and the stream's incarnation tokens (for the stage stats calls); a lost stream's
        ``failed`` stats and no tokens."""
        with self._lock:
            lost = self._lost.get(stream_id)
        if lost is not None:
            return failed_stats(lost[0], lost[1]), {}
        entry = self._get(stream_id)
        return entry.runner.stats(), {k: entry.flow.token(k) for k in (VISION, LLM)}

    def memory(self) -> dict[str, Any]:
        """This host's resident memory, glibc heap (:func:`stream.memory.heap_stats`), stream count and ``frames_mb``,
        the pixels its streams hold in their bounded chunk queues (soak benchmark, health): RSS minus that is
        what a leak would show in; and the cyclic garbage collector's counters (:func:`stream.memory.gc_stats`)."""
        import os

        import psutil

        with self._lock:
            runners = [entry.runner for entry in self._streams.values()]
        frames = sum(runner.frame_bytes() for runner in runners)
        return {"streams": len(self.ids()), "pid": os.getpid(), "frames_mb": frames / 2**20,
                "rss_mb": psutil.Process().memory_info().rss / 2**20, **(heap_stats() or {}), **gc_stats()}


    # -- watches (standing questions): owned here, with their streams, so every ingress replica sees them ---------
    def _runner(self, stream_id: str) -> StreamRunner:
        """The open stream's runner without touching it (watch ticks do not keep an idle stream alive)."""
        with self._lock:
            entry = self._streams.get(stream_id)
        if entry is None:
            raise self._not_found(stream_id)
        return entry.runner

    def add_watch(self, stream_id: str, request: WatchRequest) -> Watch:
        return self._watches.add(stream_id, request)

    def list_watches(self, stream_id: str) -> list[Watch]:
        return self._watches.list(stream_id)

    def delete_watch(self, stream_id: str, watch_id: str) -> Watch:
        self._runner(stream_id)
        return self._watches.remove(stream_id, watch_id)

    def watch_events(self, stream_id: str, since: int, timeout_s: float) -> EventsPage:
        """Events after ``since`` (long-poll up to ``timeout_s``; a bounded number of callers wait at once)."""
        return self._watches.events(stream_id, since, timeout_s)

    def watch_counts(self) -> dict[str, int]:
        return self._watches.counts()


class IngestHostActor(IngestHost):
    """The Ray actor form of :class:`IngestHost` (deployment handles looked up from inside the actor)."""

    def __init__(self, app_name: str, source_config: SourceConfig, ingest: IngestSettings, ttl_s: float,
                 watches: WatchSettings | None = None, trim_on_close: bool = False, gc_freeze: bool = False) -> None:
        import ray
        from ray import serve

        handles = [serve.get_deployment_handle(kind, app_name=app_name) for kind in (VISION, LLM)]
        context = ray.get_runtime_context()
        directory = RemoteDirectory(ray.get_actor(directory_name(app_name), namespace=STREAM_NAMESPACE))
        super().__init__(ServeTransport(*handles, ingest), source_config, ingest, ttl_s,
                         context.was_current_actor_reconstructed, watches, directory, context.get_actor_name(),
                         trim_on_close)
        if gc_freeze:  # after start-up: torch, Ray and the handles are loaded (serve.process.gc_freeze)
            freeze_startup_objects()


def directory_name(app_name: str) -> str:
    """The name of the app's detached :class:`serve.directory.StreamDirectory` actor."""
    return f"{app_name}/directory"
