"""An ingest host: many streams in one process, as a plain class (:class:`IngestHost`) -- the one owner of streams.

A host holds :class:`serve.core.runner.StreamRunner` objects (threads and bounded buffers, tens of MB per stream at
most), each with its :class:`serve.core.flow.StageFlow` over the host's transport, and owns its streams' standing
questions (a :class:`serve.core.watchset.WatchHub`). Every backend is a host behind a transport:
:class:`serve.core.local.LocalBackend` calls one host in-process over direct stage calls; the Ray service runs a few
hosts as detached actors over Ray Serve handles (``serve.deploy.hosts.IngestHostActor``), a stream id mapping to one
host by consistent hashing. Ended, failed and idle streams are closed after ``ttl_s``.

A host restarted after it died (Ray restarts it empty) finds the streams it ran in its
:class:`serve.core.directory.StreamDirectory`: it lists them as ``failed`` with the reason (409 to pushes and
questions, DELETE frees them) and frees their replica state at once (the replicas' TTL reaper is the backstop).
"""
from __future__ import annotations

import collections
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from serve.core.api import (
    CapacityError,
    IngestStats,
    PushResponse,
    QuestionRequest,
    StreamExistsError,
    StreamNotFoundError,
    StreamStateError,
    StreamStats,
)
from serve.core.directory import StreamRecord
from serve.core.fleet import FleetAnswer, FleetQuestion, StreamLabels, answer_one, fan_out, failed_answer
from serve.core.flow import LLM, VISION, StageFlow, StageTransport
from serve.core.messages import AnswerItem
from serve.core.moments import BlockQuery, BlockScan, MomentsRequest, MomentsResult, rank_moments
from serve.core.protocol import jpeg_bytes
from serve.core.runner import StreamPlan, StreamRunner
from serve.core.settings import IngestSettings, TimelineSettings, WatchSettings
from serve.core.stats import HostMemory
from serve.core.timeline import KINDS, Timeline, build_timeline
from serve.core.watchset import EventsPage, FlowAsker, Watch, WatchHub, WatchRequest
from serve.core.webhooks import WebhookSender, WebhookStats
from stream.config import SourceConfig
from stream.frames import FrameBatch
from stream.memory import gc_stats, heap_stats, trim_heap


def failed_stats(rec: StreamRecord, reason: str) -> StreamStats:
    """The stats a host reports for a stream it lost: ``failed`` with the reason, counters unknown (zero)."""
    return StreamStats(stream_id=rec.stream_id, kind=rec.kind, source=rec.source, state="failed", error=reason,
                       created_at=rec.created_at, ingest=IngestStats())


@dataclass
class _Entry:
    runner: StreamRunner
    touched: float = field(default_factory=time.monotonic)


