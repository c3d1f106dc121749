"""One stream's life as a plain object: :class:`StreamRunner` (source, ingest threads, the stream's flow), and the
checks and defaults every backend applies when a stream is created.

:class:`StreamRunner` owns a stream's source and :class:`serve.core.ingest.IngestWorker`, and reaches the model
stages through its :class:`serve.core.flow.StageFlow`: chunks go ``flow.encode_append``, questions ``flow.ask``. An
:class:`serve.core.hosts.IngestHost` holds many runners (in-process behind :class:`serve.core.local.LocalBackend`,
as a Ray actor in the service), so the stream's life is the same code everywhere.
"""
from __future__ import annotations

import functools
import os
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from serve.core.api import (
    CreateStreamRequest,
    ForbiddenSourceError,
    PushResponse,
    QuestionRequest,
    StreamStateError,
    StreamStats,
)
from serve.core.flow import StageFlow
from serve.core.ingest import ChunkQueue, IngestWorker, queue_policy, stream_kind
from serve.core.messages import AnswerItem
from serve.core.options import StreamOptions
from serve.core.protocol import FrameFormatError
from serve.core.settings import IngestSettings, ServeSettings, TimelineSettings
from serve.core.sources_policy import check_source_text, check_url_source
from serve.core.stats import ChunkResult, KVStats, VisionStats
from serve.core.timeline import StreamTimeline
from stream.config import SourceConfig
from stream.errors import SourceError, SourceNotFoundError
from stream.frames import FrameBatch
from stream.sampler import FrameChunker
from stream.sources import MemorySource, open_source


def resolve_source(spec: str | None, settings: ServeSettings) -> str:
    """The checked source spec for :func:`stream.sources.open_source` (``"memory://"`` for a pushed stream).

    Raises:
        ForbiddenSourceError: scheme or host not allowed (:mod:`serve.core.sources_policy`), file sources disabled, or
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


class StreamRunner:
    """One stream: its source, ingest threads and stage state, plus what :class:`StreamStats` reports.

    Args:
        stream_id: the stream's id.
        source_spec: the request's source (``None`` for a pushed stream), reported back as is.
        resolved: the checked spec (:func:`resolve_source`).
        options: the stream's options.
        source_config: how sources are opened (timeouts, reconnects, queue size).
        ingest: chunk queue size and drop policy.
        flow: the stream's life on the model stages (over the backend's transport).
        labels: the stream's labels (selected by fleet questions).
        timeline: bounds of the thumbnails and moments the stream keeps.
    """

    def __init__(self, stream_id: str, source_spec: str | None, resolved: str, options: StreamOptions,
                 source_config: SourceConfig, ingest: IngestSettings, flow: StageFlow,
                 labels: dict[str, str] | None = None, timeline: TimelineSettings | None = None) -> None:
        self.stream_id = stream_id
        self.labels = dict(labels or {})
        self.timeline = StreamTimeline(stream_id, timeline)
        self.source_spec = source_spec
        self.resolved = resolved
        self.options = options
        self.source_config = source_config
        self.ingest = ingest
        self.flow = flow
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
            self.flow.open(self.stream_id, self.options)
        except BaseException:
            source.close()
            raise
        queue = ChunkQueue(self.ingest.queue_chunks, queue_policy(self.kind, self.ingest.drop_policy))
        # the sink holds the flow and the timeline, not this runner: runner -> worker -> sink -> runner would be a
        # reference cycle, and a closed stream's frames would wait for a full garbage collection
        sink = functools.partial(_encode_and_keep, self.flow, self.timeline, self.stream_id)
        self.worker = IngestWorker(self.stream_id, source, sink,
                                   FrameChunker.of(self.options.sampler), queue,
                                   functools.partial(self.flow.finish, self.stream_id))
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
        return PushResponse(stream_id=self.stream_id, accepted=accepted, frames_in=st.frames_in,
                            frames_dropped=st.frames_dropped)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every chunk queued so far reached the LLM; ``False`` on timeout."""
        return self._worker().wait_idle(timeout_s)

    def check_answerable(self) -> None:
        """Raise :class:`StreamStateError` (409) when the stream failed: its model state is freed."""
        worker = self._worker()
        if worker.state == "failed":
            raise StreamStateError(f"stream {self.stream_id!r} failed: {worker.error}. Its model state is freed. Fix: "
                                   "DELETE it and create it again.")

    def ask(self, request: QuestionRequest) -> Iterator[AnswerItem]:
        """Answer over what the stream showed so far (after waiting up to ``request.wait_s`` for the frames received
        to reach the LLM): text pieces and :class:`serve.core.messages.AnswerStats` snapshots."""
        self.check_answerable()
        if request.wait_s > 0:
            self.wait_idle(request.wait_s)
        self.questions += 1
        return self.flow.ask(self.stream_id, request.question, request.max_new_tokens, request.sampling())

    def stats(self, stages: bool = False) -> StreamStats:
        """The stream's stats; with ``stages`` also the stages' own counters (best effort: a stage that lost the
        stream reports why in ``stage_errors``)."""
        worker = self._worker()
        ingest = worker.stats().model_copy(update={"state_resets": self.flow.resets,
                                                   "frames_lost": self.flow.frames_lost})
        vision, llm, errors = self.flow.stage_stats(self.stream_id) if stages else (None, None, {})
        return StreamStats(
            stream_id=self.stream_id, kind=self.kind, source=self.source_spec, state=worker.state,
            labels=self.labels, error=worker.error, created_at=self.created_at, questions=self.questions, ingest=ingest,
            **headline(vision, llm), vision=vision, llm=llm, stage_errors=errors,
        )

    def close(self) -> None:
        """Stop ingest and free the stage state (idempotent)."""
        if self.worker is not None:
            self.worker.close()
        self.timeline.clear()
        self.flow.close(self.stream_id)

    def _worker(self) -> IngestWorker:
        if self.worker is None:
            raise StreamStateError(f"stream {self.stream_id!r} has not started. Fix: wait for POST /streams to return.")
        return self.worker


