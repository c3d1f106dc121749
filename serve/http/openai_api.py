"""OpenAI-compatible endpoints over a :class:`serve.http.app.StreamBackend`: ``GET /v1/models``, ``POST /v1/chat/completions``.

A user message names the video in a content part ``{"type": "video_url", "video_url": {"url": ...}}``:

* ``stream://<id>``: the answer is over that live stream's current context, exactly what
  ``POST /streams/{id}/questions`` gives (same backend call, ``wait_s`` from the request, default 0);
* ``rtsp://``, ``http(s)://`` or a media-root path: a stream is opened for this request, the answer waits at most
  ``video_wait_s`` (default 5 s, max 60 s) for its ingest to go idle, and the stream is closed afterwards.

Decoding is greedy unless ``temperature`` > 0 (then sampled, with ``top_p`` and ``seed`` as OpenAI defines them; the
same settings exist on ``POST /streams/{id}/questions``). ``stop`` strings cut the answer (finish_reason ``stop``); reaching ``max_tokens`` pieces gives
``length``. Usage is exact, counted by the LLM that answered (:class:`serve.core.api.AnswerUsage`, sent with the answer):
``usage.prompt_tokens`` is what the answer was conditioned on -- for a live stream, the KV tokens the question
attended to (prompt prefix/sinks, retrieved blocks and the recent window, *not* frames already evicted) plus the
tokens the question added (end-of-video piece, question text, assistant-turn start); ``usage.completion_tokens`` is
the tokens generated (when a stop string cut the answer: the pieces read up to the stop). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.core.api import SEED_MAX, AnswerUsage, CreateStreamRequest, QuestionRequest
from serve.core.settings import ServeSettings
from serve.http.backend import answer_pieces
from serve.http.openai_fleet import complete_fleet
from serve.http.limits import GatedStreamingResponse, LongLivedGate
from stream.errors import RequestError

MODEL_ID = "stc-serve"


class OpenAIError(RequestError):
    """A request the OpenAI layer refuses (400 unless a subclass says otherwise)."""

    status = 400


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    video_url: dict[str, Any] | None = None


class ChatMessage(BaseModel):
    """One chat message; ``content`` is a string or a list of content parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions request the service honours (other OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(MODEL_ID, description=f"Must be {MODEL_ID!r} (GET /v1/models).")
    messages: list[ChatMessage] = Field(..., min_length=1)
    n: int = Field(1, description="Choices per request; only 1 is served.")
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="Default 0 (greedy).")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    wait_s: float = Field(0.0, ge=0, le=60, description="stream:// only: wait for ingest to go idle first.")
    video_wait_s: float = Field(5.0, ge=0, le=60, description="URL videos: bounded wait for the opened stream.")


def openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    """An error body in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def _question_and_video(messages: list[ChatMessage]) -> tuple[str, list[str]]:
    """The last user message's text and its video URLs (one, or several ``stream://`` ones); raises
    :class:`OpenAIError` naming the fix."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise OpenAIError("messages has no 'user' message. Fix: add {'role': 'user', 'content': [...]}.")
    last = users[-1]
    parts = [_ContentPart(type="text", text=last.content)] if isinstance(last.content, str) else (last.content or [])
    text = " ".join(p.text for p in parts if p.type == "text" and p.text).strip()
    urls = [str((p.video_url or {}).get("url", "")) for p in parts if p.type == "video_url"]
    if not urls:  # the video may be named in an earlier user message of the conversation
        for m in reversed(users[:-1]):
            if isinstance(m.content, list):
                urls = [str((p.video_url or {}).get("url", "")) for p in m.content if p.type == "video_url"]
                if urls:
                    break
    if not urls or not all(urls):
        raise OpenAIError(
            f"expected a video_url content part, got {len(urls)} (or an empty url). Fix: add "
            "{'type': 'video_url', 'video_url': {'url': 'stream://<stream id>'}} (or an rtsp/http URL or media file)."
        )
    if len(urls) > 1 and not all(u.startswith("stream://") for u in urls):
        raise OpenAIError(
            f"several video_url parts must all be live streams (stream://<id>), got {urls[:4]}. Fix: ask about one "
            "URL or media file per request, or name several streams as stream://<id> parts.")
    if not text:
        raise OpenAIError("the user message has no text part. Fix: add {'type': 'text', 'text': '<question>'}.")
    return text, urls


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise OpenAIError(f"stop must be up to 4 non-empty strings, got {stops!r}. Fix: shorten the list.")
    return stops


