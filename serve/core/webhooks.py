"""Webhook delivery of watch events: host allowlist, one queue and thread per destination, a deadline per attempt.

``send`` only appends the event to its destination's bounded queue (``max_pending``; past it the event is dropped
and counted), so neither ingest nor the watch scheduler (:mod:`serve.core.watchset`) ever waits on a receiver. A
destination is ``(scheme, host, port)``: each has its own queue and delivery thread, so a receiver that stalls
delays only its own events, never another destination's. Each attempt has a hard deadline (``timeout_s`` for
connect, send and answer together: a watchdog shuts the socket down when it passes, so a receiver that accepts and
never answers -- or drips its answer -- costs one deadline per attempt); failed attempts are retried ``retries``
times with exponential backoff. Counters per destination (delivered, failed, dropped) feed ``/metrics``; a
caller's ``done`` callback learns each event's outcome (the watch listing counts them per watch).

Plain threads, no event loop: it runs wherever the watches run (an ingest host, the local backend).
"""
from __future__ import annotations

import collections
import http.client
import json
import socket
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit

from pydantic import BaseModel, Field

from stream.errors import RequestError

Outcome = str  # "delivered" | "failed" | "dropped"
Done = Callable[[Outcome], None]


class WebhookNotAllowedError(RequestError):
    status = 403


class WebhookStats(BaseModel):
    """Delivery counters of one destination (``scheme://host:port``)."""

    destination: str
    delivered: int = Field(0, description="Events the receiver accepted (any status below 500).")
    failed: int = Field(0, description="Events given up after every retry (errors, 5xx, deadline).")
    dropped: int = Field(0, description="Events dropped because the destination's queue was full.")
    pending: int = Field(0, description="Events waiting now.")


def destination_of(url: str) -> str:
    """``scheme://host:port`` of a webhook URL (the unit of isolation)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class _Destination:
    """One destination's queue, thread and counters."""

    def __init__(self, key: str, max_pending: int) -> None:
        self.key, self.max_pending = key, max_pending
        self.queue: collections.deque[tuple[str, dict[str, Any], Done | None]] = collections.deque()
        self.cond = threading.Condition()
        self.stats = WebhookStats(destination=key)
        self.thread: threading.Thread | None = None


class WebhookSender:
    """POSTs JSON events to allowlisted hosts, one isolated delivery thread per destination.

    Args:
        allowed_hosts: host names or IPs webhooks may POST to.
        retries: retries of a failed attempt.
        backoff_s: first wait between attempts (doubled each time).
        timeout_s: hard deadline of one attempt (connect + send + answer).
        max_pending: events waiting per destination.
        max_destinations: destinations with a thread at once (a new one past it is refused with 429 at check).
    """

    def __init__(self, allowed_hosts: list[str], retries: int = 3, backoff_s: float = 0.2, timeout_s: float = 2.0,
                 max_pending: int = 64, max_destinations: int = 16) -> None:
        self.allowed = {h.lower() for h in allowed_hosts}
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.max_pending, self.max_destinations = max_pending, max_destinations
        self._dests: dict[str, _Destination] = {}
        self._lock = threading.Lock()

    def check(self, url: str) -> None:
        """Raise 400/403/429 unless ``url`` is http(s) on an allowlisted host and its destination can be served."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError(f"webhook {url!r} is not an http(s) URL. Fix: use http://host:port/path.")
        if parts.hostname.lower() not in self.allowed:
            raise WebhookNotAllowedError(
                f"webhook host {parts.hostname!r} is not allowed (allowed: {sorted(self.allowed)}). "
                "Fix: add it to the watch settings' webhook_hosts."
            )
        with self._lock:
            if destination_of(url) not in self._dests and len(self._dests) >= self.max_destinations:
                raise _TooManyDestinations(
                    f"webhook destination {destination_of(url)} would be the {len(self._dests) + 1}th; at most "
                    f"{self.max_destinations} are served. Fix: reuse a destination, or raise "
                    "serve.watches.max_destinations."
                )

    def send(self, url: str, event: dict[str, Any], done: Done | None = None) -> None:
        """Queue delivery on the URL's destination; drops (and counts) the event when its queue is full."""
        dest = self._destination(url)
        if dest is None:
            _tell(done, "dropped")
            return
        with dest.cond:
            if len(dest.queue) >= dest.max_pending:
                dest.stats.dropped += 1
                outcome: str | None = "dropped"
            else:
                dest.queue.append((url, event, done))
                dest.cond.notify()
                outcome = None
        if outcome is not None:
            _tell(done, outcome)

    def stats(self) -> list[WebhookStats]:
        """Counters of every destination seen so far."""
        with self._lock:
            dests = list(self._dests.values())
        out = []
        for d in dests:
            with d.cond:
                out.append(d.stats.model_copy(update={"pending": len(d.queue)}))
        return sorted(out, key=lambda s: s.destination)

    @property
    def delivered(self) -> int:
        return sum(s.delivered for s in self.stats())

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.stats())

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self.stats())

    # -- delivery -----------------------------------------------------------------------------------------------------
    def _destination(self, url: str) -> _Destination | None:
        key = destination_of(url)
        with self._lock:
            dest = self._dests.get(key)
            if dest is None:
                if len(self._dests) >= self.max_destinations:
                    return None
                dest = self._dests[key] = _Destination(key, self.max_pending)
                dest.thread = threading.Thread(target=self._drain, args=(dest,), name=f"stc-webhook {key}",
                                               daemon=True)
                dest.thread.start()
            return dest

    def _drain(self, dest: _Destination) -> None:
        while True:
            with dest.cond:
                while not dest.queue:
                    dest.cond.wait()
                url, event, done = dest.queue.popleft()
            ok = self._deliver(url, event)
            with dest.cond:
                if ok:
                    dest.stats.delivered += 1
                else:
                    dest.stats.failed += 1
            _tell(done, "delivered" if ok else "failed")

    def _deliver(self, url: str, event: dict[str, Any]) -> bool:
        body = json.dumps(event, ensure_ascii=False).encode()
        for attempt in range(self.retries + 1):
            if post_with_deadline(url, body, self.timeout_s) is not None:
                return True
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        return False


class _TooManyDestinations(RequestError):
    status = 429


def _tell(done: Done | None, outcome: Outcome) -> None:
    if done is not None:
        try:
            done(outcome)
        except Exception:  # noqa: BLE001 - a counter callback must not stop delivery
            pass


def post_with_deadline(url: str, body: bytes, deadline_s: float) -> int | None:
    """POST ``body`` as JSON; the status when it is below 500, else ``None`` (also on errors and past the deadline).

    The whole attempt -- connect, send, read the answer -- ends within ``deadline_s``: a watchdog timer shuts the
    socket down at the deadline, which wakes a read blocked on a receiver that never answers.
    """
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=deadline_s)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(deadline_s, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read(65536)
        return None if expired.is_set() or resp.status >= 500 else resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        watchdog.cancel()
        conn.close()
