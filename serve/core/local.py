"""The HTTP API's backend over ingest hosts (:class:`HostBackend`), and its in-process form (:class:`LocalBackend`).

A backend is what :func:`serve.http.app.make_api` serves: create, push, ask, stats, close, watches. Every stream
call goes to the stream's :class:`serve.core.hosts.IngestHost` unchanged, so a backend only says *how* a host is
reached: :class:`LocalBackend` calls one host in this process (a worker thread per call, direct stage calls: tests
and a single-process deployment), ``serve.deploy.app.RayBackend`` calls the host actors of the Ray service.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, AsyncIterator, Callable, Iterator

from serve.core.api import (
    CreateStreamRequest,
    HealthResponse,
    PushResponse,
    QuestionRequest,
    StreamStats,
    matches,
)
from serve.core.fleet import FleetAnswer, FleetGate, FleetQuestion, Targets, failed_answer, resolve_targets
from serve.core.flow import DirectTransport
from serve.core.hosts import IngestHost
from serve.core.messages import AnswerItem
from serve.core.moments import FleetMoments, FleetMomentsRequest, MomentsRequest, MomentsResult, with_moments
from serve.core.options import StreamOptions
from serve.core.runner import StreamPlan, plan_stream
from serve.core.settings import ServeSettings
from serve.core.timeline import Timeline
from serve.core.watchset import EventsPage, Watch, WatchHub, WatchRequest
from serve.core.webhooks import WebhookStats
from stream.config import SourceConfig
from stream.frames import FrameBatch


async def iterate_in_thread(make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive a blocking iterator from a worker thread, one item at a time (the event loop stays free)."""
    it = await asyncio.to_thread(make)
    sentinel = object()
    try:
        while True:
            item = await asyncio.to_thread(next, it, sentinel)
            if item is sentinel:
                return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