class _Cut:
    """Applies stop strings to a stream of pieces; holds back just enough text to catch a stop split across pieces."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.buffer, self.stopped = stops, "", False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> str:
        self.buffer += piece
        for s in self.stops:
            at = self.buffer.find(s)
            if at >= 0:
                out, self.buffer, self.stopped = self.buffer[:at], "", True
                return out
        cut = len(self.buffer) - self.hold if self.hold else len(self.buffer)
        out, self.buffer = self.buffer[:max(cut, 0)], self.buffer[max(cut, 0):]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def _check_request(body: ChatCompletionRequest) -> None:
    """The fields the service accepts only one value of: ``model`` and ``n``."""
    if body.model != MODEL_ID:
        raise OpenAIError(f"model {body.model!r} is not served here; the only model is {MODEL_ID!r} (GET /v1/models)."
                          f" Fix: set \"model\": \"{MODEL_ID}\".")
    if body.n != 1:
        raise OpenAIError(f"n={body.n} choices were asked for; this service answers one choice per request (n=1). "
                          "Fix: drop n, or send n requests.")


def add_openai_routes(app: FastAPI, backend: Any, settings: ServeSettings, gate: LongLivedGate) -> None:
    """Mount ``/v1/models`` and ``/v1/chat/completions`` on ``app`` (OpenAI error shape under ``/v1``); an answer
    takes a slot of ``gate`` while it runs."""
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.get("/models")
    async def models() -> dict[str, Any]:
        """The one model this service serves (the video-LLM behind every stream)."""
        return {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "stc-serve"}]}

    @router.post("/chat/completions")
    async def chat(request: Request) -> Any:
        """Answer the last user message over the video it names (``stream://<id>``, or a URL opened for the request)."""
        try:
            raw = await request.json()
        except ValueError as exc:
            return openai_error(400, f"body is not JSON ({exc}). Fix: send a JSON chat request.", "invalid_request_error")
        try:
            body = ChatCompletionRequest.model_validate(raw)
        except ValueError as exc:
            return openai_error(400, f"invalid request: {exc}", "invalid_request_error")
        try:
            _check_request(body)
            question, urls = _question_and_video(body.messages)
            url = urls[0]
            one_stream = len(urls) == 1 and url.startswith("stream://")
            release = gate.acquire(url[len("stream://"):] if one_stream else None, "answer")
        except RequestError as exc:
            return _as_openai(exc)
        try:
            if len(urls) > 1:  # several streams: one fleet question (a fleet slot too, 429 past the cap)
                stops, limit = check_answer(body, settings, question, settings.fleet.max_new_tokens)
                release = _then(release, backend.fleet_gate.acquire())
                answer = await complete_fleet(backend, body.model, body.stream, question, urls, stops, limit)
            else:
                answer = await _complete(backend, settings, body, question, url)
        except BaseException as exc:
            release()
            if isinstance(exc, RequestError):
                return _as_openai(exc)
            raise
        if isinstance(answer, StreamingResponse):
            return GatedStreamingResponse(answer.body_iterator, release, media_type="text/event-stream",
                                          headers={"Cache-Control": "no-cache"})
        release()
        return answer

    app.include_router(router)


def _then(first: Any, second: Any) -> Any:
    """One release for two slots."""
    def release() -> None:
        second()
        first()
    return release


def _as_openai(exc: RequestError) -> JSONResponse:
    kind = {404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
        exc.status, "invalid_request_error")
    resp = openai_error(exc.status, str(exc), kind)
    if exc.retry_after_s:
        resp.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return resp


def check_answer(body: ChatCompletionRequest, settings: ServeSettings, question: str, most: int) -> tuple[list[str],
                                                                                                        int]:
    """The request's stop strings and answer length, within the service limits (``most`` tokens)."""
    stops = _stops(body.stop)
    limit = body.max_completion_tokens or body.max_tokens or 64
    if limit > most:
        raise OpenAIError(f"max_tokens={limit} exceeds the service limit {most}. Fix: ask for fewer.")
    if len(question) > settings.max_question_chars:
        raise OpenAIError(f"question has {len(question)} characters, over {settings.max_question_chars}. Fix: shorten.")
    return stops, limit


async def _complete(backend: Any, settings: ServeSettings, body: ChatCompletionRequest, question: str,
                    url: str) -> Any:
    stops, limit = check_answer(body, settings, question, settings.max_new_tokens)
    owned = None
    if url.startswith("stream://"):
        sid, wait = url[len("stream://"):], body.wait_s
    else:
        created = await backend.create(CreateStreamRequest(source=url))
        sid = owned = created.stream_id
        wait = await _first_frames(backend, sid, body.video_wait_s)
    usage = AnswerUsage()  # filled by the backend from the LLM's own counts
    try:
        request = QuestionRequest(question=question, max_new_tokens=limit, wait_s=wait, temperature=body.temperature or 0.0,
                                  top_p=body.top_p or 1.0, seed=body.seed)
        pieces = answer_pieces(backend.ask(sid, request), usage).__aiter__()
        first = await _first(pieces)  # errors before the first piece still get a real HTTP status
    except BaseException:
        if owned:
            await backend.close(owned)
        raise
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(_stream(backend, owned, first, pieces, stops, limit, usage, meta),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        text, count, reason = await _collect(first, pieces, stops, limit, usage)
    finally:
        if owned:
            await backend.close(owned)
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
            "usage": _usage(usage, count)}


async def _first_frames(backend: Any, sid: str, wait_s: float) -> float:
    """Wait (at most ``wait_s``) until the new stream encoded a frame or stopped; returns the wait left."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        stats = await backend.stats(sid)
        if stats.ingest.frames_encoded > 0 or stats.state not in ("starting", "running"):
            break
        await asyncio.sleep(0.05)
    return max(deadline - time.monotonic(), 0.0)


async def _first(pieces: AsyncIterator[str]) -> str | None:
    try:
        return await pieces.__anext__()
    except StopAsyncIteration:
        return None


async def _all(first: str | None, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    if first is None:
        return
    yield first
    async for piece in pieces:
        yield piece


async def _cut_pieces(first: str | None, pieces: AsyncIterator[str], stops: list[str], limit: int,
                      state: dict[str, Any], usage: AnswerUsage) -> AsyncIterator[str]:
    cut, state["count"], state["reason"] = _Cut(stops), 0, "stop"
    async for piece in _all(first, pieces):
        state["count"] += 1
        out = cut.feed(piece)
        if out:
            yield out
        if cut.stopped:
            return
    tail = cut.flush()
    if tail:
        yield tail
    if (usage.completion_tokens or state["count"]) >= limit:
        state["reason"] = "length"


async def _collect(first: str | None, pieces: AsyncIterator[str], stops: list[str], limit: int,
                   usage: AnswerUsage) -> tuple[str, int, str]:
    state: dict[str, Any] = {}
    text = "".join([p async for p in _cut_pieces(first, pieces, stops, limit, state, usage)])
    return text, state["count"], state["reason"]


def _usage(usage: AnswerUsage, pieces: int) -> dict[str, int]:
    """OpenAI's usage from the LLM's exact counts (``pieces`` read stands in when a stop string cut the answer)."""
    completion = usage.completion_tokens if usage.completion_tokens is not None else pieces
    prompt = usage.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(meta: dict[str, Any], delta: dict[str, Any], reason: str | None, usage: dict | None = None) -> bytes:
    body = {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


async def _stream(backend: Any, owned: str | None, first: str | None, pieces: AsyncIterator[str], stops: list[str],
                  limit: int, usage: AnswerUsage, meta: dict[str, Any]) -> AsyncIterator[bytes]:
    state: dict[str, Any] = {}
    try:
        yield _chunk(meta, {"role": "assistant", "content": ""}, None)
        try:
            async for text in _cut_pieces(first, pieces, stops, limit, state, usage):
                yield _chunk(meta, {"content": text}, None)
        except RequestError as exc:  # the status is sent already: report in-band, as OpenAI-style servers do
            err = {"error": {"message": str(exc), "type": "invalid_request_error", "param": None, "code": exc.status}}
            if exc.retry_after_s:
                err["error"]["retry_after_s"] = exc.retry_after_s
            yield f"data: {json.dumps(err)}\n\n".encode()
            return
        yield _chunk(meta, {}, state["reason"], _usage(usage, state["count"]))
        yield b"data: [DONE]\n\n"
    finally:
        if owned:
            await backend.close(owned)
