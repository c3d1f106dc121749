"""Stream affinity through Serve's public request-router API (:class:`ray.serve.request_router.RequestRouter`, the
extension point Ray Serve LLM's affinity routers use).

A call whose first argument is a stream id goes to that stream's replica and only there
(:func:`serve.core.slots.rendezvous_pick` over the live replicas): when the owner is busy the router waits for it
instead of falling back to another replica, so a busy owner never splits a stream's state. Calls without a stream id
(``ping``, ``where``) go to any replica.
"""
from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serve.core.slots import rendezvous_pick, routing_key

__all__ = ["StreamAffinityRouter"]


class StreamAffinityRouter(RequestRouter):
    """Serve request router: consistent hashing of the stream id (first call argument) over the live replicas."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        key = routing_key(pending_request.args) if pending_request is not None else None
        if key is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rendezvous_pick(key, by_id)]]]  # only the owner: wait for it rather than fall back
