"""Read-only reports of a stream's KV session and of one question's prompt."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cache.memory import MemoryReport


@dataclass(frozen=True)
class RetrievedBlock:
    """An offloaded block brought back for the last question."""

    block_id: int
    score: float
    tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptUsage:
    """What one question's prompt was, filled by the session when it prefills the question (exact counts).

    ``context_tokens``: KV tokens the question attended to (prefix/sinks + retrieved blocks + the window, i.e. the
    resident cache right before the question); ``question_tokens``: the tokens the question added (the family's
    end-of-video piece, the question text and the assistant-turn start). ``prompt_tokens`` is their sum.
    """

    context_tokens: int = 0
    question_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + self.question_tokens


@dataclass(frozen=True)
class SessionStats:
    """One stream's KV state. Token counts are KV-cache tokens; bytes include offloaded CPU storage.

    ``reserved_bytes`` is allocated at open and constant (attention buffer + canonical sinks); ``used_bytes`` is
    what the stream's tokens actually fill (resident tokens + offloaded blocks + index). ``memory``: device and host
    bytes by component, measured on the tensors held (:class:`cache.memory.MemoryReport`).
    """

    stream_id: str
    policy: str
    stream_tokens: int
    blocks: int
    resident_tokens: int
    peak_resident_tokens: int
    budget_tokens: int
    sink_tokens: int
    window_blocks: int
    window_used_tokens: int
    evicted_blocks: int
    offloaded_blocks: int
    offloaded_tokens: int
    offloaded_bytes: int
    dropped_blocks: int
    reserved_bytes: int
    resident_used_bytes: int
    next_position: int
    position_offset: int
    rebases: int
    last_retrieval: tuple[RetrievedBlock, ...] = ()
    memory: MemoryReport = MemoryReport()

    @property
    def held_bytes(self) -> int:
        """Bytes this stream holds: reservation + offloaded storage."""
        return self.reserved_bytes + self.offloaded_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes its tokens fill: resident tokens + offloaded storage."""
        return self.resident_used_bytes + self.offloaded_bytes


@dataclass(frozen=True)
class BlockInfo:
    """One block of a stream's retained history (resident in the window, or offloaded), in stream order.

    ``pts_start`` / ``pts_end``: the first and last frame time of the block's chunk (the block's ``meta["pts"]``;
    ``None`` when the caller gave none). Every part of a chunk appended as several blocks carries the chunk's times.
    """

    block_id: int
    tokens: int
    pts_start: float | None
    pts_end: float | None
    offloaded: bool

    def overlaps(self, since: float | None, until: float | None) -> bool:
        """The block's time range meets ``[since, until]`` (no bound given: always; no times known: only then)."""
        if since is None and until is None:
            return True
        if self.pts_start is None or self.pts_end is None:
            return False
        return (since is None or self.pts_end >= since) and (until is None or self.pts_start <= until)


@dataclass(frozen=True)
class BlockScore:
    """A block with its score for one query: the retrieval score (inner product of the question's probe vector and
    the block's key summary), or the probability of each choice as the first answer token with only the sinks and
    this block as context (``choices``; ``score`` is then the first choice's share of all of them)."""

    block: BlockInfo
    score: float | None
    choices: tuple[float, ...] = ()