class IngestHost:
    """Many streams' ingest, questions and watches in one process.

    Args:
        transport: how the streams' flows reach the stages.
        source_config: how sources are opened.
        ingest: queue sizes and timeouts.
        ttl_s: ended, failed or idle streams are closed after this long.
        restarted: this host is a restart of one that died (its streams were lost).
        watches: bounds and rate limit of the standing questions on this host's streams.
        directory: where the host records its open streams (a :class:`serve.core.directory.StreamDirectory` or its
            remote form); ``None``: a restart cannot name the streams it lost.
        name: this host's name in the directory.
        trim_on_close: give a closed stream's freed buffers back to the OS (malloc_trim).
        max_waiters: watch-event long-polls that may wait at once (each holds a thread of the caller).
        timeline: what each stream keeps of its past (thumbnails, moments) and how much a timeline shows.
    """

    def __init__(self, transport: StageTransport, source_config: SourceConfig, ingest: IngestSettings, ttl_s: float,
                 restarted: bool = False, watches: WatchSettings | None = None, directory: Any | None = None,
                 name: str = "ingest", trim_on_close: bool = False, max_waiters: int = 32,
                 timeline: TimelineSettings | None = None) -> None:
        self.transport = transport
        self.timeline_settings = timeline or TimelineSettings()
        self.trim_on_close = trim_on_close
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
        sender = WebhookSender(ws.webhook_hosts, retries=ws.webhook_retries, timeout_s=ws.webhook_timeout_s,
                               max_pending=ws.webhook_queue, max_destinations=ws.max_destinations)
        self.watches = WatchHub(FlowAsker(self._runner), ws, sender, max_waiters)
        threading.Thread(target=self._reap_forever, name="stc-reaper", daemon=True).start()

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def create(self, plan: StreamPlan, max_streams: int | None = None) -> StreamStats:
        """Open the stream (source, then stage state) and start its ingest threads.

        Raises:
            StreamExistsError: the id is open, being created, or a lost stream not yet deleted (409).
            CapacityError: this host holds ``max_streams`` streams (429).
        """
        sid = plan.stream_id
        with self._lock:
            if sid in self._streams or sid in self._starting or sid in self._lost:
                raise StreamExistsError(f"stream {sid!r} is already open (or failed). Fix: pick another id or "
                                        "DELETE it first.")
            if max_streams is not None and self._holding() + len(self._starting) >= max_streams:
                raise CapacityError(f"the service holds its maximum of {max_streams} streams. Fix: close one, or "
                                    "raise serve.max_streams.")
            self._starting.add(sid)
        flow = StageFlow(self.transport)
        flow.on_reopen = functools.partial(self._record, sid)  # a rebuilt stage state gets a new token
        runner = StreamRunner(sid, plan.source, plan.resolved, plan.options, self.source_config, self.ingest, flow,
                              plan.labels, self.timeline_settings)
        try:
            runner.start()
            with self._lock:
                self._streams[sid] = _Entry(runner)
        finally:
            with self._lock:
                self._starting.discard(sid)
        self._record(sid)
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
        final = entry.runner.stats(stages=True)
        try:
            entry.runner.close()
        except Exception as exc:  # noqa: BLE001 - the id is free now whatever a stage said; the reaper is the backstop
            self.reap_errors.append(f"{stream_id}: close: {type(exc).__name__}: {exc}"[:300])
        self._forget(stream_id)
        self.watches.end_stream(stream_id, "closed")
        if self.trim_on_close:
            trim_heap()
        return final.model_copy(update={"state": "closed"})

    def ids(self) -> list[str]:
        """Open and failed (lost) streams."""
        with self._lock:
            return sorted([*self._streams, *self._lost])

    def holding(self) -> int:
        """Streams that hold model state and count against ``serve.max_streams``: starting, running or ended (a
        failed stream keeps only its stats until the TTL)."""
        with self._lock:
            return self._holding() + len(self._starting)

    def _holding(self) -> int:
        return sum(1 for e in self._streams.values() if e.runner.worker is None or e.runner.worker.state != "failed")

    def shutdown(self) -> None:
        """Close every stream and stop the watch scheduler (the owner is going away)."""
        for sid in self.ids():
            try:
                self.close(sid)
            except (StreamNotFoundError, StreamStateError):
                pass
        self.watches.shutdown()

    def reap(self, now: float | None = None) -> list[str]:
        """Close streams ended, failed or idle for longer than the TTL."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [sid for sid, e in self._streams.items()
                   if now - max(e.touched, e.runner.worker.last_activity if e.runner.worker else 0.0) > self.ttl_s]
            for sid in [sid for sid, (_, _, since) in self._lost.items() if now - since > self.ttl_s]:
                del self._lost[sid]
        for sid in due:
            self.watches.end_stream(sid, "reaped")
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
    def push(self, stream_id: str, batch: FrameBatch, flush: bool) -> PushResponse:
        return self._get(stream_id).runner.push(batch, flush)

    def ask(self, stream_id: str, request: QuestionRequest) -> Iterator[AnswerItem]:
        """The answer's items (text pieces and answer stats), through the stream's flow."""
        for item in self._get(stream_id).runner.ask(request):  # a plain loop: Ray drives this generator
            yield item

    def stats(self, stream_id: str) -> StreamStats:
        """The stream's stats with its stages' counters; a lost stream's ``failed`` stats."""
        with self._lock:
            lost = self._lost.get(stream_id)
        if lost is not None:
            return failed_stats(lost[0], lost[1])
        return self._get(stream_id).runner.stats(stages=True)

    def list(self) -> list[StreamStats]:
        """Every stream's stats (streams closed meanwhile are left out)."""
        out = []
        for sid in self.ids():
            try:
                out.append(self.stats(sid))
            except StreamNotFoundError:
                continue
        return out

    def frame_jpeg(self, stream_id: str) -> bytes | None:
        """The stream's newest sampled frame as JPEG (None before the first chunk)."""
        frame = self._get(stream_id).runner.last_frame
        return None if frame is None else jpeg_bytes(frame)

    def memory(self) -> HostMemory:
        """This host's resident memory, glibc heap, stream count and ``frames_mb`` -- the pixels its streams hold in
        their bounded chunk queues (RSS minus that is what a leak would show in) -- and the garbage collector's
        counters (soak benchmark, fault tests)."""
        import psutil  # noqa: PLC0415 - only hosts report memory

        with self._lock:
            runners = [entry.runner for entry in self._streams.values()]
        frames = sum(runner.frame_bytes() for runner in runners)
        return HostMemory(streams=len(self.ids()), pid=os.getpid(), frames_mb=frames / 2**20,
                          rss_mb=psutil.Process().memory_info().rss / 2**20, **(heap_stats() or {}), **gc_stats())

    # -- many streams at once, and the past of a stream --------------------------------------------------------------
    def labels(self) -> list[StreamLabels]:
        """Every open stream's id, labels and state (selecting streams: no stage is asked)."""
        with self._lock:
            runners = [e.runner for e in self._streams.values()]
        return [StreamLabels(stream_id=r.stream_id, labels=r.labels, state=r.worker.state if r.worker else "starting")
                for r in runners]

    def fleet(self, stream_ids: list[str], request: FleetQuestion) -> Iterator[FleetAnswer]:
        """Ask ``request`` on each of these streams at once (one thread each, so the LLM batches them); yields each
        stream's answer as it finishes (an unknown or failed stream's answer is its error)."""
        cancel, start = threading.Event(), time.perf_counter()

        def one(sid: str) -> FleetAnswer:
            return answer_one(self._get(sid).runner, request, cancel, start)

        for item in fan_out(stream_ids, one, request.mode, cancel):  # a plain loop: Ray drives this generator
            yield item

    def moments(self, stream_id: str, request: MomentsRequest) -> MomentsResult:
        """The stream's retained history scored block by block for ``request.query``: the top moments, each with
        the thumbnail of its best block's chunk; they are kept for the stream's timeline too."""
        runner = self._get(stream_id).runner
        runner.check_answerable()
        t0 = time.perf_counter()
        query = BlockQuery(query=request.query, method=request.method, since=request.since, until=request.until,
                           max_blocks=self.timeline_settings.max_scored_blocks)
        scan: BlockScan = runner.flow.call(LLM, "score_blocks", stream_id, query)
        found = [m.model_copy(update={"thumbnail": runner.timeline.thumbs.find(
            m.best_pts if m.best_pts is not None else m.pts_start)}) for m in rank_moments(stream_id, request, scan)]
        runner.timeline.add_moments(found)
        return MomentsResult(stream_id=stream_id, query=request.query, method=request.method, moments=found,
                             scored_blocks=sum(b.score is not None for b in scan.blocks), candidates=scan.candidates,
                             shortlisted=scan.shortlisted, ms=(time.perf_counter() - t0) * 1000)

    def moments_many(self, stream_ids: list[str], request: MomentsRequest) -> list[MomentsResult | FleetAnswer]:
        """:meth:`moments` on each of these streams at once; a stream that failed gives its error (a
        :class:`FleetAnswer` with ``status`` and ``error``) instead."""
        out: dict[str, MomentsResult | FleetAnswer] = {}

        def one(sid: str) -> None:
            try:
                out[sid] = self.moments(sid, request)
            except Exception as exc:  # noqa: BLE001 - per stream
                out[sid] = failed_answer(sid, "yes_no", exc)

        threads = [threading.Thread(target=one, args=(sid,), name="stc-moments", daemon=True) for sid in stream_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [out[sid] for sid in stream_ids]

    def timeline(self, stream_id: str, since: float | None = None, until: float | None = None,
                 kinds: list[str] | None = None) -> Timeline:
        """Watch events, captions and moments of the stream in pts order, with thumbnails (the newest
        ``serve.timeline.max_entries``)."""
        runner = self._runner(stream_id)
        events, captions = self.watches.history(stream_id)
        return build_timeline(stream_id, runner.timeline, events, captions, since, until, kinds or KINDS,
                              self.timeline_settings.max_entries)

    def thumbnail(self, stream_id: str, thumb_id: int) -> bytes | None:
        """A chunk thumbnail's JPEG (None once the ring dropped it)."""
        return self._runner(stream_id).timeline.thumbs.get(thumb_id)

    # -- watches (standing questions): owned here, with their streams ----------------------------------------------
    def add_watch(self, stream_id: str, request: WatchRequest) -> Watch:
        return self.watches.add(stream_id, request)

    def list_watches(self, stream_id: str) -> list[Watch]:
        return self.watches.list(stream_id)

    def delete_watch(self, stream_id: str, watch_id: str) -> Watch:
        self._runner(stream_id)
        return self.watches.remove(stream_id, watch_id)

    def watch_events(self, stream_id: str, since: int, timeout_s: float) -> EventsPage:
        """Events after ``since`` (long-poll up to ``timeout_s``; a bounded number of callers wait at once)."""
        return self.watches.events(stream_id, since, timeout_s)

    def webhook_stats(self) -> list[WebhookStats]:
        """Webhook delivery counters per destination (delivered, failed, dropped, pending)."""
        return self.watches.webhook_stats()

    # -- internals ---------------------------------------------------------------------------------------------------
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

    def _runner(self, stream_id: str) -> StreamRunner:
        """The open stream's runner without touching it (watch ticks do not keep an idle stream alive)."""
        with self._lock:
            entry = self._streams.get(stream_id)
        if entry is None:
            raise self._not_found(stream_id)
        return entry.runner

    @staticmethod
    def _not_found(stream_id: str) -> StreamNotFoundError:
        # the streams a restart lost are listed as failed (with the reason) until DELETE or the TTL: an id not
        # found here never existed, or was closed -- the restart has nothing to do with it
        return StreamNotFoundError(f"no open stream {stream_id!r}. Fix: list streams with GET /streams, or create one "
                                   "with POST /streams.")

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

    def _record(self, stream_id: str) -> None:
        """Tell the directory the stream is open, with its current tokens (best effort: a directory outage must not
        fail the stream)."""
        with self._lock:
            entry = self._streams.get(stream_id)
        if self.directory is None or entry is None:
            return
        r = entry.runner
        rec = StreamRecord(stream_id, self.name, r.kind, r.source_spec, r.created_at,
                           {k: r.flow.token(k) for k in (VISION, LLM)})
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