def _encode_and_keep(flow: StageFlow, timeline: StreamTimeline, stream_id: str, batch: FrameBatch) -> ChunkResult:
    """The ingest sink: encode and append the chunk, then keep its thumbnail (only chunks that reached the LLM; a
    thumbnail that cannot be made is counted, never a reason to fail the stream)."""
    result = flow.encode_append(stream_id, batch)
    try:
        timeline.add_chunk(batch)
    except Exception:  # noqa: BLE001 - the timeline is best effort, the stream is not
        timeline.thumbnail_errors += 1
    return result


def _renumber(batch: FrameBatch, worker: IngestWorker) -> FrameBatch:
    """Pushed frames get stream-wide indices (the wire format carries none)."""
    start = worker.source.stats().get("pushed", 0)
    return FrameBatch(rgb=batch.rgb, pts=batch.pts, indices=batch.indices + start)


def headline(vision: VisionStats | None, llm: KVStats | None) -> dict[str, Any]:
    """The headline numbers of a stream (cache reuse, tokens kept, KV size) out of the stages' counters."""
    return {
        "cache_reuse": vision.cache.reuse_rate if vision is not None and vision.cache is not None else None,
        "tokens_kept": vision.tokens_kept if vision is not None else None,
        "tokens_total": vision.tokens_in if vision is not None else None,
        "kv_tokens": llm.kv_tokens if llm is not None else None,
        "kv_bytes": llm.kv_bytes if llm is not None else None,
    }


@dataclass(frozen=True)
class StreamPlan:
    """A checked create-stream request: what a host needs to open the stream (the backend -> host message)."""

    stream_id: str
    source: str | None  # as the request wrote it (reported back)
    resolved: str  # the checked spec for open_source ("memory://" for a pushed stream)
    options: StreamOptions
    labels: dict[str, str] = field(default_factory=dict)


def plan_stream(request: CreateStreamRequest, settings: ServeSettings, defaults: StreamOptions) -> StreamPlan:
    """Check the source, resolve the stream's options, pick its id (every backend runs this before a host opens it).

    The options are the config defaults, then the request's ``options``, ``fps`` and ``frames_per_chunk``.
    """
    resolved = resolve_source(request.source, settings)
    overrides: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in request.options.items()}
    sampler = dict(overrides.get("sampler") or {})
    if request.fps is not None:
        sampler["fps"] = request.fps
    if request.frames_per_chunk is not None:
        sampler["frames_per_chunk"] = request.frames_per_chunk
    if sampler:
        overrides["sampler"] = sampler
    return StreamPlan(request.stream_id or uuid.uuid4().hex[:12], request.source, resolved, defaults.merged(overrides),
                      dict(request.labels))
