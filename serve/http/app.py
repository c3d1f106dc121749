"""The HTTP API (FastAPI) over a :class:`StreamBackend`: routes, API key, 4xx mapping, SSE answers, metrics.

The same app runs inside the Ray Serve ingress (backend: :class:`serve.deploy.app.RayBackend`) and in-process in tests
(backend: :class:`serve.core.local.LocalBackend`). Every error answer is an :class:`serve.core.api.ErrorResponse` JSON body
with the status the error class carries (see :mod:`stream.errors` and :mod:`serve.core.api`).
"""
from __future__ import annotations

import hmac
import json
import math
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response
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
from serve.core.protocol import CONTENT_TYPES, FrameLimits, PayloadTooLargeError, ProtocolError
from serve.core.settings import ServeSettings
from serve.http.backend import StreamBackend, answer_pieces
from serve.http.console import add_console_routes
from serve.http.docs_page import add_docs_routes
from serve.http.fleet import add_fleet_routes, parse_selector
from serve.http.limits import GatedStreamingResponse, LongLivedGate, PushDecoder
from serve.http.metrics import Metrics
from serve.http.openai_api import add_openai_routes
from serve.http.watches import add_watch_routes
from stream.errors import RequestError

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
}


def error_response(status: int, kind: str, message: str, retry_after_s: float | None = None) -> JSONResponse:
    """The JSON error body every failure uses (with ``Retry-After`` when the request may succeed later)."""
    body = {"error": {"type": kind, "status": status, "message": message}}
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s else None
    return JSONResponse(body, status_code=status, headers=headers)


def error_event(exc: BaseException) -> dict[str, Any]:
    """An in-band SSE ``error`` event for a failure after the answer started (the HTTP status is sent already)."""
    status = exc.status if isinstance(exc, RequestError) else 500
    body: dict[str, Any] = {"type": type(exc).__name__, "status": status, "message": str(exc)}
    if isinstance(exc, RequestError) and exc.retry_after_s:
        body["retry_after_s"] = exc.retry_after_s
    return body


def make_api(backend: StreamBackend, settings: ServeSettings) -> FastAPI:
    """Build the FastAPI app: every route, the API-key check, error mapping and metrics."""
    app = FastAPI(
        title="stc-serve",
        version="1",
        description="Let a video-LLM watch live video: open streams, push frames, ask questions (SSE answers).",
        docs_url=None, redoc_url=None,  # /docs is served offline below (Swagger UI's assets come from a CDN)
    )
    metrics = Metrics()
    gate = LongLivedGate(settings.max_readers_per_stream, settings.max_long_lived_per_replica)
    app.state.gate = gate
    _install_middleware(app, settings, metrics)
    _install_error_handlers(app)
    _add_stream_routes(app, backend, settings)
    _add_question_route(app, backend, settings, metrics, gate)
    _add_service_routes(app, backend, metrics, gate)
    add_openai_routes(app, backend, settings, gate)
    add_watch_routes(app, backend, settings, gate)
    add_fleet_routes(app, backend, settings, gate, sse_event, error_event)
    add_console_routes(app, backend)
    add_docs_routes(app)
    return app


def _install_middleware(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
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
        return error_response(exc.status, type(exc).__name__, str(exc), exc.retry_after_s)

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
    limits = FrameLimits(settings.max_push_bytes, settings.max_frames_per_push, settings.max_frame_side,
                         settings.max_push_pixels)
    decoder = PushDecoder(limits, settings.max_stream_push_pixels)

    @app.post("/streams", status_code=201, response_model=StreamStats, responses=_ERRORS, tags=["streams"])
    async def create_stream(body: CreateStreamRequest) -> StreamStats:
        """Open a stream from `source` (rtsp/http(s) URL or a file under the media root), or a pushed stream."""
        return await backend.create(body)

    @app.get("/streams", response_model=StreamList, responses=_ERRORS, tags=["streams"])
    async def list_streams(selector: str | None = Query(
            None, description="Only streams with these labels: 'key=value,key2=value2'.")) -> StreamList:
        """Every open stream with its stats (or those whose labels match `selector`)."""
        return StreamList(streams=await backend.list(parse_selector(selector)))

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
        # decoded off the event loop, once the declared pixels passed the push's and the stream's limits
        return await decoder.push(stream_id, body, lambda batch: backend.push(stream_id, batch, flush))


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


def _add_question_route(app: FastAPI, backend: StreamBackend, settings: ServeSettings, metrics: Metrics,
                        gate: LongLivedGate) -> None:
    @app.post(
        "/streams/{stream_id}/questions",
        responses={**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                    "description": "SSE: 'token' events, then 'done' (or 'error')."}},
        tags=["questions"],
    )
    async def ask(stream_id: str, body: QuestionRequest) -> GatedStreamingResponse:
        """Ask about what the stream showed so far; the answer streams as server-sent events."""
        check_question(body.question, settings)
        if body.max_new_tokens > settings.max_new_tokens:
            raise _TooManyTokens(
                f"max_new_tokens={body.max_new_tokens} exceeds the service limit {settings.max_new_tokens}. "
                "Fix: ask for fewer tokens."
            )
        release = gate.acquire(stream_id, "answer")
        try:
            start = time.perf_counter()
            usage = AnswerUsage()
            pieces = answer_pieces(backend.ask(stream_id, body), usage).__aiter__()
            try:  # the first piece is awaited here, so errors before it get a real HTTP status
                first = await pieces.__anext__()
            except StopAsyncIteration:
                first = ""
        except BaseException:
            release()
            raise
        ttft = time.perf_counter() - start
        metrics.ttft.observe(ttft)
        return GatedStreamingResponse(_sse(first, pieces, start, ttft, metrics, usage), release,
                                      media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def check_question(question: str, settings: ServeSettings) -> None:
    """413 for a question (or a watch's standing question) longer than ``serve.max_question_chars``."""
    if len(question) > settings.max_question_chars:
        raise PayloadTooLargeError(
            f"question has {len(question)} characters, over the limit of {settings.max_question_chars} "
            "(serve.max_question_chars). Fix: shorten it."
        )


class _TooManyTokens(RequestError):
    status = 422


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event (``event:`` line, one JSON ``data:`` line, blank line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse(first: str, pieces: AsyncIterator[str], start: float, ttft: float,
               metrics: Metrics, usage: AnswerUsage) -> AsyncIterator[bytes]:
    text, count = [first] if first else [], 1 if first else 0
    if first:
        yield sse_event("token", {"text": first})
    try:
        async for piece in pieces:
            text.append(piece)
            count += 1
            yield sse_event("token", {"text": piece})
    except Exception as exc:  # the HTTP status is already sent; report the failure in-band
        yield sse_event("error", error_event(exc))
        return
    metrics.questions.inc()
    tokens = usage.completion_tokens if usage.completion_tokens is not None else count
    done = AnswerDone(answer="".join(text), tokens=tokens, ttft_ms=ttft * 1000,
                      total_ms=(time.perf_counter() - start) * 1000, prompt_tokens=usage.prompt_tokens,
                      completion_tokens=usage.completion_tokens)
    yield sse_event("done", done.model_dump())


def _add_service_routes(app: FastAPI, backend: StreamBackend, metrics: Metrics, gate: LongLivedGate) -> None:
    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Liveness of the ingress and model deployments."""
        return await backend.health()

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format: HTTP counters, TTFT histogram, per-stream gauges, webhook deliveries."""
        body = metrics.render(await backend.list(), await backend.webhook_stats(), gate.counts())
        return Response(body, media_type=CONTENT_TYPE_LATEST)
