"""Webhook delivery of watch events: host allowlist, retries with exponential backoff, never blocking the caller.

``send`` only puts the event on a bounded queue (``max_pending``; past that the event is dropped and counted) that
``workers`` daemon threads drain, so neither ingest nor the watch scheduler (:mod:`serve.core.watchset`) ever waits on a
slow receiver. Plain threads, no event loop: it runs wherever the watches run (an ingest host, the local backend).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from stream.errors import RequestError


class WebhookNotAllowedError(RequestError):
    status = 403


class WebhookSender:
    """POSTs JSON events to allowlisted hosts."""

    def __init__(self, allowed_hosts: list[str], retries: int = 3, backoff_s: float = 0.2, timeout_s: float = 5.0,
                 max_pending: int = 64, workers: int = 2) -> None:
        self.allowed = {h.lower() for h in allowed_hosts}
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.pending: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(maxsize=max_pending)
        self.delivered = self.failed = self.dropped = 0
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def check(self, url: str) -> None:
        """Raise 400/403 unless ``url`` is http(s) on an allowlisted host."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestError(f"webhook {url!r} is not an http(s) URL. Fix: use http://host:port/path.")
        if parts.hostname.lower() not in self.allowed:
            raise WebhookNotAllowedError(
                f"webhook host {parts.hostname!r} is not allowed (allowed: {sorted(self.allowed)}). "
                "Fix: add it to the watch settings' webhook_hosts."
            )

    def send(self, url: str, event: dict[str, Any]) -> None:
        """Queue delivery; drops (and counts) the event when ``max_pending`` deliveries are waiting."""
        with self._lock:
            if not self._threads:
                self._threads = [threading.Thread(target=self._drain, name=f"stc-webhook-{i}", daemon=True)
                                 for i in range(self._workers)]
                for t in self._threads:
                    t.start()
        try:
            self.pending.put_nowait((url, event))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _drain(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while True:
                url, event = self.pending.get()
                ok = self._deliver(client, url, event)
                with self._lock:
                    if ok:
                        self.delivered += 1
                    else:
                        self.failed += 1

    def _deliver(self, client: httpx.Client, url: str, event: dict[str, Any]) -> bool:
        for attempt in range(self.retries + 1):
            try:
                if client.post(url, json=event).status_code < 500:
                    return True
            except httpx.HTTPError:
                pass
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        return False
