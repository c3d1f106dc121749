"""Webhook delivery of watch events: host allowlist, retries with exponential backoff, never blocking the caller.

``send`` only schedules an asyncio task (at most ``max_pending`` in flight; past that the event is dropped and
counted), so neither ingest nor the watch loop ever waits on a slow receiver.
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import httpx

from stream.errors import RequestError


class WebhookNotAllowedError(RequestError):
    status = 403


class WebhookSender:
    """POSTs JSON events to allowlisted hosts."""

    def __init__(self, allowed_hosts: list[str], retries: int = 3, backoff_s: float = 0.2, timeout_s: float = 5.0,
                 max_pending: int = 64) -> None:
        self.allowed = {h.lower() for h in allowed_hosts}
        self.retries, self.backoff_s, self.timeout_s, self.max_pending = retries, backoff_s, timeout_s, max_pending
        self.pending: set[asyncio.Task] = set()
        self.delivered = self.failed = self.dropped = 0

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
        """Schedule delivery; drops (and counts) the event when ``max_pending`` deliveries are in flight."""
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._deliver(url, event))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _deliver(self, url: str, event: dict[str, Any]) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            for attempt in range(self.retries + 1):
                try:
                    response = await client.post(url, json=event)
                    if response.status_code < 500:
                        self.delivered += 1
                        return
                except httpx.HTTPError:
                    pass
                if attempt < self.retries:
                    await asyncio.sleep(self.backoff_s * 2 ** attempt)
        self.failed += 1
