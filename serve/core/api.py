"""Request and response models of the HTTP API (one place for the service's contract; shown in OpenAPI).

Requests reject unknown keys. Errors always have the shape of :class:`ErrorResponse`. Questions are answered as
server-sent events: ``event: token`` (``data: {"text": ...}``) for each piece, then one ``event: done``
(:class:`AnswerDone`) or ``event: error`` (:class:`ErrorBody`).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cache.kv.config import Sampling
from serve.core.stats import KVStats, VisionStats

STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MAX_LABELS, MAX_LABEL_VALUE = 16, 128
SEED_MAX = 2**63 - 1  # the sampler's RNG takes a 64-bit seed
StreamKind = Literal["file", "live", "push"]
StreamState = Literal["starting", "running", "ended", "failed", "closed"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateStreamRequest(_Request):
    """Open a stream: from a source URL/path, or (``source`` omitted) fed by pushed frames."""

    source: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="'rtsp://...', 'http(s)://...', or a file path relative to the media root. "
        "Omit it for a stream fed by POST /streams/{id}/frames.",
        examples=["rtsp://127.0.0.1:8554/cam", "vtest.avi"],
    )
    stream_id: str | None = Field(
        None, pattern=STREAM_ID_PATTERN, description="Choose the id (default: a random one). 409 if it exists."
    )
    fps: float | None = Field(None, gt=0, le=1000, description="Frames per second kept (default from the config).")
    frames_per_chunk: int | None = Field(None, ge=1, le=4096, description="Frames per encoder call (default: config).")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description=f"Up to {MAX_LABELS} labels (key: letters, digits, '_.-', up to 63 characters; value: up to "
        f"{MAX_LABEL_VALUE} printable characters) to select streams by (GET /streams?selector=, fleet questions).",
        examples=[{"site": "dock", "cam": "3"}],
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Per-stream overrides of the service config's `sampler`, `cacher` and `pruner` sections "
        "(e.g. pruner budget/policy, cache ratio); unknown keys are rejected. The `kv` section is the LLM "
        "replica's and cannot differ per stream.",
        examples=[{"pruner": {"tokens_per_frame": 49, "policy": "stc"}, "cacher": {"ratio": 0.25}}],
    )


    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        return check_labels(labels, "labels")


def check_labels(labels: dict[str, str], what: str) -> dict[str, str]:
    """Labels (or a selector) as allowed; raises ValueError naming the bad key or value, the rule and the fix."""
    import re  # noqa: PLC0415

    if len(labels) > MAX_LABELS:
        raise ValueError(f"{what} has {len(labels)} entries, at most {MAX_LABELS} are allowed. Fix: drop some")
    for key, value in labels.items():
        if not re.match(LABEL_KEY_PATTERN, key):
            raise ValueError(f"{what} key {key!r} is not allowed: use letters, digits and '_.-' (first a letter or "
                             "digit), up to 63 characters. Fix: rename it")
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            raise ValueError(f"{what}[{key!r}] = {value[:40]!r} is not allowed: up to {MAX_LABEL_VALUE} printable "
                             "characters. Fix: shorten it or drop control characters")
    return labels


def matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    """Every ``key: value`` of ``selector`` is one of ``labels`` (an empty selector matches every stream)."""
    return all(labels.get(k) == v for k, v in selector.items())


class QuestionRequest(_Request):
    """Ask about what the stream has shown so far."""

    question: str = Field(..., min_length=1, description="The question, in plain text.")
    max_new_tokens: int = Field(64, ge=1, description="Answer length limit in tokens.")
    wait_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="Wait up to this long for frames already received to reach the LLM before answering "
        "(0: answer about what the LLM holds now).",
    )
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy; > 0 = sample at this temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = all tokens).")
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description=f"RNG seed for reproducible sampling (0..{SEED_MAX}).")

    def sampling(self) -> Sampling:
        """The decoding settings for the LLM engine."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class IngestStats(BaseModel):
    """Counters of one stream's ingest actor (decode, sample, chunk, queue)."""

    frames_in: int = Field(0, description="Frames decoded or pushed.")
    frames_sampled: int = Field(0, description="Frames kept by the fps sampler.")
    frames_encoded: int = Field(0, description="Frames the encoder processed.")
    frames_dropped: int = Field(0, description="Frames dropped because the encoder lagged (both queues).")
    chunks_encoded: int = Field(0, description="Chunks sent through encoder and LLM.")
    chunks_dropped: int = Field(0, description="Whole chunks dropped from the chunk queue.")
    queued_chunks: int = Field(0, description="Chunks waiting for the encoder now.")
    reconnects: int = Field(0, description="Live-source reconnects that succeeded so far.")
    reconnect_attempts: int = Field(0, description="Live-source reconnect tries so far (failed or not).")
    state_resets: int = Field(0, description="Times the stream's model state was rebuilt cold (replica lost).")
    frames_lost: int = Field(0, description="Encoded frames whose model state was lost by those resets.")
    encode_ms_p50: float | None = Field(None, description="Median encoder+LLM time per chunk (ms).")
    last_pts: float | None = Field(None, description="Presentation time of the newest encoded frame (s).")


