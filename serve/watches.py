"""Standing questions ("watches"): re-ask on a stream's live context every ``every_s``; events as SSE and webhooks.

``POST /streams/{id}/watches`` adds one, ``GET`` lists, ``DELETE /streams/{id}/watches/{wid}`` removes it;
``GET /streams/{id}/events`` streams the stream's events (``answer`` and ``alert``) as server-sent events.

* ``mode="text"``: each tick yields an ``answer`` event with the text.
* ``mode="yes_no"``: each tick scores P(yes) against P(no) via ``backend.score_yes_no`` and yields an ``answer``
  event with the score; an ``alert`` fires when the score rises to ``threshold`` or above, and re-arms only once it
  falls below ``threshold - hysteresis`` -- a held condition fires once.

Bounds (all in :class:`WatchSettings`): watches per stream, events kept per stream (a ring; SSE readers that lag
skip to the oldest kept), and a service-wide rate limit on watch questions (a token bucket plus one watch question at
a time), so watches never starve ingest or users' questions. Watch questions run on the event loop's tasks, never in
the ingest path. A watch ends when its stream is gone (the backend answers 404).
"""
from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.api import QuestionRequest
from serve.service_config import ServeSettings, WatchSettings
from stream.errors import RequestError, StreamNotFoundError


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


class WatchLimitError(RequestError):
    status = 429


