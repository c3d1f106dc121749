"""The HTTP API (FastAPI) over a :class:`StreamBackend`: routes, API key, 4xx mapping, SSE answers, metrics.

The same app runs inside the Ray Serve ingress (backend: :class:`serve.deploy.app.RayBackend`) and in-process in tests
(backend: :class:`serve.core.local.LocalBackend`). Every error answer is an :class:`serve.core.api.ErrorResponse` JSON body
with the status the error class carries (see :mod:`stream.errors` and :mod:`serve.core.api`).
"""
from __future__ import annotations

import hmac
import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serve.core.api import (
    AnswerDone,
    AnswerUsage,
    CreateStreamRequest,
    ErrorResponse,
    HealthResponse,
    PushResponse,
    QuestionRequest,
    StreamList,
    StreamStats,
    UnauthorizedError,
)
from serve.core.protocol import CONTENT_TYPES, FrameLimits, PayloadTooLargeError, ProtocolError, decode_frames
from serve.core.settings import ServeSettings
from serve.http.backend import StreamBackend, answer_pieces
from serve.http.console import add_console_routes
from serve.http.openai_api import add_openai_routes
from serve.http.watches import add_watch_routes
from stream.errors import RequestError

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
}


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    """The JSON error body every failure uses."""
    body = {"error": {"type": kind, "status": status, "message": message}}
    return JSONResponse(body, status_code=status)


class _Metrics:
    """Ingress-side Prometheus series; per-stream gauges are read from the backend at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stc_http_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=self.registry)
        self.ttft = Histogram("stc_ttft_seconds", "Question time to first answer piece (ingress).",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)
        self.questions = Counter("stc_questions", "Questions answered.", registry=self.registry)

    def render(self, streams: list[StreamStats]) -> bytes:
        per_stream = CollectorRegistry()
        per_stream.register(_StreamCollector(streams))
        return generate_latest(self.registry) + generate_latest(per_stream)


class _StreamCollector:
    _FIELDS = (
        ("frames_in", "Frames decoded or pushed."),
        ("frames_encoded", "Frames through the encoder."),
        ("frames_dropped", "Frames dropped because the encoder lagged."),
        ("reconnects", "Live-source reconnects."),
        ("state_resets", "Cold restarts of the stream's model state."),
    )

    def __init__(self, streams: list[StreamStats]) -> None:
        self.streams = streams

    def collect(self) -> Any:
        yield self._gauge("stc_streams_open", "Open streams.", [((), len(self.streams))])
        for name, doc in self._FIELDS:
            rows = [((s.stream_id,), getattr(s.ingest, name)) for s in self.streams]
            yield self._gauge(f"stc_stream_{name}", doc, rows, ["stream"])
        for name, doc in (("kv_bytes", "KV cache bytes."), ("tokens_kept", "Visual tokens kept by the pruner."),
                          ("cache_reuse", "Share of frames reusing cached ViT states (0..1).")):
            rows = [((s.stream_id,), getattr(s, name)) for s in self.streams if getattr(s, name) is not None]
            yield self._gauge(f"stc_stream_{name}", doc, rows, ["stream"])

    @staticmethod
    def _gauge(name: str, doc: str, rows: list[tuple[tuple[str, ...], float]], labels: list[str] | None = None):
        fam = GaugeMetricFamily(name, doc, labels=labels or [])
        for values, value in rows:
            fam.add_metric(list(values), float(value))
        return fam


def make_api(backend: StreamBackend, settings: ServeSettings) -> FastAPI:
    """Build the FastAPI app: every route, the API-key check, error mapping and metrics."""
    app = FastAPI(
        title="stc-serve",
        version="1",
        description="Let a video-LLM watch live video: open streams, push frames, ask questions (SSE answers).",
    )
    metrics = _Metrics()
    _install_middleware(app, settings, metrics)
    _install_error_handlers(app)
    _add_stream_routes(app, backend, settings)
    _add_question_route(app, backend, settings, metrics)
    _add_service_routes(app, backend, metrics)
    add_openai_routes(app, backend, settings)
    add_watch_routes(app, backend, settings)
    add_console_routes(app, backend)
    return app


def _install_middleware(app: FastAPI, settings: ServeSettings, metrics: _Metrics) -> None:
    key = settings.resolved_api_key()

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next: Any) -> Response:
        public = request.url.path in ("/ui", "/ui/") or request.url.path.startswith("/ui/console.")  # static files
        if key is not None and not public and not _authorized(request, key):
            exc = UnauthorizedError(
                "missing or wrong API key. Fix: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            )
            response: Response = error_response(exc.status, type(exc).__name__, str(exc))
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # noqa: BLE001 - an unexpected failure: still the error shape, and counted
                response = error_response(500, type(exc).__name__, f"internal error: {exc}")
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response


def _authorized(request: Request, key: str) -> bool:
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, type(exc).__name__, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        hint = " Fix: see the routes at /docs." if exc.status_code in (404, 405) else ""
        return error_response(exc.status_code, "HTTPError", f"{exc.detail} ({request.method} {request.url.path}).{hint}")

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where or 'body'}: {err.get('msg')} (got {err.get('input')!r})")
        return error_response(422, "ValidationError", "; ".join(parts) + ". Fix: see the schema at /docs.")


def _add_stream_routes(app: FastAPI, backend: StreamBackend, settings: ServeSettings) -> None:
    limits = FrameLimits(settings.max_push_bytes, settings.max_frames_per_push, settings.max_frame_side)

    @app.post("/streams", status_code=201, response_model=StreamStats, responses=_ERRORS, tags=["streams"])
    async def create_stream(body: CreateStreamRequest) -> StreamStats:
        """Open a stream from `source` (rtsp/http(s) URL or a file under the media root), or a pushed stream."""
        return await backend.create(body)

    @app.get("/streams", response_model=StreamList, responses=_ERRORS, tags=["streams"])
    async def list_streams() -> StreamList:
        """Every open stream with its stats."""
        return StreamList(streams=await backend.list())

    @app.get("/streams/{stream_id}", response_model=StreamStats, responses=_ERRORS, tags=["streams"])
    async def stream_stats(stream_id: str) -> StreamStats:
        """Stats of one stream: frames in/dropped, cache reuse, tokens kept, KV size, state."""
        return await backend.stats(stream_id)

    @app.delete("/streams/{stream_id}", response_model=StreamStats, responses=_ERRORS, tags=["streams"])
    async def close_stream(stream_id: str) -> StreamStats:
        """Close the stream and free its state everywhere; returns its final stats."""
        return await backend.close(stream_id)

    @app.post(
        "/streams/{stream_id}/frames",
        response_model=PushResponse,
        responses=_ERRORS,
        tags=["streams"],
        openapi_extra={"requestBody": {"required": True, "content": {"application/msgpack": {"schema": {
            "type": "string", "format": "binary", "description": "A frame batch, see serve/core/protocol.py."}}}}},
    )
    async def push_frames(
        stream_id: str,
        request: Request,
        flush: bool = Query(False, description="Encode buffered frames now even if the chunk is not full."),
    ) -> PushResponse:
        """Push a msgpack batch of frames (raw RGB or JPEG, with timestamps) to a pushed stream."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in CONTENT_TYPES:
            raise _UnsupportedMediaType(
                f"content type {ctype or '(none)'!r} is not accepted. Fix: send 'Content-Type: application/msgpack'."
            )
        body = await _read_capped(request, limits.max_bytes)
        return await backend.push(stream_id, decode_frames(body, limits), flush)


