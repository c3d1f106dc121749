"""Questions over many streams at once ("which camera shows X?"), as plain objects: the request, each stream's answer,
the ranking, and the fan-out that asks every stream concurrently.

* :class:`FleetQuestion` (``POST /questions``): one question to streams named by id or selected by their labels, as
  ``text`` (each stream answers) or ``yes_no`` (each stream's P(yes), ranked).
* :func:`fan_out` runs one question per stream on its own thread, all at once, and yields each stream's
  :class:`FleetAnswer` as it finishes: the LLM engine's step loop then batches the streams' question prefills (and
  decode steps) into the same forwards -- one batched pass instead of N serial requests. An ingest host runs it
  over its own streams (:meth:`serve.core.hosts.IngestHost.fleet`); a backend sends each host its share at once and
  merges the answers as they come (:meth:`serve.core.local.HostBackend.fleet`).
* :class:`FleetGate` bounds how many fleet requests one ingress replica runs at once (429 past it).

Nothing here touches a stream's ingest threads: the questions run on their own threads and reach the LLM through
the stream's flow, exactly as a user's question does.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.core.api import (
    STREAM_ID_PATTERN,
    AnswerUsage,
    ErrorBody,
    QuestionRequest,
    TooManyRequestsError,
    check_labels,
    matches,
)
from serve.core.messages import AnswerStats
from serve.core.protocol import PayloadTooLargeError
from stream.errors import RequestError, StreamNotFoundError

FleetMode = Literal["text", "yes_no"]


class Targets(BaseModel):
    """Which streams a fleet request is for: ``streams`` by id, or every stream whose labels match ``selector``."""

    model_config = ConfigDict(extra="forbid")
    streams: list[str] | None = Field(None, min_length=1, description="Stream ids (duplicates are asked once).",
                                      examples=[["cam1", "cam2"]])
    selector: dict[str, str] | None = Field(
        None, description="Every stream whose labels include all of these ({} selects every stream).",
        examples=[{"site": "dock"}])

    @field_validator("streams")
    @classmethod
    def _ids(cls, ids: list[str] | None) -> list[str] | None:
        import re  # noqa: PLC0415

        for sid in ids or ():
            if not re.match(STREAM_ID_PATTERN, sid):
                raise ValueError(f"stream id {sid[:80]!r} is not a valid id. Fix: use ids from GET /streams")
        return ids

    @field_validator("selector")
    @classmethod
    def _selector(cls, selector: dict[str, str] | None) -> dict[str, str] | None:
        return None if selector is None else check_labels(selector, "selector")

    @model_validator(mode="after")
    def _one_of(self) -> "Targets":
        if (self.streams is None) == (self.selector is None):
            raise ValueError("give exactly one of 'streams' (a list of ids) and 'selector' (labels to match). Fix: "
                             "e.g. \"streams\": [\"cam1\", \"cam2\"] or \"selector\": {\"site\": \"dock\"}")
        return self


class StreamLabels(BaseModel):
    """A stream's id, labels and state: what selecting streams needs (cheaper than its stats)."""

    stream_id: str
    labels: dict[str, str] = Field(default_factory=dict)
    state: str


class FleetQuestion(Targets):
    """One question to many streams at once."""

    question: str = Field(..., min_length=1, description="The question, in plain text.")
    mode: FleetMode = Field("text", description="text: each stream answers; yes_no: each stream's P(yes), ranked.")
    max_new_tokens: int = Field(32, ge=1, description="text: answer length limit per stream.")
    wait_s: float = Field(0.0, ge=0, le=60, description="Wait up to this long per stream (in parallel) for frames "
                          "already received to reach the LLM first.")


class FleetAnswer(BaseModel):
    """One stream's answer to a fleet question (or why it has none: ``status`` and ``error``)."""

    stream_id: str
    mode: FleetMode
    status: int = Field(200, description="200, or the HTTP status of this stream's error.")
    answer: str | None = Field(None, description="text: the answer.")
    score: float | None = Field(None, description="yes_no: P(yes) / (P(yes) + P(no)) of the first answer token.")
    pts: float | None = Field(None, description="Presentation time of the newest frame the LLM held (s).")
    frame_index: int | None = Field(None, description="Index of that frame among the stream's encoded frames.")
    prompt_tokens: int | None = Field(None, description="text: context tokens attended + question tokens (exact).")
    completion_tokens: int | None = Field(None, description="text: tokens generated.")
    ms: float = Field(0.0, description="Milliseconds from the start of the fleet question to this answer.")
    error: ErrorBody | None = None


class RankedStream(BaseModel):
    """A stream's place in a yes/no fleet question's ranking."""

    rank: int
    stream_id: str
    score: float


class FleetDone(BaseModel):
    """The last event of a fleet question."""

    question: str
    mode: FleetMode
    streams: int = Field(..., description="Streams asked.")
    answered: int
    failed: int
    ranking: list[RankedStream] = Field(default_factory=list, description="yes_no: highest P(yes) first.")
    first_ms: float | None = Field(None, description="Milliseconds to the first stream's answer.")
    total_ms: float


