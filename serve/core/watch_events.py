"""A stream's watch events as plain objects: :class:`WatchEvent`, a reader's :class:`EventsPage`, and the bounded,
thread-safe :class:`EventRing` that holds one stream's recent events (readers wait on it for events after a sequence
number). :mod:`serve.core.watchset` produces them; the HTTP layer relays them as server-sent events.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class WatchEvent(BaseModel):
    """One event of a stream's watches: a tick's ``answer``, an ``alert`` (yes/no), or the ``end`` of its watches."""

    model_config = ConfigDict(extra="forbid")
    seq: int = Field(..., description="Increasing per stream (readers poll for events after it).")
    time: float = Field(..., description="Unix time of the event.")
    type: Literal["answer", "alert", "end"]
    stream_id: str
    watch_id: str | None = None
    question: str | None = None
    pts: float | None = Field(None, description="Presentation time of the newest frame the answer saw (s).")
    frame_index: int | None = Field(None, description="Index of that frame among the stream's encoded frames.")
    answer: str | None = Field(None, description="text mode: the answer.")
    score: float | None = Field(None, description="yes_no mode: P(yes) / (P(yes) + P(no)).")
    threshold: float | None = Field(None, description="alert: the watch's threshold.")
    reason: str | None = Field(None, description="end: why (closed, reaped, ended, failed, gone).")
    watches_stopped: int | None = Field(None, description="end: how many watches stopped.")

    def body(self) -> dict[str, Any]:
        """The event as JSON-ready fields (those it was made with: SSE data, webhook body)."""
        return self.model_dump(exclude_unset=True)


class EventsPage(BaseModel):
    """A stream's events after a sequence number (one poll)."""

    stream_id: str
    events: list[WatchEvent] = Field(default_factory=list, description="Oldest first.")
    last_seq: int = Field(0, description="Sequence number of the newest event so far (poll again after it).")
    ended: bool = Field(False, description="The stream's watches ended; the last event says why.")
    waited: bool = Field(False, description="The call long-polled (False: answered at once, waiters were full).")


class EventRing:
    """One stream's bounded event history; thread-safe; readers can wait for events after a sequence number.

    Text answers are also kept apart in ``captions`` (at most ``captions`` of them), the stream's caption track: a
    fast yes/no watch's ticks never push them out of it.
    """

    def __init__(self, size: int, captions: int = 0) -> None:
        self.ring: collections.deque[WatchEvent] = collections.deque(maxlen=size)  # at most ``size`` events
        self.captions: collections.deque[WatchEvent] = collections.deque(maxlen=captions)  # text answers
        self.seq = 0
        self.ended_at: float | None = None
        self.cond = threading.Condition()

    def add(self, event: dict[str, Any]) -> WatchEvent | None:
        """Append (with the next ``seq`` and the time); ignored once the ring ended."""
        with self.cond:
            if self.ended_at is not None:
                return None
            self.seq += 1
            made = WatchEvent(seq=self.seq, time=time.time(), **event)
            self.ring.append(made)
            if made.type == "answer" and made.answer is not None and self.captions.maxlen:
                self.captions.append(made)
            self.cond.notify_all()
            return made

    def end(self, event: dict[str, Any]) -> bool:
        """Append the last event and close the ring; False if it had ended already."""
        with self.cond:
            if self.ended_at is not None:
                return False
            self.seq += 1
            self.ring.append(WatchEvent(seq=self.seq, time=time.time(), **event))
            self.ended_at = time.monotonic()
            self.cond.notify_all()
            return True

    def since(self, seq: int) -> list[WatchEvent]:
        with self.cond:
            return [e for e in self.ring if e.seq > seq]

    def history(self) -> tuple[list[WatchEvent], list[WatchEvent]]:
        """Copies of the kept events and of the caption track."""
        with self.cond:
            return list(self.ring), list(self.captions)

    def wait(self, seq: int, timeout_s: float) -> None:
        """Block until an event after ``seq`` exists, the ring ended, or ``timeout_s`` passed."""
        with self.cond:
            self.cond.wait_for(lambda: self.seq > seq or self.ended_at is not None, timeout=timeout_s)
