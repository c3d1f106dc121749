"""Standing questions ("watches") as plain, Ray-free objects: the one definition of the watch logic.

A :class:`WatchHub` belongs to whatever owns a set of streams -- each ingest host in the Ray service
(:class:`serve.core.hosts.IngestHost`), the in-process :class:`serve.core.runner.LocalBackend` -- so a watch lives with its
stream, not with an HTTP replica: any ingress replica reaches it through the stream's host. The hub keeps

* each stream's watches (at most ``max_watches_per_stream``) and one bounded :class:`EventRing` per stream
  (``max_events_per_stream`` events with increasing sequence numbers; readers that lag skip to the oldest kept);
* one scheduler thread that runs every due watch question, one at a time, at most ``asks_per_s`` per hub (a rate
  limit per owner: the service's total is ``asks_per_s`` x ingest hosts), so watches never starve ingest (which
  runs on the streams' own threads) or users' questions;
* the end of watches with their stream: :meth:`WatchHub.end_stream` (called when the stream is closed or reaped) and
  the scheduler itself (a stream whose state became ``ended``/``failed`` -- a file that reached its end) stop the
  stream's watches and append a last ``{"type": "end", "reason": ...}`` event; readers get it and stop. Ended rings
  stay readable for ``ENDED_KEPT_S`` (at most ``ENDED_KEPT`` of them), then go.

Readers poll :meth:`WatchHub.events` (events after a sequence number, long-poll with a timeout; at most
``max_waiters`` callers wait at once, the others are answered at once with ``waited=False``).
"""
from __future__ import annotations

import collections
import functools
import threading
import time
import uuid
from typing import Any, Callable, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from serve.core.api import StreamStateError
from serve.core.messages import text_of
from serve.core.watch_events import EventRing, EventsPage, WatchEvent  # noqa: F401 (WatchEvent re-exported)
from serve.core.settings import WatchSettings
from stream.errors import RequestError, StreamNotFoundError

ENDED_KEPT = 64  # ended streams whose last events stay readable
ENDED_KEPT_S = 300.0  # ... for this long
STATE_CHECK_S = 0.25  # how often the scheduler looks for streams that ended by themselves
FINAL_STATES = ("ended", "failed", "closed")


class WatchRequest(BaseModel):
    """A standing question."""

    model_config = ConfigDict(extra="forbid")
    question: str = Field(..., min_length=1, max_length=2000)
    every_s: float = Field(..., gt=0, le=86400)
    mode: Literal["text", "yes_no"] = "text"
    threshold: float = Field(0.5, ge=0, le=1, description="yes_no: alert when P(yes) reaches this.")
    hysteresis: float = Field(0.1, ge=0, le=1, description="yes_no: re-arm once P(yes) < threshold - hysteresis.")
    max_new_tokens: int = Field(16, ge=1)
    webhook: str | None = Field(None, description="http(s) URL on an allowlisted host, POSTed every event.")


class Watch(BaseModel):
    """A watch as listed."""

    watch_id: str
    stream_id: str
    request: WatchRequest
    ticks: int = 0
    alerts: int = 0
    armed: bool = True
    last_score: float | None = None
    last_error: str | None = None
    webhook_delivered: int = Field(0, description="Events of this watch its webhook accepted.")
    webhook_failed: int = Field(0, description="Events given up after every retry (errors, 5xx, deadline).")
    webhook_dropped: int = Field(0, description="Events dropped because the destination's queue was full.")


class WatchLimitError(RequestError):
    status = 429


class WatchAsker(Protocol):
    """How a hub reaches its streams: what they saw, and the LLM questions (blocking calls)."""

    def seen(self, stream_id: str) -> tuple[float | None, int, str]:
        """``(pts of the newest encoded frame, its frame index, stream state)``; StreamNotFoundError if gone."""
        ...

    def ask_text(self, stream_id: str, question: str, max_new_tokens: int) -> str: ...

    def score_yes_no(self, stream_id: str, question: str) -> float: ...


class FlowAsker:
    """:class:`WatchAsker` over stream runners (:class:`serve.core.runner.StreamRunner`): the same calls a user's
    question makes, through the stream's :class:`serve.core.flow.StageFlow`, on any transport."""

    def __init__(self, runner: Callable[[str], Any]) -> None:
        self.runner = runner  # stream id -> StreamRunner (raises StreamNotFoundError)

    def seen(self, stream_id: str) -> tuple[float | None, int, str]:
        st = self.runner(stream_id).stats()
        return st.ingest.last_pts, st.ingest.frames_encoded - 1, st.state

    def ask_text(self, stream_id: str, question: str, max_new_tokens: int) -> str:
        return text_of(self.runner(stream_id).flow.ask(stream_id, question, max_new_tokens))

    def score_yes_no(self, stream_id: str, question: str) -> float:
        yes, no = self.runner(stream_id).flow.score_choices(stream_id, question, ["yes", "no"])
        return float(yes / max(yes + no, 1e-12))


class _Running:
    def __init__(self, watch: Watch, due: float) -> None:
        self.watch, self.due = watch, due