def failed_answer(stream_id: str, mode: FleetMode, exc: BaseException, start: float | None = None) -> FleetAnswer:
    """A stream's answer that is its error (4xx/503 from its status, anything else 500)."""
    status = exc.status if isinstance(exc, RequestError) else 500
    return FleetAnswer(stream_id=stream_id, mode=mode, status=status,
                       ms=(time.perf_counter() - start) * 1000 if start is not None else 0.0,
                       error=ErrorBody(type=type(exc).__name__, status=status, message=str(exc)[:2000]))


def rank(answers: list[FleetAnswer]) -> list[RankedStream]:
    """Answered yes/no streams by score, highest first (ties by stream id)."""
    scored = sorted((a for a in answers if a.score is not None), key=lambda a: (-float(a.score or 0), a.stream_id))
    return [RankedStream(rank=i + 1, stream_id=a.stream_id, score=float(a.score or 0)) for i, a in enumerate(scored)]


def resolve_targets(targets: Targets, listed: list[StreamLabels] | None, limit: int) -> list[str]:
    """The stream ids a fleet request is for, in order, at most ``limit``.

    Raises:
        PayloadTooLargeError: more than ``limit`` streams named or selected (413).
        StreamNotFoundError: the selector matches no open stream (404).
    """
    if targets.streams is not None:
        ids = list(dict.fromkeys(targets.streams))
        what = f"names {len(ids)} streams"
    else:
        selector = targets.selector or {}
        ids = [s.stream_id for s in listed or () if s.state not in ("failed", "closed") and matches(s.labels,
                                                                                                    selector)]
        if not ids:
            raise StreamNotFoundError(f"no open stream matches the selector {selector}. Fix: check the labels with "
                                      "GET /streams, or create streams with \"labels\".")
        what = f"selector {selector} matches {len(ids)} streams"
    if len(ids) > limit:
        raise PayloadTooLargeError(f"the request {what}, more than the {limit} one request may ask "
                                   "(serve.fleet.max_streams). Fix: narrow the selector or split the list.")
    return ids


def answer_one(runner: Any, request: FleetQuestion, cancel: threading.Event, start: float) -> FleetAnswer:
    """One stream's answer, through its :class:`serve.core.runner.StreamRunner` (the same calls as a user's question:
    ``flow.ask`` for text, ``flow.score_choices`` for yes/no). A text answer stops early once ``cancel`` is set."""
    sid = runner.stream_id
    if request.wait_s > 0:
        runner.wait_idle(request.wait_s)
    runner.check_answerable()
    ingest = runner.stats().ingest
    seen = {"pts": ingest.last_pts, "frame_index": ingest.frames_encoded - 1 if ingest.frames_encoded else None}
    if request.mode == "yes_no":
        runner.questions += 1
        yes, no = runner.flow.score_choices(sid, request.question, ["yes", "no"])
        fields: dict[str, Any] = {"score": float(yes / max(yes + no, 1e-12))}
    else:
        usage, text = AnswerUsage(), []
        items = runner.ask(QuestionRequest(question=request.question, max_new_tokens=request.max_new_tokens))
        try:
            for item in items:
                if isinstance(item, AnswerStats):
                    usage.update(AnswerUsage.of(item))
                else:
                    text.append(item)
                if cancel.is_set():
                    break
        finally:
            getattr(items, "close", lambda: None)()  # a cancelled answer's scratch KV is rolled back now
        fields = {"answer": "".join(text), "prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens}
    return FleetAnswer(stream_id=sid, mode=request.mode, ms=(time.perf_counter() - start) * 1000, **seen, **fields)


def fan_out(ids: list[str], one: Callable[[str], FleetAnswer], mode: FleetMode,
            cancel: threading.Event) -> Iterator[FleetAnswer]:
    """``one(stream_id)`` for every id at once, one thread each; yields the answers as they finish (an exception is
    that stream's error answer). Closing the iterator sets ``cancel`` (text answers stop at their next piece)."""
    start = time.perf_counter()
    results: queue.SimpleQueue[FleetAnswer] = queue.SimpleQueue()

    def run(sid: str) -> None:
        try:
            results.put(one(sid))
        except BaseException as exc:  # noqa: BLE001 - every stream gets an answer, its error if need be
            results.put(failed_answer(sid, mode, exc, start))

    for sid in ids:
        threading.Thread(target=run, args=(sid,), name="stc-fleet", daemon=True).start()
    try:
        for _ in ids:
            yield results.get()
    finally:
        cancel.set()


class FleetGate:
    """Counts the fleet requests one ingress replica runs at once; past ``limit`` a new one gets 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    def acquire(self) -> Callable[[], None]:
        """Take a slot; returns its release (idempotent). Raises :class:`TooManyRequestsError` when full."""
        with self._lock:
            if self._open >= self.limit:
                raise TooManyRequestsError(
                    f"{self._open} fleet questions or moment searches are running on this service replica, its "
                    f"maximum (serve.fleet.max_concurrent={self.limit}). Fix: retry after the Retry-After seconds.")
            self._open += 1
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                with self._lock:
                    self._open -= 1

        return release