class HostBackend(ABC):
    """The stream backend over ingest hosts; subclasses say how a host method is reached.

    Args:
        settings: the service settings (limits, media root, watches).
        defaults: the default :class:`serve.core.options.StreamOptions`.
    """

    def __init__(self, settings: ServeSettings, defaults: StreamOptions) -> None:
        self.settings = settings
        self.defaults = defaults
        self.fleet_gate = FleetGate(settings.fleet.max_concurrent)

    # -- how a host is reached (subclasses) ----------------------------------------------------------------------------
    @abstractmethod
    async def _call(self, stream_id: str, method: str, *args: Any) -> Any:
        """``method(stream_id, *args)`` on the stream's host."""

    @abstractmethod
    def _stream(self, stream_id: str, method: str, *args: Any) -> AsyncIterator[Any]:
        """The items of the generator ``method(stream_id, *args)`` on the stream's host."""

    @abstractmethod
    async def _create(self, plan: StreamPlan) -> StreamStats:
        """Open the planned stream on its host (with the service's stream cap)."""

    @abstractmethod
    async def _every_host(self, method: str) -> list[Any]:
        """``method()`` on every host (results of hosts that answered)."""

    @abstractmethod
    def _host_key(self, stream_id: str) -> str:
        """The name of the host that holds ``stream_id``."""

    @abstractmethod
    async def _host_call(self, key: str, method: str, *args: Any) -> Any:
        """``method(*args)`` on the host named ``key``."""

    @abstractmethod
    def _host_stream(self, key: str, method: str, *args: Any) -> AsyncIterator[Any]:
        """The items of the generator ``method(*args)`` on the host named ``key``."""

    @abstractmethod
    async def health(self) -> HealthResponse:
        """The service's health as this backend sees its hosts."""

    # -- the backend API ---------------------------------------------------------------------------------------------
    async def create(self, request: CreateStreamRequest) -> StreamStats:
        return await self._create(plan_stream(request, self.settings, self.defaults))

    async def push(self, stream_id: str, batch: FrameBatch, flush: bool) -> PushResponse:
        return await self._call(stream_id, "push", batch, flush)

    def ask(self, stream_id: str, request: QuestionRequest) -> AsyncIterator[AnswerItem]:
        """The answer's text pieces and :class:`serve.core.messages.AnswerStats` snapshots."""
        return self._stream(stream_id, "ask", request)

    async def stats(self, stream_id: str) -> StreamStats:
        return await self._call(stream_id, "stats")

    async def list(self, selector: dict[str, str] | None = None) -> list[StreamStats]:
        """Every stream (or those whose labels match ``selector``), by id."""
        streams = [s for page in await self._every_host("list") for s in page]
        return sorted((s for s in streams if matches(s.labels, selector or {})), key=lambda s: s.stream_id)

    async def close(self, stream_id: str) -> StreamStats:
        return await self._call(stream_id, "close")

    async def frame_jpeg(self, stream_id: str) -> bytes | None:
        """The stream's newest sampled frame as JPEG (None before the first chunk)."""
        return await self._call(stream_id, "frame_jpeg")

    # -- many streams at once; the past of a stream --------------------------------------------------------------------
    async def targets(self, request: Targets) -> list[str]:
        """The stream ids a fleet request names or selects (404: the selector matches none; 413: too many)."""
        limit = self.settings.fleet.max_streams
        if request.selector is None:
            return resolve_targets(request, None, limit)
        listed = sorted((s for page in await self._every_host("labels") for s in page), key=lambda s: s.stream_id)
        return resolve_targets(request, listed, limit)

    async def fleet(self, stream_ids: list[str], request: FleetQuestion) -> AsyncIterator[FleetAnswer]:
        """Each stream's answer as it finishes: every host gets its share of the streams at once, and the hosts ask
        them concurrently, so the LLM batches all of them (a host that fails answers its streams with the error)."""
        groups: dict[str, list[str]] = {}
        for sid in stream_ids:
            groups.setdefault(self._host_key(sid), []).append(sid)
        answers: asyncio.Queue[FleetAnswer | None] = asyncio.Queue()

        async def pump(key: str, group: list[str]) -> None:
            seen: set[str] = set()
            try:
                async for item in self._host_stream(key, "fleet", group, request):
                    seen.add(item.stream_id)
                    await answers.put(item)
            except Exception as exc:  # noqa: BLE001 - the host's streams answer with its error
                for sid in group:
                    if sid not in seen:
                        await answers.put(failed_answer(sid, request.mode, exc))
            finally:
                await answers.put(None)

        tasks = [asyncio.create_task(pump(key, group)) for key, group in groups.items()]
        try:
            running = len(tasks)
            while running:
                item = await answers.get()
                if item is None:
                    running -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def moments(self, stream_id: str, request: MomentsRequest) -> MomentsResult:
        return await self._call(stream_id, "moments", request)

    async def fleet_moments(self, stream_ids: list[str], request: FleetMomentsRequest) -> FleetMoments:
        """Moments of many streams (each host scores its streams at once), the top ``top_k`` over all of them."""
        t0 = asyncio.get_running_loop().time()
        groups: dict[str, list[str]] = {}
        for sid in stream_ids:
            groups.setdefault(self._host_key(sid), []).append(sid)
        single = MomentsRequest(**request.model_dump(exclude={"streams", "selector"}))
        pages = await asyncio.gather(*(self._host_call(k, "moments_many", g, single) for k, g in groups.items()),
                                     return_exceptions=True)
        results, errors = [], {}
        for (key, group), page in zip(groups.items(), pages):
            for sid, one in zip(group, page if isinstance(page, list) else [page] * len(group)):
                if isinstance(one, MomentsResult):
                    results.append(one)
                else:
                    errors[sid] = one.error.message if isinstance(one, FleetAnswer) and one.error else str(one)
        best = sorted((m for r in results for m in r.moments), key=lambda m: -m.score)[:request.top_k]
        return FleetMoments(query=request.query, method=request.method, moments=best, errors=errors,
                            streams=[r.model_copy(update={"moments": []}) for r in results],
                            ms=(asyncio.get_running_loop().time() - t0) * 1000)

    async def timeline(self, stream_id: str, since: float | None, until: float | None,
                       kinds: list[str] | None) -> Timeline:
        return await self._call(stream_id, "timeline", since, until, kinds)

    async def thumbnail(self, stream_id: str, thumb_id: int) -> bytes | None:
        return await self._call(stream_id, "thumbnail", thumb_id)

    async def add_watch(self, stream_id: str, request: WatchRequest) -> Watch:
        return await self._call(stream_id, "add_watch", request)

    async def list_watches(self, stream_id: str) -> list[Watch]:
        return await self._call(stream_id, "list_watches")

    async def delete_watch(self, stream_id: str, watch_id: str) -> Watch:
        return await self._call(stream_id, "delete_watch", watch_id)

    async def watch_events(self, stream_id: str, since: int, timeout_s: float) -> EventsPage:
        return await self._call(stream_id, "watch_events", since, timeout_s)

    async def webhook_stats(self) -> list[WebhookStats]:
        """Webhook delivery counters per destination, summed over the hosts."""
        total: dict[str, WebhookStats] = {}
        for page in await self._every_host("webhook_stats"):
            for st in page:
                have = total.get(st.destination)
                total[st.destination] = st if have is None else have.model_copy(update={
                    k: getattr(have, k) + getattr(st, k) for k in ("delivered", "failed", "dropped", "pending")})
        return [total[k] for k in sorted(total)]