class WatchHub:
    """Every watch and event ring of one owner's streams, driven by one scheduler thread (started on first use).

    Args:
        asker: how the watches reach their streams.
        settings: bounds and rate limit.
        webhooks: a :class:`serve.core.webhooks.WebhookSender` (or None: no webhooks).
        max_waiters: long-polls that may wait at once.
    """

    def __init__(self, asker: WatchAsker, settings: WatchSettings | None = None, webhooks: Any = None,
                 max_waiters: int = 32) -> None:
        self.asker, self.settings, self.webhooks = asker, settings or WatchSettings(), webhooks
        self.max_waiters = max_waiters
        self._watches: dict[str, dict[str, _Running]] = {}  # stream id -> watch id -> watch
        self._rings: dict[str, EventRing] = {}  # live streams' rings
        self._ended: collections.OrderedDict[str, EventRing] = collections.OrderedDict()  # ENDED_KEPT at most
        self._lock = threading.Condition()
        self._waiters = 0
        self._next_ask = 0.0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.asked = 0

    # -- the API the routes relay to ---------------------------------------------------------------------------------
    def add(self, stream_id: str, request: WatchRequest) -> Watch:
        """Start a watch (404: stream not open; 409: it ended; 400: every_s too small; 403: webhook host; 429: bound)."""
        s = self.settings
        if request.every_s < s.min_every_s:
            raise RequestError(f"every_s={request.every_s} is below {s.min_every_s}. Fix: ask less often.")
        if request.webhook is not None:
            if self.webhooks is None:
                raise RequestError("webhooks are not configured here. Fix: drop 'webhook'.")
            self.webhooks.check(request.webhook)
        _, _, state = self.asker.seen(stream_id)
        if state in FINAL_STATES:
            raise StreamStateError(f"stream {stream_id!r} is {state}: its watches have ended. Fix: open a new stream.")
        with self._lock:
            mine = self._watches.setdefault(stream_id, {})
            if len(mine) >= s.max_watches_per_stream:
                raise WatchLimitError(f"stream {stream_id!r} has {len(mine)} watches, the maximum "
                                      f"({s.max_watches_per_stream}). Fix: DELETE one first.")
            self._ring(stream_id)
            watch = Watch(watch_id=uuid.uuid4().hex[:12], stream_id=stream_id, request=request)
            mine[watch.watch_id] = _Running(watch, time.monotonic() + request.every_s)
            self._lock.notify_all()
            return watch.model_copy(deep=True)

    def list(self, stream_id: str) -> list[Watch]:
        """The stream's live watches (404 if the stream is not open)."""
        self.asker.seen(stream_id)
        with self._lock:
            return [r.watch.model_copy(deep=True) for r in self._watches.get(stream_id, {}).values()]

    def remove(self, stream_id: str, watch_id: str) -> Watch:
        with self._lock:
            running = self._watches.get(stream_id, {}).pop(watch_id, None)
            if running is None:
                raise StreamNotFoundError(f"no watch {watch_id!r} on stream {stream_id!r}. "
                                          f"Fix: GET /streams/{stream_id}/watches.")
            return running.watch.model_copy(deep=True)

    def events(self, stream_id: str, since: int = 0, timeout_s: float = 0.0) -> EventsPage:
        """Events after ``since``; waits up to ``timeout_s`` for one (404 once the stream and its ring are gone)."""
        with self._lock:
            self._expire()
            ring = self._rings.get(stream_id) or self._ended.get(stream_id)
        if ring is not None and ring.ended_at is not None and self._reopened(stream_id):
            ring = None  # the id names a new stream now: the old ring's end is not its end
        if ring is None:
            _, _, state = self.asker.seen(stream_id)  # 404 unless open
            with self._lock:
                ring = self._ring(stream_id)
                if state in FINAL_STATES:  # a file that ended before anyone watched: say so at once
                    self.end_stream(stream_id, state)
        waited = False
        if timeout_s > 0 and ring.seq <= since and ring.ended_at is None:
            with self._lock:
                waited = self._waiters < self.max_waiters
                self._waiters += waited
            if waited:
                try:
                    ring.wait(since, timeout_s)
                finally:
                    with self._lock:
                        self._waiters -= 1
        return EventsPage(stream_id=stream_id, events=ring.since(since), last_seq=ring.seq,
                          ended=ring.ended_at is not None, waited=waited)

    def history(self, stream_id: str) -> tuple[list[WatchEvent], list[WatchEvent]]:
        """The stream's kept events and caption track (empty when it never had watches); creates nothing."""
        with self._lock:
            ring = self._rings.get(stream_id) or self._ended.get(stream_id)
        return ring.history() if ring is not None else ([], [])

    def end_stream(self, stream_id: str, reason: str) -> int:
        """Stop the stream's watches and end its ring with ``{"type": "end", "reason": reason}``; returns how many
        watches stopped (0 and no event if they had ended already)."""
        with self._lock:
            stopped = self._watches.pop(stream_id, {})
            ring = self._rings.pop(stream_id, None)
            if ring is not None:
                ring.end({"type": "end", "stream_id": stream_id, "reason": reason, "watches_stopped": len(stopped)})
                self._ended[stream_id] = ring
                self._ended.move_to_end(stream_id)
                while len(self._ended) > ENDED_KEPT:
                    self._ended.popitem(last=False)
            return len(stopped)

    def shutdown(self) -> None:
        """Stop the scheduler thread (the owner is going away)."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def webhook_stats(self) -> list[Any]:
        """Delivery counters per webhook destination (:class:`serve.core.webhooks.WebhookStats`)."""
        return self.webhooks.stats() if self.webhooks is not None else []

    def counts(self) -> dict[str, int]:
        """Watches, live rings and ended rings held now (the bounds tests read it)."""
        with self._lock:
            return {"watches": sum(len(w) for w in self._watches.values()), "rings": len(self._rings),
                    "ended_rings": len(self._ended), "asked": self.asked}

    # -- internals ---------------------------------------------------------------------------------------------------
    def _ring(self, stream_id: str) -> EventRing:
        """The stream's live ring (a new one replaces an ended ring of a reused id); call with the lock held."""
        ring = self._rings.get(stream_id)
        if ring is None:
            self._ended.pop(stream_id, None)
            ring = self._rings[stream_id] = EventRing(self.settings.max_events_per_stream,
                                                      self.settings.captions_per_stream)
            self._start()  # the scheduler also ends rings whose stream ended by itself
        return ring

    def _reopened(self, stream_id: str) -> bool:
        try:
            return self.asker.seen(stream_id)[2] not in FINAL_STATES
        except StreamNotFoundError:
            return False

    def _expire(self) -> None:
        now = time.monotonic()
        while self._ended and now - next(iter(self._ended.values())).ended_at > ENDED_KEPT_S:
            self._ended.popitem(last=False)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="stc-watches", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        checked = 0.0
        while True:
            with self._lock:
                if self._stopped:
                    return
                now = time.monotonic()
                check = now - checked >= STATE_CHECK_S
                streams = sorted(set(self._watches) | set(self._rings)) if check else []
                first = min((r for ws in self._watches.values() for r in ws.values()), key=lambda r: r.due,
                            default=None)
                start_at = max(first.due, self._next_ask) if first is not None else float("inf")
                if not check and start_at > now:
                    self._lock.wait(timeout=min(start_at, checked + STATE_CHECK_S) - now)
                    continue
            if check:
                checked = now
                self._end_finished(streams)
            elif first is not None:
                self._next_ask = now + 1.0 / self.settings.asks_per_s  # the rate limit (burst 1)
                first.due = now + first.watch.request.every_s
                self._tick(first)

    def _end_finished(self, streams: list[str]) -> None:
        """End the watches of streams that ended, failed or went away by themselves."""
        for sid in streams:
            try:
                _, _, state = self.asker.seen(sid)
            except StreamNotFoundError:
                state = "closed"
            except Exception:  # noqa: BLE001 - a stats hiccup is not an end
                continue
            if state in FINAL_STATES:
                self.end_stream(sid, state)

    def _tick(self, running: _Running) -> None:
        watch = running.watch
        sid, req = watch.stream_id, watch.request
        try:
            pts, index, _ = self.asker.seen(sid)
            base = {"stream_id": sid, "watch_id": watch.watch_id, "question": req.question, "pts": pts,
                    "frame_index": index}
            self.asked += 1
            if req.mode == "text":
                text = self.asker.ask_text(sid, req.question, min(req.max_new_tokens, self.settings.max_new_tokens))
                out, score = [{"type": "answer", "answer": text, **base}], None
            else:
                score = float(self.asker.score_yes_no(sid, req.question))
                out = [{"type": "answer", "score": score, **base}]
        except StreamNotFoundError:
            self.end_stream(sid, "closed")
            return
        except Exception as exc:  # noqa: BLE001 - a failed tick is reported and the watch carries on
            with self._lock:
                watch.last_error = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            if self._watches.get(sid, {}).get(watch.watch_id) is not running:
                return  # deleted or ended meanwhile: its answer is dropped
            watch.ticks += 1
            watch.last_error = None
            if score is not None:
                watch.last_score = score
                if watch.armed and score >= req.threshold:
                    watch.armed, watch.alerts = False, watch.alerts + 1
                    out.append({"type": "alert", "score": score, "threshold": req.threshold, **base})
                elif not watch.armed and score < req.threshold - req.hysteresis:
                    watch.armed = True
            ring = self._rings.get(sid)
        for event in out:
            sent = ring.add(event) if ring is not None else None
            if sent is not None and req.webhook is not None and self.webhooks is not None:
                self.webhooks.send(req.webhook, sent.body(), functools.partial(self._webhook_done, watch))

    def _webhook_done(self, watch: Watch, outcome: str) -> None:
        """Count one webhook outcome (``delivered``, ``failed`` or ``dropped``) on its watch."""
        with self._lock:
            field = f"webhook_{outcome}"
            setattr(watch, field, getattr(watch, field) + 1)
