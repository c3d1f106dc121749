"""One stream's life as a plain object (:class:`StreamRunner`), source checks, and the in-process backend.

:class:`StreamRunner` owns a stream's source and :class:`serve.ingest.IngestWorker`; it reaches the model stages
through a :class:`StageClient` (direct calls in-process, Ray handles in the service). :class:`LocalBackend` serves
the HTTP API (:mod:`serve.http_app`) without Ray -- tests and a single-process deployment use it; the Ray
service runs the same runner in its ingest hosts (:mod:`serve.hosts`, many streams per host).
"""
from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
import urllib.parse
import uuid
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

import numpy as np

from serve.api import (
    AnswerUsage,
    CapacityError,
    CreateStreamRequest,
    ForbiddenSourceError,
    HealthResponse,
    IngestStats,
    PushResponse,
    QuestionRequest,
    StreamExistsError,
    StreamNotFoundError,
    StreamStateError,
    StreamStats,
)
from serve.messages import AnswerStats
from serve.protocol import FrameFormatError, jpeg_bytes
from serve.sources_policy import check_source_text, check_url_source
from serve.ingest import ChunkQueue, IngestWorker, queue_policy, stream_kind
from serve.service_config import IngestSettings, ServeSettings
from serve.watchset import FlowAsker, WatchHub
from serve.webhooks import WebhookSender
from stream.config import SourceConfig
from stream.errors import SourceError, SourceNotFoundError
from stream.frames import FrameBatch
from stream.sampler import Chunker, FpsSampler
from stream.sources import MemorySource, open_source

def resolve_source(spec: str | None, settings: ServeSettings) -> str:
    """The checked source spec for :func:`stream.sources.open_source` (``"memory://"`` for a pushed stream).

    Raises:
        ForbiddenSourceError: scheme or host not allowed (:mod:`serve.sources_policy`), file sources disabled, or
            a path (after resolving ``..`` and symlinks) outside the media root (403).
        InvalidSourceError: control characters in the spec (400).
    """
    if spec is None:
        return "memory://"
    check_source_text(spec)
    scheme = urllib.parse.urlsplit(spec).scheme.lower() if "://" in spec else ""
    if scheme and scheme != "file":
        if scheme not in settings.allowed_schemes:
            raise ForbiddenSourceError(
                f"URL scheme {scheme!r} is not allowed; allowed: {', '.join(settings.allowed_schemes)}. "
                "Fix: use one of them, or a file path under the media root."
            )
        check_url_source(spec, settings)
        return spec
    path = urllib.parse.unquote(urllib.parse.urlsplit(spec).path) if scheme == "file" else spec
    root = settings.resolved_media_root()
    if root is None:
        raise ForbiddenSourceError(
            f"file source {spec!r} refused: file sources are disabled (no media_root configured). "
            "Fix: set serve.media_root in the config, or stream over rtsp/http."
        )
    full = os.path.realpath(os.path.join(root, path))  # resolves '..' and every symlink on the way
    if os.path.commonpath([full, root]) != root:
        raise ForbiddenSourceError(
            f"file source {spec!r} resolves outside the media root {root}. Fix: pass a path inside the media root."
        )
    if not os.path.isfile(full):
        raise SourceNotFoundError(
            f"file source {spec!r} does not exist under the media root {root}. Fix: check the name (paths are "
            "relative to the media root)."
        )
    return full


class StageClient(Protocol):
    """How a stream reaches the model stages (vision encoder, then LLM)."""

    def open(self, stream_id: str, options: Any) -> None: ...

    def encode_append(self, stream_id: str, batch: FrameBatch) -> dict[str, Any]: ...

    def close(self, stream_id: str) -> None: ...


