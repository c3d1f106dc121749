"""Stream affinity, the Ray-free part: where a stream id lives, and which stream incarnations a replica holds.

* :func:`rendezvous_pick` -- pure function: the replica a stream id maps to among the live replicas (highest random
  weight hashing: removing a replica moves only its own streams, adding one moves about 1/n of them). The Ray Serve
  request router (:class:`serve.deploy.routing.StreamAffinityRouter`) and the ingest host choice both use it.
* :class:`StreamSlots` -- plain class kept by each stateful replica: which stream incarnations it holds, capacity,
  and idle times for TTL reaping. A call for a stream it does not hold, or for an other incarnation of that id,
  is refused (:class:`StreamMisroutedError`) and never creates or reads state.
* :class:`SlottedStage` -- what a stateful replica runs: a stage behind its slots. Opening and closing one stream id
  are serialized, and an open frees whatever state the stage still holds under that id (an earlier incarnation
  whose close went to another replica, or is still in progress), so a new stream with an old id is never refused.

Each stream incarnation carries a token (``<random>:<resets>``): a new stream with an old id, or a cold reopen
after a lost replica, gets a new token, so state of an earlier incarnation is never adopted.
"""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from typing import Any, Callable, Iterable

from serve.core.api import CapacityError, StreamMisroutedError

__all__ = ["SlottedStage", "StreamSlots", "new_token", "rendezvous_pick", "routing_key"]


def new_token() -> str:
    """A fresh incarnation token for a new stream (its resets are appended as ``:<n>``)."""
    return uuid.uuid4().hex[:16]


def _weight(key: str, member: str) -> int:
    # hashlib, not hash(): Python's str hash is salted per process and every caller must agree
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{member}".encode(), digest_size=8).digest(), "big")


def rendezvous_pick(key: str, members: Iterable[str]) -> str:
    """The member with the highest hash weight for ``key`` (every process computes the same answer).

    Raises:
        ValueError: ``members`` is empty.
    """
    ranked = sorted(members, key=lambda m: (_weight(key, m), m), reverse=True)
    if not ranked:
        raise ValueError(f"no members to place {key!r} on")
    return ranked[0]


def routing_key(args: list[Any] | tuple[Any, ...]) -> str | None:
    """The stream id a call is routed by: its first positional argument when that is a string."""
    return args[0] if args and isinstance(args[0], str) else None


class StreamSlots:
    """The stream incarnations one replica holds (thread-safe).

    Args:
        kind: ``"vision"`` or ``"llm"`` (for messages).
        replica: this replica's id (for messages).
        max_streams: capacity.
    """

    def __init__(self, kind: str, replica: str, max_streams: int) -> None:
        self.kind, self.replica, self.max_streams = kind, replica, max_streams
        self._held: dict[str, tuple[str, float]] = {}  # stream id -> (token, last use, monotonic s)
        self._lock = threading.Lock()

    def claim(self, stream_id: str, token: str) -> tuple[bool, str | None]:
        """Reserve a slot for ``(stream_id, token)``.

        Returns:
            ``(new, stale)``: ``new`` is False when this incarnation is held already (open is idempotent);
            ``stale`` is the token of an earlier incarnation of the id that the caller must free first.

        Raises:
            CapacityError: the replica holds ``max_streams`` other streams (429).
        """
        with self._lock:
            held = self._held.get(stream_id)
            if held is not None and held[0] == token:
                self._held[stream_id] = (token, time.monotonic())
                return False, None
            if held is None and len(self._held) >= self.max_streams:
                raise CapacityError(
                    f"{self.kind} replica {self.replica} holds its maximum of {self.max_streams} streams. Fix: close "
                    "streams, add replicas, or raise serve.max_streams_per_replica."
                )
            self._held[stream_id] = (token, time.monotonic())
            return True, held[0] if held is not None else None

    def release(self, stream_id: str, token: str | None = None) -> bool:
        """Drop the slot (only of incarnation ``token`` when given); True when something was dropped."""
        with self._lock:
            held = self._held.get(stream_id)
            if held is None or (token is not None and held[0] != token):
                return False
            del self._held[stream_id]
            return True

    def require(self, stream_id: str, token: str) -> None:
        """Refuse a call for a stream incarnation this replica does not hold; marks the slot used."""
        with self._lock:
            held = self._held.get(stream_id)
            if held is not None and held[0] == token:
                self._held[stream_id] = (token, time.monotonic())
                return
        what = "holds no state for" if held is None else f"holds another incarnation ({held[0]}) of"
        raise StreamMisroutedError(
            f"{self.kind} replica {self.replica} {what} stream {stream_id!r} (incarnation {token}); it holds "
            f"{len(self._held)} streams"
        )

    def idle(self, ttl_s: float, now: float | None = None) -> list[tuple[str, str]]:
        """``(stream id, token)`` of slots unused for longer than ``ttl_s`` (to be reaped)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [(sid, tok) for sid, (tok, used) in self._held.items() if now - used > ttl_s]

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


class SlottedStage:
    """A stage (vision or LLM) behind the incarnation slots of one replica; thread-safe, Ray-free.

    Args:
        stage: the plain stage (``open/close/stats/...(stream_id, ...)``).
        slots: the replica's :class:`StreamSlots`.
        after_free: called after a stream's state was freed (e.g. give the heap back to the OS).
    """

    LOCKS = 64  # striped per-id locks: bounded, and open/close of one id never interleave

    def __init__(self, stage: Any, slots: StreamSlots, after_free: Callable[[], None] | None = None) -> None:
        self.stage, self.slots, self.after_free = stage, slots, after_free
        self._locks = [threading.Lock() for _ in range(self.LOCKS)]
        self.reaped = 0

    def _lock(self, stream_id: str) -> threading.Lock:
        return self._locks[_weight(stream_id, "lock") % self.LOCKS]

    def open(self, stream_id: str, token: str, options: Any) -> bool:
        """Create this incarnation's state (idempotent: False when it is held already)."""
        with self._lock(stream_id):
            new, stale = self.slots.claim(stream_id, token)
            if not new:
                return False
            if stale is not None or self._holds(stream_id):
                self._free(stream_id)  # an earlier incarnation's state under this id: it is no stream's now
            try:
                self.stage.open(stream_id, options)
            except BaseException:
                self.slots.release(stream_id, token)
                raise
            return True

    def close(self, stream_id: str, token: str) -> bool:
        """Free this incarnation's state; False when this replica does not hold it (nothing to do)."""
        with self._lock(stream_id):
            if not self.slots.release(stream_id, token):
                return False
            self._free(stream_id)
            return True

    def call(self, method: str, stream_id: str, token: str, *args: Any) -> Any:
        """``stage.method(stream_id, *args)`` for the incarnation this replica holds (else misrouted)."""
        self.slots.require(stream_id, token)
        return getattr(self.stage, method)(stream_id, *args)

    def reap(self, ttl_s: float) -> list[str]:
        """Free the state of streams unused for ``ttl_s`` (their stream died or was reopened elsewhere)."""
        gone = []
        for sid, token in self.slots.idle(ttl_s):
            if self.close(sid, token):
                gone.append(sid)
        self.reaped += len(gone)
        return gone

    def _holds(self, stream_id: str) -> bool:
        streams = getattr(self.stage, "streams", None)
        return callable(streams) and stream_id in streams()

    def _free(self, stream_id: str) -> None:
        try:
            self.stage.close(stream_id)
        except LookupError:
            pass
        if self.after_free is not None:
            self.after_free()
