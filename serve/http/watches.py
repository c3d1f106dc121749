"""Standing questions ("watches") over HTTP: the routes only relay to the backend, which owns the watches.

``POST /streams/{id}/watches`` adds one, ``GET`` lists, ``DELETE /streams/{id}/watches/{wid}`` removes it;
``GET /streams/{id}/events`` streams the stream's events (``answer``, ``alert``, then ``end``) as server-sent events.

The watches themselves (their loop, bounds, rate limit, event ring) are :class:`serve.core.watchset.WatchHub`, held by
whatever owns the stream: its ingest host in the Ray service (so a watch made through one ingress replica is listed,
deleted and streamed through any other), the :class:`serve.core.runner.LocalBackend` in-process. The SSE route polls
the backend for events after the last sequence number it sent (a long-poll of ``POLL_S``) and ends after the
``end`` event (the stream was closed, reaped, or its file ended) or when the stream is gone.

* ``mode="text"``: each tick yields an ``answer`` event with the text.
* ``mode="yes_no"``: each tick scores P(yes) against P(no) and yields an ``answer`` event with the score; an
  ``alert`` fires when the score rises to ``threshold`` or above, and re-arms only once it falls below
  ``threshold - hysteresis`` -- a held condition fires once.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request

from serve.core.settings import ServeSettings
from serve.core.protocol import PayloadTooLargeError
from serve.core.watchset import EventsPage, Watch, WatchLimitError, WatchRequest, WatchSettings
from serve.http.limits import GatedStreamingResponse, LongLivedGate
from stream.errors import StreamNotFoundError

__all__ = ["EventsPage", "Watch", "WatchLimitError", "WatchRequest", "WatchSettings", "add_watch_routes",
           "relay_events"]

POLL_S = 2.0  # one long-poll of the backend
BUSY_SLEEP_S = 0.25  # the backend's waiters were full: poll again after this
KEEPALIVE_S = 15.0


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def relay_events(backend: Any, stream_id: str, since: int, request: Request | None = None,
                       poll_s: float = POLL_S) -> AsyncIterator[bytes]:
    """The stream's events after ``since`` as SSE, polling the backend, until the ``end`` event or the stream is gone."""
    idle = 0.0
    while True:
        try:
            page: EventsPage = await backend.watch_events(stream_id, since, poll_s)
        except StreamNotFoundError:
            yield _sse("end", {"type": "end", "stream_id": stream_id, "reason": "gone"})
            return
        for event in page.events:
            since = event.seq
            yield _sse(event.type, event.body())
        if page.ended:
            return
        if request is not None and await request.is_disconnected():
            return
        if page.events:
            idle = 0.0
            continue
        if not page.waited:
            await asyncio.sleep(BUSY_SLEEP_S)
        idle += poll_s if page.waited else BUSY_SLEEP_S
        if idle >= KEEPALIVE_S:
            idle = 0.0
            yield b": keep-alive\n\n"


def add_watch_routes(app: FastAPI, backend: Any, settings: ServeSettings, gate: LongLivedGate) -> None:
    """Mount the watch and event routes (they relay to ``backend``'s watch methods); event readers take a slot of
    ``gate`` while they stream."""
    router = APIRouter(tags=["watches"])

    @router.post("/streams/{stream_id}/watches", status_code=201, response_model=Watch)
    async def add_watch(stream_id: str, body: WatchRequest) -> Watch:
        """Start a standing question on the stream (the question has the same length limit as a user's)."""
        if len(body.question) > settings.max_question_chars:
            raise PayloadTooLargeError(
                f"watch question has {len(body.question)} characters, over the limit of {settings.max_question_chars}"
                " (serve.max_question_chars, the same as a question's). Fix: shorten it."
            )
        return await backend.add_watch(stream_id, body)

    @router.get("/streams/{stream_id}/watches")
    async def list_watches(stream_id: str) -> dict[str, Any]:
        """The stream's watches."""
        return {"watches": [w.model_dump() for w in await backend.list_watches(stream_id)]}

    @router.delete("/streams/{stream_id}/watches/{watch_id}", response_model=Watch)
    async def delete_watch(stream_id: str, watch_id: str) -> Watch:
        """Stop one watch."""
        return await backend.delete_watch(stream_id, watch_id)

    @router.get("/streams/{stream_id}/events")
    async def events(stream_id: str, request: Request, since: int = 0) -> GatedStreamingResponse:
        """SSE of the stream's watch events (answer, alert, end), from sequence number ``since`` (429 past the
        readers one stream or this replica may have at once)."""
        release = gate.acquire(stream_id, "reader")
        try:
            await backend.watch_events(stream_id, since, 0.0)  # 404 now, before the stream starts
        except BaseException:
            release()
            raise
        return GatedStreamingResponse(relay_events(backend, stream_id, since, request), release,
                                      media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.include_router(router)