class StreamRunner:
    """One stream: its source, ingest threads and stage state, plus what :class:`StreamStats` reports.

    Args:
        stream_id: the stream's id.
        source_spec: the request's source (``None`` for a pushed stream), reported back as is.
        resolved: the checked spec (:func:`resolve_source`).
        options: the stream's :class:`serve.options.StreamOptions`.
        source_config: how sources are opened (timeouts, reconnects, queue size).
        ingest: chunk queue size and drop policy.
        client: the stage client (encoder + LLM).
    """

    def __init__(self, stream_id: str, source_spec: str | None, resolved: str, options: Any,
                 source_config: SourceConfig, ingest: IngestSettings, client: StageClient) -> None:
        self.stream_id = stream_id
        self.source_spec = source_spec
        self.resolved = resolved
        self.options = options
        self.source_config = source_config
        self.ingest = ingest
        self.client = client
        self.created_at = time.time()
        self.questions = 0
        self.worker: IngestWorker | None = None
        self.kind = "push" if resolved == "memory://" else "file"
        self._last_pts: float | None = None  # newest pushed pts: pushes must keep one clock
        self._push_lock = threading.Lock()

    def start(self) -> None:
        """1. open the source (SourceError -> 4xx), 2. open stage state, 3. start the ingest threads."""
        source = self._open_source()
        self.kind = stream_kind(source)
        try:
            self.client.open(self.stream_id, self.options)
        except BaseException:
            source.close()
            raise
        sampler = self.options.sampler
        queue = ChunkQueue(self.ingest.queue_chunks, queue_policy(self.kind, self.ingest.drop_policy))
        # the sink is the stage client's method, not one of this runner's: runner -> worker -> sink -> runner would
        # be a reference cycle, and a closed stream's frames would wait for a full garbage collection
        self.worker = IngestWorker(self.stream_id, source, functools.partial(self.client.encode_append, self.stream_id),
                                   FpsSampler(sampler.fps), Chunker(sampler.frames_per_chunk), queue)
        self.worker.start()

    def _open_source(self) -> Any:
        if self.resolved == "memory://":
            cfg = self.source_config
            return MemorySource(max_queue=cfg.queue_size, overflow="drop_oldest", info=None)
        try:
            return open_source(self.resolved, self.source_config)
        except SourceError as exc:
            if exc.status >= 500:  # an unreachable/silent URL is the request's problem here: answer 4xx
                exc.status = 422
            raise

    @property
    def last_frame(self) -> np.ndarray | None:
        """``[H, W, 3]`` the newest frame sent to the encoder (GET /streams/{id}/frame.jpg); None before one."""
        return self.worker.last_frame if self.worker is not None else None

    def frame_bytes(self) -> int:
        """Pixel bytes this stream holds: queued and in-flight chunks and the newest frame (bounded per stream)."""
        return self.worker.frame_bytes() if self.worker is not None else 0

    def push(self, batch: FrameBatch, flush: bool = False) -> PushResponse:
        """Queue pushed frames (never waits for the encoder); ``flush`` also queues the partial chunk."""
        worker = self._worker()
        if self.kind != "push":
            raise StreamStateError(
                f"stream {self.stream_id!r} reads from {self.source_spec!r}; frames can only be pushed to a stream "
                "created without a source. Fix: create one with POST /streams and no 'source'."
            )
        if worker.state != "running":
            raise StreamStateError(f"stream {self.stream_id!r} is {worker.state}. Fix: open a new stream.")
        with self._push_lock:
            if self._last_pts is not None and batch.pts[0] < self._last_pts:
                raise FrameFormatError(
                    f"pts must not go backwards across pushes on stream {self.stream_id!r}: the last frame had "
                    f"{self._last_pts}, this batch starts at {float(batch.pts[0])}. Fix: keep one clock per stream."
                )
            accepted = worker.push(_renumber(batch, worker))
            self._last_pts = float(batch.pts[-1])
        if flush:
            worker.flush()
        st = worker.stats()
        return PushResponse(stream_id=self.stream_id, accepted=accepted, frames_in=st["frames_in"],
                            frames_dropped=st["frames_dropped"])

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every chunk queued so far reached the LLM; ``False`` on timeout."""
        return self._worker().wait_idle(timeout_s)

    def stats(self, vision: dict[str, Any] | None = None, llm: dict[str, Any] | None = None) -> StreamStats:
        """The stream's stats; ``vision``/``llm`` are the stages' own counters when the caller fetched them."""
        worker = self._worker()
        ingest = IngestStats(**worker.stats(), state_resets=int(getattr(self.client, "resets", 0)),
                             frames_lost=int(getattr(self.client, "frames_lost", 0)))
        return StreamStats(
            stream_id=self.stream_id, kind=self.kind, source=self.source_spec, state=worker.state,
            error=worker.error, created_at=self.created_at, questions=self.questions, ingest=ingest,
            **summarize_stage_stats(vision or {}, llm or {}), vision=vision or {}, llm=llm or {},
        )

    def close(self) -> None:
        """Stop ingest and free the stage state (idempotent)."""
        if self.worker is not None:
            self.worker.close()
        try:
            self.client.close(self.stream_id)
        except LookupError:  # StreamNotFoundError: already gone
            pass

    def _worker(self) -> IngestWorker:
        if self.worker is None:
            raise StreamStateError(f"stream {self.stream_id!r} has not started. Fix: wait for POST /streams to return.")
        return self.worker


def _renumber(batch: FrameBatch, worker: IngestWorker) -> FrameBatch:
    """Pushed frames get stream-wide indices (the wire format carries none)."""
    start = worker.source.stats().get("pushed", 0)
    return FrameBatch(rgb=batch.rgb, pts=batch.pts, indices=batch.indices + start)


def summarize_stage_stats(vision: dict[str, Any], llm: dict[str, Any]) -> dict[str, Any]:
    """Pick the headline numbers (cache reuse, tokens kept, KV size) out of the stages' own stats dicts."""
    cache = vision.get("cache") or {}
    reuse = cache.get("reuse_rate")
    return {
        "cache_reuse": float(reuse) if reuse is not None else None,
        "tokens_kept": vision.get("tokens_kept"),
        "tokens_total": vision.get("tokens_in"),
        "kv_tokens": llm.get("kv_tokens"),
        "kv_bytes": llm.get("kv_bytes"),
    }


