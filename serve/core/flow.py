"""One stream's life on the model stages, written once for every transport: open -> encode -> append -> ask -> close.

:class:`StageFlow` is the only place that says how a stream uses the stages: open vision then LLM (rolling the
vision state back when the LLM open fails), encode then append each chunk, ask a question (the answer streams as
:data:`serve.core.messages.AnswerItem` s) or score choices over the context, and close both. It is also the one
misroute policy: when a stage's replica no longer holds the stream's state (:class:`StreamMisroutedError`, after the
transport's own retries), the flow rebuilds that state cold under a new incarnation token and retries once (counted
in ``resets``; the frames that state held are counted in ``frames_lost``).

Recovery is serialized: when several threads of one stream (its ingest sender, users' questions, watches) meet the
same lost state at once, the first rebuilds it and the others retry with the new token, so a stream is reset once
per loss and no thread closes the state another just opened. What cannot be recovered now -- the replacement
replica is not up yet, or the state was rebuilt under a question in flight -- is a
:class:`serve.core.api.ServiceUnavailableError` (503 with Retry-After), never a 404, 409 or 500.

When a stream stops by itself its model state goes at once (:meth:`StageFlow.finish`): an ended file keeps only its
LLM context (questions about it still work), a failed stream keeps nothing; their last counters stay readable.

A :class:`StageTransport` only says how a call reaches a stage: direct calls on the plain stage objects in-process
(:class:`DirectTransport`), or Ray Serve handles in the service (``serve.deploy.hosts.ServeTransport``). The
in-process pipeline, the local HTTP backend and the Ray service all run this class.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Iterator, Protocol, TypeVar

from cache.kv.config import Sampling
from serve.core.api import ServiceUnavailableError, StreamMisroutedError, StreamStateError
from serve.core.messages import AnswerItem, EncodedChunk
from serve.core.options import StreamOptions
from serve.core.slots import new_token
from serve.core.stats import AppendStats, ChunkResult, KVStats, VisionStats
from stream.frames import FrameBatch

VISION, LLM = "vision", "llm"
T = TypeVar("T")


class StageTransport(Protocol):
    """How one call reaches a stage: ``method(stream_id, token, *args)`` on the ``kind`` stage.

    A transport retries while the stream's replica is not (yet) known to it, then raises
    :class:`StreamMisroutedError`; what to do then is the flow's decision, not the transport's.
    """

    def call(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Any:
        """One blocking call; returns its result."""
        ...

    def stream(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Iterator[Any]:
        """A streaming call: an iterator over its items, started (a misroute raises here, not mid-answer)."""
        ...


def started(items: Iterator[T]) -> Iterator[T]:
    """``items`` with its first item already fetched (so errors before the first item raise now)."""
    try:
        first = next(items)
    except StopIteration:
        return iter(())
    return itertools.chain([first], items)


class DirectTransport:
    """In-process transport: calls a :class:`serve.core.stages.VisionStage` / :class:`serve.core.stages.LLMStage`.

    The stages of one process hold one incarnation per stream id, so the token is not needed to find the state.
    """

    def __init__(self, vision: Any, llm: Any) -> None:
        self.stages = {VISION: vision, LLM: llm}

    def call(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Any:
        return getattr(self.stages[kind], method)(stream_id, *args)

    def stream(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Iterator[Any]:
        return started(iter(getattr(self.stages[kind], method)(stream_id, *args)))


class StageFlow:
    """The model-side life of one stream (any number of streams may share a transport, one flow each).

    Args:
        transport: how calls reach the stages.
        token: the stream's incarnation base token (default: a fresh one).
    """

    def __init__(self, transport: StageTransport, token: str | None = None) -> None:
        self.transport = transport
        self.base = token or new_token()
        self.options: StreamOptions | None = None
        self.generation = {VISION: 0, LLM: 0}
        self.held_frames = {VISION: 0, LLM: 0}  # frames in each stage's current state
        self.replicas: dict[str, str | None] = {}  # stage -> the replica holding the state (None in-process)
        self.resets = 0
        self.frames_lost = 0
        self.on_reopen: Callable[[], None] | None = None  # told after a stage's state was rebuilt (new token)
        self._reopen_locks = {VISION: threading.Lock(), LLM: threading.Lock()}
        self.released: dict[str, VisionStats | KVStats | None] = {}  # stage -> its last counters, once freed

    def token(self, kind: str) -> str:
        """The incarnation token of this stream's state on the ``kind`` stage."""
        return f"{self.base}:{kind[0]}{self.generation[kind]}"

    # -- the life of a stream ----------------------------------------------------------------------------------------
    def open(self, stream_id: str, options: StreamOptions | None) -> None:
        """Open the vision state, then the LLM state; on failure nothing stays open.

        Raises:
            ServiceUnavailableError: a stage's replica is gone and its replacement not yet up (503).
        """
        self.options = options
        try:
            self.replicas[VISION] = self._raw(VISION, "open", stream_id, options)
        except StreamMisroutedError as exc:
            raise _unavailable(VISION, stream_id, exc) from None
        try:
            self.replicas[LLM] = self._raw(LLM, "open", stream_id, options)
        except BaseException as exc:
            self._close_quietly(VISION, stream_id)
            if isinstance(exc, StreamMisroutedError):
                raise _unavailable(LLM, stream_id, exc) from None
            raise

    def encode_append(self, stream_id: str, batch: FrameBatch) -> ChunkResult:
        """Encode one chunk, prefill it into the LLM state; returns both stages' numbers for this chunk."""
        return self.encode_append_chunk(stream_id, batch)[1]

    def encode_append_chunk(self, stream_id: str, batch: FrameBatch) -> tuple[EncodedChunk, ChunkResult]:
        """:meth:`encode_append` that also returns the :class:`serve.core.messages.EncodedChunk`."""
        chunk: EncodedChunk = self.call(VISION, "encode", stream_id, batch)
        self.held_frames[VISION] += len(batch)
        appended: AppendStats = self.call(LLM, "append", stream_id, chunk)
        self.held_frames[LLM] += len(batch)
        return chunk, ChunkResult(vision=chunk.stats, llm=appended)

    def ask(self, stream_id: str, question: str, max_new_tokens: int,
            sampling: Sampling | None = None) -> Iterator[AnswerItem]:
        """The answer over the stream's current context: text pieces and :class:`AnswerStats` snapshots.

        Raises (also mid-answer):
            ServiceUnavailableError: the LLM state was lost and is being rebuilt, or was rebuilt under this answer.
        """
        generation = self.generation[LLM]
        try:
            items = self._recovering(LLM, stream_id, lambda: self.transport.stream(
                LLM, "ask", stream_id, self.token(LLM), question, max_new_tokens, sampling))
        except LookupError as exc:  # the state this question reached was closed by a concurrent rebuild
            raise self._lost_under(stream_id, generation, exc) from None
        return self._guarded(stream_id, items, generation)

    def _guarded(self, stream_id: str, items: Iterator[AnswerItem], generation: int) -> Iterator[AnswerItem]:
        try:
            yield from items
        except (StreamMisroutedError, LookupError) as exc:  # the replica died, or the state was rebuilt meanwhile
            raise self._lost_under(stream_id, generation, exc) from None

    def _lost_under(self, stream_id: str, generation: int, exc: BaseException) -> BaseException:
        if isinstance(exc, StreamMisroutedError) or self.generation[LLM] != generation:
            return _unavailable(LLM, stream_id, exc)
        return exc

    def score_choices(self, stream_id: str, question: str, choices: list[str]) -> list[float]:
        """Next-token probability of each choice over the stream's context (yes/no watches)."""
        return self.call(LLM, "score_choices", stream_id, question, choices)

    def close(self, stream_id: str) -> None:
        """Free both stages' state (idempotent, quiet when a stage no longer holds it)."""
        for kind in (VISION, LLM):
            if kind not in self.released:
                self._close_quietly(kind, stream_id)

    def finish(self, stream_id: str, state: str) -> None:
        """The stream stopped by itself: free what it no longer needs now, keeping the stages' last counters.

        ``ended`` (a file read to its end) frees the vision state (no frame will come) and keeps the LLM context for
        questions; ``failed`` frees both.
        """
        for kind in (VISION,) if state == "ended" else (VISION, LLM):
            if kind in self.released:
                continue
            try:
                self.released[kind] = self._raw(kind, "stats", stream_id)
            except Exception:  # noqa: BLE001 - the counters are best effort; freeing the state is not
                self.released[kind] = None
            self._close_quietly(kind, stream_id)

    # -- numbers (best effort: never rebuilds state) -----------------------------------------------------------------
    def stage_stats(self, stream_id: str) -> tuple[VisionStats | None, KVStats | None, dict[str, str]]:
        """Both stages' counters for the stream, and why a stage gave none (its replica lost the stream...)."""
        out: dict[str, VisionStats | KVStats | None] = {}
        errors: dict[str, str] = {}
        for kind in (VISION, LLM):
            if kind in self.released:  # freed when the stream stopped: its last counters
                out[kind] = self.released[kind]
                continue
            try:
                out[kind] = self._raw(kind, "stats", stream_id)
            except Exception as exc:  # noqa: BLE001 - stats are best effort; the reason is reported
                out[kind], errors[kind] = None, f"{type(exc).__name__}: {exc}"
        return out[VISION], out[LLM], errors

    # -- the misroute policy -----------------------------------------------------------------------------------------
    def call(self, kind: str, method: str, stream_id: str, *args: Any) -> Any:
        """A call on the stream's state; when its replica lost it, reopen it cold once and retry."""
        return self._recovering(kind, stream_id, lambda: self._raw(kind, method, stream_id, *args))

    def _recovering(self, kind: str, stream_id: str, attempt: Callable[[], T]) -> T:
        """``attempt()``; when its replica lost the state: rebuild it once (or join a rebuild in progress), retry.

        Raises:
            ServiceUnavailableError: the state could not be rebuilt now, or the retry was misrouted again (503).
        """
        if kind in self.released:  # freed when the stream stopped: never rebuilt behind its back
            raise StreamStateError(f"stream {stream_id!r} has stopped and its {kind} state was freed. Fix: open a new "
                                   "stream.")
        seen = self.token(kind)
        try:
            return attempt()
        except StreamMisroutedError:
            pass
        try:
            self.reopen(kind, stream_id, seen)
        except Exception as exc:  # noqa: BLE001 - whatever stops the rebuild, the stream is in recovery
            raise _unavailable(kind, stream_id, exc) from None
        try:
            return attempt()
        except StreamMisroutedError as exc:
            raise _unavailable(kind, stream_id, exc) from None

    def reopen(self, kind: str, stream_id: str, seen: str | None = None) -> None:
        """Rebuild the ``kind`` state cold under a new token; the old incarnation is freed wherever it still is.

        One rebuild at a time per stage; with ``seen`` (the token a caller found lost), nothing is done when another
        thread rebuilt the state since (the caller just retries with the new token).
        """
        with self._reopen_locks[kind]:
            if seen is not None and self.token(kind) != seen:
                return
            self._close_quietly(kind, stream_id)
            self.generation[kind] += 1  # a failed open leaves a token no replica holds: the next call retries
            self.frames_lost += self.held_frames[kind]
            self.held_frames[kind] = 0
            self.replicas[kind] = self._raw(kind, "open", stream_id, self.options)
            self.resets += 1
        if self.on_reopen is not None:
            self.on_reopen()

    def _raw(self, kind: str, method: str, stream_id: str, *args: Any) -> Any:
        return self.transport.call(kind, method, stream_id, self.token(kind), *args)

    def _close_quietly(self, kind: str, stream_id: str) -> None:
        try:
            self._raw(kind, "close", stream_id)
        except (StreamMisroutedError, LookupError, ServiceUnavailableError):
            pass  # nothing held for it (any more), or its replica is gone with it


def _unavailable(kind: str, stream_id: str, cause: BaseException) -> ServiceUnavailableError:
    """The 503 a caller gets while the stream's ``kind`` state is being rebuilt on a replacement replica."""
    return ServiceUnavailableError(
        f"the {kind} replica holding stream {stream_id!r} was lost and its state is being rebuilt cold on another "
        f"replica ({type(cause).__name__}: {str(cause)[:160]}). The stream carries on (its state_resets count "
        f"it). Fix: retry after {ServiceUnavailableError.retry_after_s:g} s."
    )