class _Events:
    """One stream's bounded event ring with a monotonically increasing sequence number."""

    def __init__(self, size: int) -> None:
        self.ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.seq = 0
        self.changed = asyncio.Event()
        self.closed = False

    def add(self, event: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        event = {"seq": self.seq, "time": time.time(), **event}
        self.ring.append(event)
        self.changed.set()
        self.changed = asyncio.Event()
        return event

    def since(self, seq: int) -> list[dict[str, Any]]:
        return [e for e in self.ring if e["seq"] > seq]


class _Bucket:
    """A token bucket (``rate`` per second, burst 1) plus a lock: one watch question at a time."""

    def __init__(self, rate: float) -> None:
        self.rate, self.next_at, self.lock = rate, 0.0, asyncio.Lock()

    async def take(self) -> None:
        now = time.monotonic()
        wait = self.next_at - now
        self.next_at = max(now, self.next_at) + 1.0 / self.rate
        if wait > 0:
            await asyncio.sleep(wait)


class WatchManager:
    """Holds every stream's watches and events; runs each watch as an asyncio task."""

    def __init__(self, backend: Any, settings: WatchSettings | None = None, webhooks: Any = None) -> None:
        self.backend, self.settings = backend, settings or WatchSettings()
        self.watches: dict[str, dict[str, Watch]] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.events: dict[str, _Events] = {}
        self.bucket = _Bucket(self.settings.asks_per_s)
        self.webhooks = webhooks

    def _log(self, sid: str) -> _Events:
        if sid not in self.events:
            self.events[sid] = _Events(self.settings.max_events_per_stream)
        return self.events[sid]

    async def add(self, sid: str, req: WatchRequest) -> Watch:
        """Start a watch on an open stream (404 if not open, 429 past the per-stream bound)."""
        await self.backend.stats(sid)
        if req.every_s < self.settings.min_every_s:
            raise RequestError(f"every_s={req.every_s} is below {self.settings.min_every_s}. Fix: ask less often.")
        if req.mode == "yes_no" and not hasattr(self.backend, "score_yes_no"):
            raise RequestError("this backend cannot score yes/no. Fix: use mode='text'.")
        if req.webhook is not None and self.webhooks is not None:
            self.webhooks.check(req.webhook)
        mine = self.watches.setdefault(sid, {})
        if len(mine) >= self.settings.max_watches_per_stream:
            raise WatchLimitError(
                f"stream {sid!r} has {len(mine)} watches, the maximum. Fix: DELETE one first."
            )
        watch = Watch(watch_id=uuid.uuid4().hex[:12], stream_id=sid, request=req)
        mine[watch.watch_id] = watch
        self._log(sid)
        self.tasks[watch.watch_id] = asyncio.get_running_loop().create_task(self._run(watch))
        return watch

    def list(self, sid: str) -> list[Watch]:
        return list(self.watches.get(sid, {}).values())

    def remove(self, sid: str, wid: str) -> Watch:
        watch = self.watches.get(sid, {}).pop(wid, None)
        if watch is None:
            raise StreamNotFoundError(f"no watch {wid!r} on stream {sid!r}. Fix: GET /streams/{sid}/watches.")
        task = self.tasks.pop(wid, None)
        if task is not None:
            task.cancel()
        return watch

    def end_stream(self, sid: str) -> None:
        """Stop the stream's watches and tell its event readers the stream ended."""
        for wid in list(self.watches.get(sid, {})):
            self.remove(sid, wid)
        self.watches.pop(sid, None)
        log = self.events.pop(sid, None)
        if log is not None:
            log.add({"type": "end", "stream_id": sid})
            log.closed = True

    async def _run(self, watch: Watch) -> None:
        sid, req = watch.stream_id, watch.request
        while True:
            await asyncio.sleep(req.every_s)
            await self.bucket.take()
            try:
                async with self.bucket.lock:
                    event = await self._tick(watch)
            except StreamNotFoundError:
                self.end_stream(sid)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed tick is reported and the watch carries on
                watch.last_error = f"{type(exc).__name__}: {exc}"
                continue
            for ev in event:
                self._emit(sid, ev, req.webhook)

    async def _tick(self, watch: Watch) -> list[dict[str, Any]]:
        sid, req = watch.stream_id, watch.request
        stats = await self.backend.stats(sid)
        seen = {"pts": stats.ingest.last_pts, "frame_index": stats.ingest.frames_encoded - 1}
        watch.ticks += 1
        base = {"stream_id": sid, "watch_id": watch.watch_id, "question": req.question, **seen}
        if req.mode == "text":
            q = QuestionRequest(question=req.question, max_new_tokens=min(req.max_new_tokens,
                                                                           self.settings.max_new_tokens))
            text = "".join([p async for p in self.backend.ask(sid, q)])
            return [{"type": "answer", "answer": text, **base}]
        score = float(await self.backend.score_yes_no(sid, req.question))
        watch.last_score = score
        out = [{"type": "answer", "score": score, **base}]
        if watch.armed and score >= req.threshold:
            watch.armed, watch.alerts = False, watch.alerts + 1
            out.append({"type": "alert", "score": score, "threshold": req.threshold, **base})
        elif not watch.armed and score < req.threshold - req.hysteresis:
            watch.armed = True
        return out

    def _emit(self, sid: str, event: dict[str, Any], webhook: str | None) -> None:
        if sid not in self.events:
            return
        event = self._log(sid).add(event)
        if webhook is not None and self.webhooks is not None:
            self.webhooks.send(webhook, event)

    async def sse(self, sid: str, since: int, request: Request | None = None) -> AsyncIterator[bytes]:
        """The stream's events after ``since`` as SSE, then new ones as they come, until the stream ends."""
        while True:
            log = self.events.get(sid)
            if log is None:
                yield b"event: end\ndata: {}\n\n"
                return
            for ev in log.since(since):
                since = ev["seq"]
                yield f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()
            if log.closed or (request is not None and await request.is_disconnected()):
                return
            try:
                await asyncio.wait_for(log.changed.wait(), timeout=15.0)
            except asyncio.TimeoutError:
                yield b": keep-alive\n\n"


def add_watch_routes(app: FastAPI, backend: Any, settings: ServeSettings) -> WatchManager:
    """Mount the watch and event routes; closing a stream through the API ends its watches."""
    from serve.webhooks import WebhookSender  # noqa: PLC0415

    ws = settings.watches
    manager = WatchManager(backend, ws, WebhookSender(ws.webhook_hosts))
    app.state.watches = manager
    router = APIRouter(tags=["watches"])

    @router.post("/streams/{stream_id}/watches", status_code=201, response_model=Watch)
    async def add_watch(stream_id: str, body: WatchRequest) -> Watch:
        """Start a standing question on the stream."""
        manager._log(stream_id)
        try:
            return await manager.add(stream_id, body)
        except RequestError:
            if not manager.watches.get(stream_id):
                manager.events.pop(stream_id, None)
            raise

    @router.get("/streams/{stream_id}/watches")
    async def list_watches(stream_id: str) -> dict[str, Any]:
        """The stream's watches."""
        await backend.stats(stream_id)
        return {"watches": [w.model_dump() for w in manager.list(stream_id)]}

    @router.delete("/streams/{stream_id}/watches/{watch_id}", response_model=Watch)
    async def delete_watch(stream_id: str, watch_id: str) -> Watch:
        """Stop one watch."""
        return manager.remove(stream_id, watch_id)

    @router.get("/streams/{stream_id}/events")
    async def events(stream_id: str, request: Request, since: int = 0) -> StreamingResponse:
        """SSE of the stream's watch events (answer, alert, end), from sequence number ``since``."""
        await backend.stats(stream_id)
        manager._log(stream_id)
        return StreamingResponse(manager.sse(stream_id, since, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.middleware("http")
    async def end_watches_on_close(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        parts = request.url.path.rstrip("/").split("/")
        if request.method == "DELETE" and len(parts) == 3 and parts[1] == "streams" and response.status_code == 200:
            manager.end_stream(parts[2])
        return response

    app.include_router(router)
    return manager
