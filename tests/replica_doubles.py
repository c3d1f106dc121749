"""A set of stateful "replicas" in one process, reached like the Ray service reaches its vision/LLM replicas.

:class:`ReplicaSetTransport` is a :class:`serve.core.flow.StageTransport` over a few :class:`SlottedStage` replicas
per stage kind (each holding its own stage double and :class:`StreamSlots`), routed by rendezvous hashing of the
stream id over the router's *view* of the live replicas -- as ``StreamAffinityRouter`` does. Killing a replica
drops it and its state; a replacement with a new id comes up, and the router's view can be kept stale for a while,
so calls reach a dead replica (misrouted, like Ray's "replica gone"). The Ray service's replica-kill behaviour is
exercised here deterministically and in milliseconds.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Iterator

from serve.core.api import StreamMisroutedError
from serve.core.flow import LLM, VISION, started
from serve.core.slots import SlottedStage, StreamSlots, rendezvous_pick


class ReplicaSetTransport:
    """``replicas`` replicas of each stage kind built by ``make[kind]()``; thread-safe.

    Attributes:
        hook: ``(kind, method, stream_id) -> None`` called before each call on a dead replica raises (tests use it
            to line threads up on a barrier).
    """

    def __init__(self, make: dict[str, Callable[[], Any]], replicas: int = 2, capacity: int = 64) -> None:
        self.make, self.capacity = make, capacity
        self._ids = itertools.count()
        self.live: dict[str, dict[str, SlottedStage]] = {VISION: {}, LLM: {}}
        self.view: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.hook: Callable[[str, str, str], None] | None = None
        self.calls: list[tuple[str, str, str]] = []
        for kind in (VISION, LLM):
            for _ in range(replicas):
                self._spawn(kind)
            self.view[kind] = sorted(self.live[kind])

    def _spawn(self, kind: str) -> str:
        rid = f"{kind}-{next(self._ids)}"
        self.live[kind][rid] = SlottedStage(self.make[kind](), StreamSlots(kind, rid, self.capacity))
        return rid

    def owner(self, kind: str, stream_id: str) -> str:
        """The replica the router sends the stream's calls to now."""
        with self.lock:
            return rendezvous_pick(stream_id, self.view[kind])

    def kill(self, kind: str, replica: str, refresh_view: bool = True) -> str:
        """Drop ``replica`` with its state, start a replacement; returns its id. With ``refresh_view=False`` the
        router keeps sending the dead replica's streams to it until :meth:`refresh`."""
        with self.lock:
            del self.live[kind][replica]
            new = self._spawn(kind)
            if refresh_view:
                self.view[kind] = sorted(self.live[kind])
            return new

    def refresh(self) -> None:
        """The router learns the live replicas."""
        with self.lock:
            for kind in (VISION, LLM):
                self.view[kind] = sorted(self.live[kind])

    def _replica(self, kind: str, method: str, stream_id: str) -> SlottedStage:
        with self.lock:
            rid = rendezvous_pick(stream_id, self.view[kind])
            replica = self.live[kind].get(rid)
            self.calls.append((kind, method, rid))
        if replica is None:
            if self.hook is not None:
                self.hook(kind, method, stream_id)
            raise StreamMisroutedError(f"the replica serving stream {stream_id!r} is gone (replica {rid} killed)")
        return replica

    def call(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Any:
        replica = self._replica(kind, method, stream_id)
        if method == "open":
            return replica.open(stream_id, token, *args)
        if method == "close":
            return replica.close(stream_id, token)
        return replica.call(method, stream_id, token, *args)

    def stream(self, kind: str, method: str, stream_id: str, token: str, *args: Any) -> Iterator[Any]:
        replica = self._replica(kind, method, stream_id)
        return started(iter(replica.call(method, stream_id, token, *args)))

    def holders(self, kind: str, stream_id: str) -> dict[str, list[str]]:
        """Which live replicas hold state of ``stream_id`` (slot ids and the stage's own table)."""
        with self.lock:
            reps = dict(self.live[kind])
        out = {}
        for rid, rep in reps.items():
            held = [s for s in rep.slots.ids() if s == stream_id]
            stage = getattr(rep.stage, "streams", None) or getattr(rep.stage, "seen", {})
            if held or stream_id in stage:
                out[rid] = held
        return out
