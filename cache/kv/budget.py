"""The replica's KV memory budget across all streams of one LLM engine.

Policy when full (stated once, enforced here):

1. Each open stream holds a fixed reservation: its preallocated attention buffer + canonical sink keys. Opening a
   stream needs that much free.
2. Offloaded history is elastic. When a new block or a new stream does not fit, the oldest offloaded block of the
   whole replica (smallest engine-wide arrival number, whichever stream owns it) is dropped, repeatedly.
3. If the reservations alone leave no room for a new stream, :meth:`reserve` raises
   :class:`~cache.kv.errors.KVCapacityError` (HTTP 503) without dropping anything: the new stream is refused, open
   streams carry on. A block that does not fit is discarded (counted as dropped), never allocated.

So ``used_bytes() <= limit_bytes`` at all times; nothing is allocated before it is admitted here.

Lock order: a session's lock -> this budget's lock -> a block store's lock (innermost).
"""
from __future__ import annotations

import threading
from collections import Counter

import torch

from cache.kv.errors import KVCapacityError
from cache.kv.offload import BlockStore, StoredBlock


class ReplicaBudget:
    """Bytes reserved by open streams + bytes of their offloaded blocks, kept under ``limit_bytes``."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._reserved: dict[str, int] = {}
        self._stores: dict[str, BlockStore] = {}
        self.dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def used_bytes(self) -> int:
        """Reservations + offloaded bytes of every open stream."""
        with self._lock:
            return self._used()

    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    def _used(self) -> int:
        return sum(self._reserved.values()) + sum(s.nbytes for s in self._stores.values())

    def reserve(self, stream_id: str, nbytes: int) -> None:
        """Admit a new stream holding ``nbytes`` (dropping the oldest offloaded history if needed).

        Raises:
            KVCapacityError: it does not fit even with no offloaded history left.
        """
        with self._lock:
            reserved = sum(self._reserved.values())
            if reserved + nbytes > self.limit_bytes:  # refuse before destroying any history
                raise KVCapacityError(
                    f"cannot open stream {stream_id!r}: it needs {nbytes} bytes of KV memory but "
                    f"{len(self._reserved)} open stream(s) reserve {reserved} of the replica's "
                    f"memory_budget_bytes={self.limit_bytes}. "
                    "Fix: close a stream, lower kv.budget_tokens, or raise the replica's KV memory budget."
                )
            while self._used() + nbytes > self.limit_bytes and self._drop_oldest():
                pass
            self._reserved[stream_id] = nbytes

    def attach_store(self, stream_id: str, store: BlockStore) -> None:
        """Count ``store`` as ``stream_id``'s offloaded history (droppable by :meth:`store_block` / :meth:`reserve`)."""
        with self._lock:
            self._stores[stream_id] = store

    def release(self, stream_id: str) -> int:
        """Forget a closed stream; returns the bytes it held (its store is cleared)."""
        with self._lock:
            freed = self._reserved.pop(stream_id, 0)
            store = self._stores.pop(stream_id, None)
            if store is not None:
                freed += store.clear()
            self.dropped.pop(stream_id, None)
            return freed

    def store_block(
        self, stream_id: str, block: StoredBlock, vector: torch.Tensor, stream_cap: int
    ) -> bool:
        """Add an offloaded block to ``stream_id``'s store within its own cap and the replica budget.

        Drops that stream's oldest blocks while over ``stream_cap``, then the replica's oldest while over budget.
        Returns ``False`` (block discarded) when it cannot fit at all.
        """
        with self._lock:
            store = self._stores[stream_id]
            cost = store.block_cost(block)
            if cost > stream_cap or cost > self.limit_bytes - sum(self._reserved.values()):
                self.dropped[stream_id] += 1
                return False
            while store.nbytes + cost > stream_cap and store.drop_oldest():
                self.dropped[stream_id] += 1
            while self._used() + cost > self.limit_bytes and self._drop_oldest():
                pass
            store.add(block, vector)
            return True

    def _drop_oldest(self) -> bool:
        """Drop the replica's oldest offloaded block; ``False`` if there is none."""
        oldest, owner = None, None
        for stream_id, store in self._stores.items():
            seq = store.oldest_seq()
            if seq is not None and (oldest is None or seq < oldest):
                oldest, owner = seq, stream_id
        if owner is None:
            return False
        self._stores[owner].drop_oldest()
        self.dropped[owner] += 1
        return True