def new_stream_id(requested: str | None) -> str:
    """The requested id, or a fresh random one."""
    return requested or uuid.uuid4().hex[:12]


def stream_options(defaults: Any, request: CreateStreamRequest) -> Any:
    """The stream's options: config defaults, then the request's ``options``, ``fps`` and ``frames_per_chunk``."""
    overrides: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in request.options.items()}
    sampler = dict(overrides.get("sampler") or {})
    if request.fps is not None:
        sampler["fps"] = request.fps
    if request.frames_per_chunk is not None:
        sampler["frames_per_chunk"] = request.frames_per_chunk
    if sampler:
        overrides["sampler"] = sampler
    return defaults.merged(overrides)


def direct_flow(vision: Any, llm: Any) -> Any:
    """A :class:`serve.flow.StageFlow` over in-process stages (one per stream)."""
    from serve.flow import DirectTransport, StageFlow

    return StageFlow(DirectTransport(vision, llm))


async def iterate_in_thread(make: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
    """Drive a blocking iterator from a worker thread, one item at a time (the event loop stays free)."""
    it = await asyncio.to_thread(make)
    sentinel = object()
    try:
        while True:
            item = await asyncio.to_thread(next, it, sentinel)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


class LocalBackend:
    """The HTTP backend without Ray: stages and streams in this process (threads), same behaviour as the service.

    Args:
        settings: the service settings (limits, media root, ingest queue).
        source_config: how sources are opened.
        defaults: the default :class:`serve.options.StreamOptions`.
        vision, llm: the stages (real :class:`serve.stages.VisionStage`/`LLMStage`, or test doubles).
    """

    def __init__(self, settings: ServeSettings, source_config: SourceConfig, defaults: Any, vision: Any,
                 llm: Any) -> None:
        self.settings = settings
        self.source_config = source_config.model_copy(update={"media_root": settings.media_root})
        self.defaults = defaults
        self.vision, self.llm = vision, llm
        self._streams: dict[str, StreamRunner] = {}
        self._lock = threading.Lock()
        self.watches = WatchHub(FlowAsker(self._get), settings.watches, WebhookSender(settings.watches.webhook_hosts),
                                max_waiters=2)  # long-polls hold asyncio.to_thread workers: few at once

    async def create(self, request: CreateStreamRequest) -> StreamStats:
        resolved = resolve_source(request.source, self.settings)
        options = stream_options(self.defaults, request)
        sid = new_stream_id(request.stream_id)
        runner = StreamRunner(sid, request.source, resolved, options, self.source_config, self.settings.ingest,
                              direct_flow(self.vision, self.llm))
        with self._lock:
            if sid in self._streams:
                raise StreamExistsError(f"stream {sid!r} is already open. Fix: pick another id or DELETE it first.")
            if len(self._streams) >= self.settings.max_streams:
                raise CapacityError(
                    f"the service holds its maximum of {self.settings.max_streams} streams. Fix: close one, "
                    "or raise serve.max_streams."
                )
            self._streams[sid] = runner
        try:
            await asyncio.to_thread(runner.start)
        except BaseException:
            with self._lock:
                self._streams.pop(sid, None)
            raise
        return runner.stats()

    def _get(self, stream_id: str) -> StreamRunner:
        with self._lock:
            runner = self._streams.get(stream_id)
        if runner is None:
            raise StreamNotFoundError(
                f"no open stream {stream_id!r}. Fix: list streams with GET /streams, or create one with POST /streams."
            )
        return runner

    async def push(self, stream_id: str, batch: FrameBatch, flush: bool) -> PushResponse:
        return await asyncio.to_thread(self._get(stream_id).push, batch, flush)

    async def ask(self, stream_id: str, request: QuestionRequest,
                  usage: AnswerUsage | None = None) -> AsyncIterator[str]:
        """The answer's pieces; ``usage`` (if given) gets the LLM's exact token counts as they become known."""
        runner = self._get(stream_id)
        if request.wait_s > 0:
            await asyncio.to_thread(runner.wait_idle, request.wait_s)
        runner.questions += 1
        stats = AnswerStats()
        pieces = iterate_in_thread(lambda: self.llm.ask(stream_id, request.question, request.max_new_tokens,
                                                         sampling=request.sampling(), stats=stats))
        async for piece in pieces:
            if usage is not None and stats.prompted:
                usage.update(AnswerUsage.of(stats))
            yield piece
        if usage is not None and stats.prompted:
            usage.update(AnswerUsage.of(stats, done=True))

    # -- watches (serve/watchset.py: the same WatchHub an ingest host runs) -------------------------------------------
    async def add_watch(self, stream_id: str, request: Any) -> Any:
        return await asyncio.to_thread(self.watches.add, stream_id, request)

    async def list_watches(self, stream_id: str) -> list[Any]:
        return await asyncio.to_thread(self.watches.list, stream_id)

    async def delete_watch(self, stream_id: str, watch_id: str) -> Any:
        return self.watches.remove(stream_id, watch_id)

    async def watch_events(self, stream_id: str, since: int, timeout_s: float) -> Any:
        return await asyncio.to_thread(self.watches.events, stream_id, since, timeout_s)

    async def frame_jpeg(self, stream_id: str) -> bytes | None:
        """The newest sampled frame as JPEG (None before the first chunk)."""
        frame = self._get(stream_id).last_frame
        return None if frame is None else await asyncio.to_thread(jpeg_bytes, frame)

    async def stats(self, stream_id: str) -> StreamStats:
        runner = self._get(stream_id)
        return await asyncio.to_thread(self._stats, runner)

    def _stats(self, runner: StreamRunner) -> StreamStats:
        return runner.stats(_safe(self.vision.stats, runner.stream_id), _safe(self.llm.stats, runner.stream_id))

    async def list(self) -> list[StreamStats]:
        with self._lock:
            runners = list(self._streams.values())
        return [await asyncio.to_thread(self._stats, r) for r in runners]

    async def close(self, stream_id: str) -> StreamStats:
        runner = self._get(stream_id)
        final = await asyncio.to_thread(self._stats, runner)
        await asyncio.to_thread(runner.close)
        with self._lock:
            self._streams.pop(stream_id, None)
        self.watches.end_stream(stream_id, "closed")
        return final.model_copy(update={"state": "closed"})

    async def health(self) -> HealthResponse:
        with self._lock:
            n = len(self._streams)
        return HealthResponse(status="ok", streams=n, deployments={"local": "HEALTHY"})

    def shutdown(self) -> None:
        """Close every stream."""
        with self._lock:
            runners = list(self._streams.values())
            self._streams.clear()
        for runner in runners:
            self.watches.end_stream(runner.stream_id, "closed")
            runner.close()
        self.watches.shutdown()


def _safe(fn: Callable[[str], dict[str, Any]], stream_id: str) -> dict[str, Any]:
    try:
        return fn(stream_id) or {}
    except Exception as exc:  # stats are best effort: a stage that lost the stream reports nothing
        return {"error": f"{type(exc).__name__}: {exc}"}
