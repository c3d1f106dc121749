"""Questions across cameras and across time over HTTP: the routes only relay to the backend.

* ``POST /questions`` -- one question to many streams (ids or a label selector), as server-sent events: one
  ``answer`` event per stream as it finishes (its ``status`` is 200, or the stream's error), then ``done`` (with the
  yes/no ranking).
* ``POST /streams/{id}/moments`` and ``POST /moments`` -- when did it happen: the top moments of one stream's (or
  many streams') retained history, with pts ranges, scores and thumbnails.
* ``GET /streams/{id}/timeline`` -- watch alerts, yes/no scores, captions and moments in pts order, with thumbnails;
  ``GET /streams/{id}/thumbnails/{n}.jpg`` -- one chunk thumbnail.

Fleet questions and moment searches take a slot of the backend's :class:`serve.core.fleet.FleetGate` (429 past
``serve.fleet.max_concurrent``); a fleet question also holds a long-lived slot while it streams.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import Response

from serve.core.fleet import FleetAnswer, FleetDone, FleetQuestion, rank
from serve.core.protocol import PayloadTooLargeError
from serve.core.moments import FleetMoments, FleetMomentsRequest, MomentsRequest, MomentsResult
from serve.core.settings import ServeSettings
from serve.core.timeline import KINDS, Timeline
from serve.http.limits import GatedStreamingResponse, LongLivedGate
from stream.errors import RequestError, StreamNotFoundError


class FleetRequestError(RequestError):
    """A fleet or moments request field out of range (422)."""

    status = 422


def parse_selector(text: str | None) -> dict[str, str] | None:
    """``"site=dock,cam=3"`` -> ``{"site": "dock", "cam": "3"}`` (None: no selector); 422 naming a bad part."""
    if text is None:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise FleetRequestError(f"selector part {part!r} is not key=value. Fix: e.g. ?selector=site=dock,cam=3")
        out[key.strip()] = value.strip()
    return out


def add_fleet_routes(app: FastAPI, backend: Any, settings: ServeSettings, gate: LongLivedGate,
                     sse_event: Callable[[str, dict[str, Any]], bytes],
                     error_event: Callable[[BaseException], dict[str, Any]]) -> None:
    """Mount the fleet question, moments, timeline and thumbnail routes."""
    router = APIRouter()
    limits = settings.timeline

    @router.post("/questions", tags=["fleet"], responses={200: {"content": {"text/event-stream": {}}, "description":
                 "SSE: an 'answer' event per stream as it finishes, then 'done' (with the yes/no ranking)."}})
    async def fleet_question(body: FleetQuestion) -> GatedStreamingResponse:
        """Ask many streams at once (ids or a label selector); their questions are batched in the LLM."""
        _check_text(body.question, settings)
        if body.max_new_tokens > settings.fleet.max_new_tokens:
            raise FleetRequestError(f"max_new_tokens={body.max_new_tokens} exceeds the fleet limit "
                                    f"{settings.fleet.max_new_tokens} (serve.fleet.max_new_tokens). Fix: ask for "
                                    "fewer tokens.")
        ids = await backend.targets(body)
        release = _both(backend.fleet_gate.acquire, lambda: gate.acquire(None, "answer"))
        return GatedStreamingResponse(_fleet_events(backend, ids, body, sse_event, error_event), release,
                                      media_type="text/event-stream",
                                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/streams/{stream_id}/moments", tags=["moments"], response_model=MomentsResult)
    async def moments(stream_id: str, body: MomentsRequest) -> MomentsResult:
        """When did it happen: the stream's retained history scored block by block, the top moments first."""
        _check_moments(body, settings)
        release = backend.fleet_gate.acquire()
        try:
            return await backend.moments(stream_id, body)
        finally:
            release()

    @router.post("/moments", tags=["moments"], response_model=FleetMoments)
    async def fleet_moments(body: FleetMomentsRequest) -> FleetMoments:
        """Moments of many streams (ids or a label selector), ranked together."""
        _check_moments(body, settings)
        ids = await backend.targets(body)
        release = backend.fleet_gate.acquire()
        try:
            return await backend.fleet_moments(ids, body)
        finally:
            release()

    @router.get("/streams/{stream_id}/timeline", tags=["moments"], response_model=Timeline)
    async def timeline(stream_id: str,
                       since: float | None = Query(None, description="Only entries at or after this pts (s)."),
                       until: float | None = Query(None, description="Only entries at or before this pts (s)."),
                       kinds: str | None = Query(None, description=f"Comma-separated subset of {', '.join(KINDS)}.")
                       ) -> Timeline:
        """Watch alerts, yes/no scores, captions (text watches) and moments of the stream, in pts order."""
        wanted = [k.strip() for k in kinds.split(",") if k.strip()] if kinds is not None else None
        bad = [k for k in wanted or () if k not in KINDS]
        if bad:
            raise FleetRequestError(f"kinds {bad} are not timeline kinds; allowed: {', '.join(KINDS)}. Fix: e.g. "
                                    "?kinds=alert,moment")
        return await backend.timeline(stream_id, since, until, wanted)

    @router.get("/streams/{stream_id}/thumbnails/{thumb_id}.jpg", tags=["moments"], response_class=Response,
                responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(stream_id: str, thumb_id: int) -> Response:
        """One chunk thumbnail (its id comes with moments and timeline entries)."""
        data = await backend.thumbnail(stream_id, thumb_id)
        if data is None:
            raise StreamNotFoundError(
                f"thumbnail {thumb_id} of stream {stream_id!r} is not kept (each stream keeps its newest "
                f"{limits.thumbnails_per_stream}, serve.timeline.thumbnails_per_stream). Fix: take ids from GET "
                f"/streams/{stream_id}/timeline.")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    app.include_router(router)


def _check_text(text: str, settings: ServeSettings) -> None:
    """413 for a question or query longer than ``serve.max_question_chars`` (the limit of every question)."""
    if len(text) > settings.max_question_chars:
        raise PayloadTooLargeError(f"question has {len(text)} characters, over the limit of "
                                   f"{settings.max_question_chars} (serve.max_question_chars). Fix: shorten it.")


def _check_moments(body: MomentsRequest, settings: ServeSettings) -> None:
    _check_text(body.query, settings)
    if body.top_k > settings.timeline.max_top_k:
        raise FleetRequestError(f"top_k={body.top_k} exceeds {settings.timeline.max_top_k} "
                                "(serve.timeline.max_top_k). Fix: ask for fewer moments.")


def _both(first: Callable[[], Callable[[], None]], second: Callable[[], Callable[[], None]]) -> Callable[[], None]:
    """Take two slots (giving the first back if the second is refused); one release for both."""
    one = first()
    try:
        two = second()
    except BaseException:
        one()
        raise

    def release() -> None:
        two()
        one()

    return release


async def _fleet_events(backend: Any, ids: list[str], body: FleetQuestion,
                        sse_event: Callable[[str, dict[str, Any]], bytes],
                        error_event: Callable[[BaseException], dict[str, Any]]) -> AsyncIterator[bytes]:
    start = time.perf_counter()
    answers: list[FleetAnswer] = []
    first: float | None = None
    try:
        async for answer in backend.fleet(ids, body):
            answers.append(answer)
            first = first if first is not None else (time.perf_counter() - start) * 1000
            yield sse_event("answer", answer.model_dump(exclude_none=True))
    except Exception as exc:  # the HTTP status is sent already: report in-band
        yield sse_event("error", error_event(exc))
        return
    done = FleetDone(question=body.question, mode=body.mode, streams=len(ids),
                     answered=sum(a.status == 200 for a in answers), failed=sum(a.status != 200 for a in answers),
                     ranking=rank(answers) if body.mode == "yes_no" else [], first_ms=first,
                     total_ms=(time.perf_counter() - start) * 1000)
    yield sse_event("done", done.model_dump())