class LocalBackend(HostBackend):
    """The backend without Ray: one :class:`serve.core.hosts.IngestHost` in this process over direct stage calls.

    Args:
        settings: the service settings (limits, media root, ingest queue, watches).
        source_config: how sources are opened.
        defaults: the default :class:`serve.core.options.StreamOptions`.
        vision, llm: the stages (real :class:`serve.core.stages.VisionStage` / ``LLMStage``, or test doubles).
    """

    def __init__(self, settings: ServeSettings, source_config: SourceConfig, defaults: StreamOptions, vision: Any,
                 llm: Any) -> None:
        super().__init__(settings, defaults)
        self.vision, self.llm = vision, llm
        self.host = IngestHost(DirectTransport(vision, with_moments(llm)), source_config.model_copy(
            update={"media_root": settings.media_root}), settings.ingest, settings.stream_ttl_s,
            watches=settings.watches, trim_on_close=False, max_waiters=2,  # long-polls hold to_thread workers
            timeline=settings.timeline)

    @property
    def watches(self) -> WatchHub:
        """The host's watches (tests read their bounds)."""
        return self.host.watches

    async def _call(self, stream_id: str, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.host, method), stream_id, *args)

    def _stream(self, stream_id: str, method: str, *args: Any) -> AsyncIterator[Any]:
        return iterate_in_thread(lambda: getattr(self.host, method)(stream_id, *args))

    async def _create(self, plan: StreamPlan) -> StreamStats:
        return await asyncio.to_thread(self.host.create, plan, self.settings.max_streams)

    async def _every_host(self, method: str) -> list[Any]:
        return [await asyncio.to_thread(getattr(self.host, method))]

    def _host_key(self, stream_id: str) -> str:
        return self.host.name

    async def _host_call(self, key: str, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.host, method), *args)

    def _host_stream(self, key: str, method: str, *args: Any) -> AsyncIterator[Any]:
        return iterate_in_thread(lambda: getattr(self.host, method)(*args))

    async def health(self) -> HealthResponse:
        return HealthResponse(status="ok", streams=len(self.host.ids()), deployments={"local": "HEALTHY"})

    def shutdown(self) -> None:
        """Close every stream and stop the watch scheduler."""
        self.host.shutdown()