class StreamStats(BaseModel):
    """Everything known about one stream."""

    stream_id: str
    kind: StreamKind
    source: str | None
    state: StreamState
    labels: dict[str, str] = Field(default_factory=dict, description="The labels the stream was created with.")
    error: str | None = Field(None, description="Why the stream ended or failed, if it did.")
    created_at: float = Field(..., description="Unix time the stream was opened.")
    questions: int = Field(0, description="Questions answered.")
    ingest: IngestStats
    cache_reuse: float | None = Field(
        None, description="Share of frames whose ViT pass reused a cached reference (STC cacher, 0..1)."
    )
    tokens_kept: int | None = Field(None, description="Visual tokens kept by the pruner so far.")
    tokens_total: int | None = Field(None, description="Visual tokens before pruning so far.")
    kv_tokens: int | None = Field(None, description="Tokens held in the stream's KV cache now.")
    kv_bytes: int | None = Field(None, description="Bytes of the stream's KV cache now.")
    vision: VisionStats | None = Field(None, description="The vision stage's own counters (None: not available).")
    llm: KVStats | None = Field(None, description="The LLM stage's own counters: the stream's KV session.")
    stage_errors: dict[str, str] = Field(
        default_factory=dict, description="Why a stage reported no counters (e.g. its replica lost the stream).")


class StreamList(BaseModel):
    """All open streams."""

    streams: list[StreamStats]


class PushResponse(BaseModel):
    """Result of one pushed batch."""

    stream_id: str
    accepted: int = Field(..., description="Frames of this batch queued.")
    frames_in: int = Field(..., description="Frames pushed to this stream so far.")
    frames_dropped: int = Field(..., description="Frames this stream dropped so far (encoder lag).")


class AnswerUsage(BaseModel):
    """Exact token counts of one answer, from the LLM that ran it (sent with the answer, typed).

    For a live stream the prompt is what the question attended to: ``context_tokens`` (the KV tokens resident when
    the question was placed: prompt prefix/sinks, retrieved blocks and the recent window) plus ``question_tokens``
    (the tokens the question added: end-of-video piece, the question, the assistant-turn start). Frames evicted
    from the window before the question are not part of it.
    """

    context_tokens: int = Field(0, ge=0, description="KV tokens of the stream the question attended to.")
    question_tokens: int = Field(0, ge=0, description="Tokens the question added to the prompt.")
    completion_tokens: int | None = Field(None, ge=0, description="Tokens generated (None until the answer ended).")

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + self.question_tokens

    @classmethod
    def of(cls, stats: Any, done: bool = False) -> "AnswerUsage":
        """From a :class:`serve.core.messages.AnswerStats` (``completion_tokens`` only once the answer is done)."""
        return cls(context_tokens=stats.attended_tokens, question_tokens=stats.question_tokens,
                   completion_tokens=stats.new_tokens if done or stats.done else None)

    def update(self, other: "AnswerUsage") -> None:
        """Take ``other``'s counts (a later message of the same answer)."""
        self.context_tokens, self.question_tokens = other.context_tokens, other.question_tokens
        if other.completion_tokens is not None:
            self.completion_tokens = other.completion_tokens


class AnswerDone(BaseModel):
    """Last event of an answer."""

    answer: str
    tokens: int = Field(..., description="Tokens generated, counted by the LLM (equals completion_tokens; the text "
                        "pieces read when the LLM sent no count).")
    ttft_ms: float = Field(..., description="Time to the first piece, measured at the ingress.")
    total_ms: float
    prompt_tokens: int | None = Field(None, description="Context tokens attended + question tokens (exact).")
    completion_tokens: int | None = Field(None, description="Tokens generated, counted by the LLM.")


class ErrorBody(BaseModel):
    """What went wrong, and how to fix it."""

    type: str = Field(..., description="Error class, e.g. 'StreamNotFoundError'.")
    status: int = Field(..., description="HTTP status.")
    message: str = Field(..., description="The bad value, what is allowed, and the fix.")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer."""

    error: ErrorBody


class HealthResponse(BaseModel):
    """Liveness of the ingress and the model deployments."""

    status: Literal["ok", "degraded"]
    streams: int
    deployments: dict[str, str] = Field(default_factory=dict, description="Deployment name -> status.")
    parameter_bytes: dict[str, int] = Field(
        default_factory=dict, description="Deployment name -> model parameter bytes of the replica that answered."
    )


# ---- service errors (each carries its HTTP status; see stream.errors for the source family) ----
from stream.errors import RequestError, StcError, StreamExistsError, StreamNotFoundError  # noqa: E402,F401 (re-exported)


class UnauthorizedError(RequestError):
    """Missing or wrong API key."""

    status = 401


class ForbiddenSourceError(RequestError):
    """The source is not allowed: a file outside the media root, file sources disabled, or a URL scheme refused."""

    status = 403


class StreamStateError(RequestError):
    """The stream cannot take this request in its state (e.g. frames pushed to a file stream or a closed one)."""

    status = 409


class CapacityError(RequestError):
    """The service (or every replica) already holds its maximum number of streams."""

    status = 429


class TooManyRequestsError(RequestError):
    """Too many requests of this kind at once (event readers, streamed answers, concurrent pushes): retry later."""

    status = 429
    retry_after_s = 1.0


class ServiceUnavailableError(RequestError):
    """A replica the stream needs is being replaced; the stream's state is rebuilt cold. Not the caller's fault, and
    not permanent: the same request succeeds after ``retry_after_s``."""

    status = 503
    retry_after_s = 2.0


class StreamMisroutedError(StcError):
    """A request reached a replica that holds no state for its stream (router not yet updated, or replica lost).

    Not a client error: callers retry, then reopen the stream cold.
    """