class _UnsupportedMediaType(RequestError):
    status = 415


async def _read_capped(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) as soon as it passes ``max_bytes`` -- before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(
            f"body of {declared} bytes exceeds the {max_bytes}-byte limit. Fix: send fewer or JPEG-encoded frames."
        )
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > max_bytes:
            raise PayloadTooLargeError(f"body exceeds the {max_bytes}-byte limit. Fix: send fewer frames per request.")
        parts.append(part)
    if not size:
        raise ProtocolError("empty body. Fix: send one msgpack frame batch.")
    return b"".join(parts)


def _add_question_route(app: FastAPI, backend: StreamBackend, settings: ServeSettings, metrics: _Metrics) -> None:
    @app.post(
        "/streams/{stream_id}/questions",
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                    "description": "SSE: 'token' events, then 'done' (or 'error')."}},
        tags=["questions"],
    )
    async def ask(stream_id: str, body: QuestionRequest) -> StreamingResponse:
        """Ask about what the stream showed so far; the answer streams as server-sent events."""
        _check_question(body, settings)
        start = time.perf_counter()
        usage = AnswerUsage()
        pieces = answer_pieces(backend.ask(stream_id, body), usage).__aiter__()
        try:  # the first piece is awaited here, so errors before it get a real HTTP status
            first = await pieces.__anext__()
        except StopAsyncIteration:
            first = ""
        ttft = time.perf_counter() - start
        metrics.ttft.observe(ttft)
        return StreamingResponse(_sse(first, pieces, start, ttft, metrics, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _check_question(body: QuestionRequest, settings: ServeSettings) -> None:
    if len(body.question) > settings.max_question_chars:
        raise PayloadTooLargeError(
            f"question has {len(body.question)} characters, over {settings.max_question_chars}. Fix: shorten it."
        )
    if body.max_new_tokens > settings.max_new_tokens:
        raise _TooManyTokens(
            f"max_new_tokens={body.max_new_tokens} exceeds the service limit {settings.max_new_tokens}. "
            "Fix: ask for fewer tokens."
        )


class _TooManyTokens(RequestError):
    status = 422


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event (``event:`` line, one JSON ``data:`` line, blank line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse(first: str, pieces: AsyncIterator[str], start: float, ttft: float,
               metrics: _Metrics, usage: AnswerUsage) -> AsyncIterator[bytes]:
    text, count = [first] if first else [], 1 if first else 0
    if first:
        yield sse_event("token", {"text": first})
    try:
        async for piece in pieces:
            text.append(piece)
            count += 1
            yield sse_event("token", {"text": piece})
    except RequestError as exc:
        yield sse_event("error", {"type": type(exc).__name__, "status": exc.status, "message": str(exc)})
        return
    except Exception as exc:  # the HTTP status is already sent; report the failure in-band
        yield sse_event("error", {"type": type(exc).__name__, "status": 500, "message": str(exc)})
        return
    metrics.questions.inc()
    done = AnswerDone(answer="".join(text), tokens=count, ttft_ms=ttft * 1000,
                      total_ms=(time.perf_counter() - start) * 1000, prompt_tokens=usage.prompt_tokens,
                      completion_tokens=usage.completion_tokens)
    yield sse_event("done", done.model_dump())


def _add_service_routes(app: FastAPI, backend: StreamBackend, metrics: _Metrics) -> None:
    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Liveness of the ingress and model deployments."""
        return await backend.health()

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format: HTTP counters, TTFT histogram, per-stream gauges."""
        return Response(metrics.render(await backend.list()), media_type=CONTENT_TYPE_LATEST)
