"""One stream's flow through the model stages, written once for every transport.

:class:`StageFlow` is the only place that says how a stream uses the stages: open vision then LLM (rolling the
vision state back when the LLM open fails), encode then append each chunk, rebuild one stage's state cold under a
new incarnation token when its replica lost it (counted in ``resets``; the frames that state held are counted in
``frames_lost``), and close both. A :class:`StageTransport` only says how a call reaches a stage: direct calls on
the plain stage objects in-process (:class:`DirectTransport`), or Ray Serve handles in the service
(``serve.app.ServeTransport``). The in-process pipeline, the local HTTP backend and the Ray service all use it.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

from serve.api import StreamMisroutedError
from serve.routing import new_token
from stream.frames import FrameBatch

VISION, LLM = "vision", "llm"


class StageTransport(Protocol):
    """How one call reaches a stage: ``method(stream_id, token, *args)`` on the ``kind`` stage."""

    def call(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Any: ...


class DirectTransport:
    """In-process transport: calls a :class:`serve.stages.VisionStage` / :class:`serve.stages.LLMStage` directly.

    The stages of one process hold one incarnation per stream id, so the token is not needed to find the state.
    """

    def __init__(self, vision: Any, llm: Any) -> None:
        self.stages = {VISION: vision, LLM: llm}

    def call(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Any:
        stage = self.stages[kind]
        if method == "append":
            return stage.append(*args)
        if method == "close":
            try:
                stage.close(stream_id)
            except LookupError:  # StreamNotFoundError: never held or already closed
                return False
            return True
        return getattr(stage, method)(stream_id, *args)

    def ask(self, stream_id: str, token: str, question: str, max_new_tokens: int, **kw: Any) -> Iterator[str]:
        """The answer's pieces straight from the LLM stage."""
        return self.stages[LLM].ask(stream_id, question, max_new_tokens, **kw)


class StageFlow:
    """The model-side life of one stream (any number of streams may share a transport, one flow each).

    Args:
        transport: how calls reach the stages.
        token: the stream's incarnation base token (default: a fresh one).
    """

    def __init__(self, transport: StageTransport, token: str | None = None) -> None:
        self.transport = transport
        self.base = token or new_token()
        self.options: Any = None
        self.generation = {VISION: 0, LLM: 0}
        self.held_frames = {VISION: 0, LLM: 0}  # frames in each stage's current state
        self.replicas: dict[str, Any] = {}
        self.resets = 0
        self.frames_lost = 0

    def token(self, kind: str) -> str:
        """The incarnation token of this stream's state on the ``kind`` stage."""
        return f"{self.base}:{kind[0]}{self.generation[kind]}"

    def open(self, stream_id: str, options: Any) -> None:
        """Open the vision state, then the LLM state; on failure nothing stays open."""
        self.options = options
        self.replicas[VISION] = self._raw(VISION, "open", stream_id, options)
        try:
            self.replicas[LLM] = self._raw(LLM, "open", stream_id, options)
        except BaseException:
            self._close_quietly(VISION, stream_id)
            raise

    def encode_append(self, stream_id: str, batch: FrameBatch) -> dict[str, Any]:
        """Encode one chunk, prefill it into the LLM state; returns the stages' numbers for this chunk."""
        chunk, llm = self.encode_append_chunk(stream_id, batch)
        return {"vision": chunk.stats, "llm": llm}

    def encode_append_chunk(self, stream_id: str, batch: FrameBatch) -> tuple[Any, dict[str, Any]]:
        """:meth:`encode_append` that also returns the :class:`serve.messages.EncodedChunk`."""
        chunk = self.call(VISION, "encode", stream_id, batch)
        self.held_frames[VISION] += len(batch)
        llm = self.call(LLM, "append", stream_id, chunk) or {}
        self.held_frames[LLM] += len(batch)
        return chunk, llm

    def call(self, kind: str, method: str, stream_id: str, *args: Any) -> Any:
        """A call on the stream's state; when its replica lost it, reopen it cold once and retry."""
        try:
            return self._raw(kind, method, stream_id, *args)
        except StreamMisroutedError:
            self.reopen(kind, stream_id)
            return self._raw(kind, method, stream_id, *args)

    def reopen(self, kind: str, stream_id: str) -> None:
        """Rebuild the ``kind`` state cold under a new token; the old incarnation is freed wherever it still is."""
        self._close_quietly(kind, stream_id)
        self.generation[kind] += 1
        self.frames_lost += self.held_frames[kind]
        self.held_frames[kind] = 0
        self.replicas[kind] = self._raw(kind, "open", stream_id, self.options)
        self.resets += 1

    def close(self, stream_id: str) -> None:
        """Free both stages' state (idempotent, quiet when a stage no longer holds it)."""
        for kind in (VISION, LLM):
            self._close_quietly(kind, stream_id)

    def _raw(self, kind: str, method: str, stream_id: str, *args: Any) -> Any:
        return self.transport.call(kind, method, stream_id, self.token(kind), *args)

    def _close_quietly(self, kind: str, stream_id: str) -> None:
        try:
            self._raw(kind, "close", stream_id)
        except (StreamMisroutedError, LookupError):
            pass  # nothing held for it (any more)
