"""A bounded, thread-safe store of reference frames for one stream, searched by signature with FAISS.

STC keeps only the last reference frame; a camera that cuts back to an earlier view then pays a full encode
again. This store keeps up to ``max_refs`` references, each under a unit-norm signature in a FAISS inner-product
index (``IndexIDMap(IndexFlatIP)``), so a frame finds the most similar stored view. When full, the least recently
used reference is evicted (``remove_ids``). Every index read and write holds one lock.

The store is generic: a payload is any object plus its size in bytes (the cacher stores
:class:`cache.stc.ReferenceStates`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Collection, Generic, TypeVar

import faiss
import numpy as np

P = TypeVar("P")

_ID_BYTES = 8  # IndexIDMap keeps one int64 per vector


@dataclass
class StoredRef(Generic[P]):
    """One stored reference.

    Attributes:
        ref_id: the id the FAISS index knows it by.
        signature: ``[dim]`` float32 unit signature (a copy of the indexed vector).
        payload: what the caller stored (the reference states).
        nbytes: the payload's size in bytes, as given by the caller.
        uses: frames that reused it since it was last (re-)encoded.
        hits: frames that reused it in total.
    """

    ref_id: int
    signature: np.ndarray
    payload: P
    nbytes: int
    uses: int = 0
    hits: int = 0


class ReferenceStore(Generic[P]):
    """Up to ``max_refs`` references keyed by ``dim``-long unit signatures; least recently used evicted first.

    Args:
        dim: signature length.
        max_refs: capacity (>= 1).
    """

    def __init__(self, dim: int, max_refs: int) -> None:
        if dim < 1 or max_refs < 1:
            raise ValueError(f"ReferenceStore needs dim >= 1 and max_refs >= 1, got dim={dim}, max_refs={max_refs}")
        self.dim = dim
        self.max_refs = max_refs
        self._index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        self._refs: OrderedDict[int, StoredRef[P]] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()
        self._next_id = 0

    def _vector(self, signature: np.ndarray) -> np.ndarray:
        return self._vectors(np.asarray(signature, dtype=np.float32).reshape(1, -1))  # [1, dim]

    def _vectors(self, signatures: np.ndarray) -> np.ndarray:
        vec = np.ascontiguousarray(np.asarray(signatures, dtype=np.float32))  # [Q, dim]
        if vec.ndim != 2 or vec.shape[1] != self.dim:
            raise ValueError(
                f"signature has {vec.shape[-1]} values but this store holds {self.dim}-long signatures; "
                "frames of another size or model cannot share a store. Fix: reset the cacher."
            )
        return vec

    def search(self, signature: np.ndarray, k: int = 1, exclude: Collection[int] = ()) -> list[tuple[int, float]]:
        """The ``k`` stored references most similar to ``signature`` (inner product), best first.

        ``exclude`` ids are skipped. Fewer than ``k`` pairs come back when the store holds fewer.
        """
        hits = self.search_many(np.asarray(signature, dtype=np.float32).reshape(1, -1), k + len(exclude))[0]
        return [(i, s) for i, s in hits if i not in exclude][:k]

    def search_many(self, signatures: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """:meth:`search` for ``signatures [Q, dim]`` in one FAISS call: per query up to ``k`` (id, score), best
        first."""
        vecs = self._vectors(signatures)
        with self._lock:
            want = min(k, len(self._refs))
            if want <= 0:
                return [[] for _ in range(len(vecs))]
            scores, ids = self._index.search(vecs, want)  # [Q, want] each
        return [[(int(i), float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]

    def get(self, ref_id: int) -> StoredRef[P]:
        """The stored reference ``ref_id`` (``KeyError`` naming the id if it was evicted or never stored)."""
        with self._lock:
            if ref_id not in self._refs:
                raise KeyError(f"reference {ref_id} is not in the store (held: {list(self._refs)})")
            return self._refs[ref_id]

    def touch(self, ref_id: int) -> StoredRef[P]:
        """Record one reuse of ``ref_id``: it becomes the most recently used; ``uses`` and ``hits`` grow by one."""
        with self._lock:
            ref = self._refs[ref_id]
            self._refs.move_to_end(ref_id)
            ref.uses += 1
            ref.hits += 1
            return ref

    def add(self, signature: np.ndarray, payload: P, nbytes: int, uses: int = 0) -> tuple[int, list[int]]:
        """Insert a new reference (reused ``uses`` times already); evict least recently used ones beyond ``max_refs``.

        Returns the new id and the evicted ids.
        """
        vec = self._vector(signature)
        with self._lock:
            evicted = []
            while len(self._refs) >= self.max_refs:
                old_id, _ = self._refs.popitem(last=False)
                self._index.remove_ids(np.array([old_id], dtype=np.int64))
                evicted.append(old_id)
            ref_id = self._next_id
            self._next_id += 1
            self._index.add_with_ids(vec, np.array([ref_id], dtype=np.int64))
            self._refs[ref_id] = StoredRef(ref_id, vec[0].copy(), payload, int(nbytes), uses, uses)
            return ref_id, evicted

    def replace(self, ref_id: int, signature: np.ndarray, payload: P, nbytes: int, uses: int = 0) -> None:
        """Refresh ``ref_id`` with a newly encoded frame: new signature and payload, ``uses`` reset to ``uses``."""
        vec = self._vector(signature)
        with self._lock:
            if ref_id not in self._refs:
                raise KeyError(f"cannot refresh reference {ref_id}: not in the store (held: {list(self._refs)})")
            self._index.remove_ids(np.array([ref_id], dtype=np.int64))
            self._index.add_with_ids(vec, np.array([ref_id], dtype=np.int64))
            old = self._refs[ref_id]
            self._refs[ref_id] = StoredRef(ref_id, vec[0].copy(), payload, int(nbytes), uses, old.hits + uses)
            self._refs.move_to_end(ref_id)

    def remove(self, ref_id: int) -> None:
        """Drop ``ref_id`` if held."""
        with self._lock:
            if self._refs.pop(ref_id, None) is not None:
                self._index.remove_ids(np.array([ref_id], dtype=np.int64))

    def clear(self) -> None:
        """Drop every reference."""
        with self._lock:
            self._refs.clear()
            self._index.reset()

    def ids(self) -> list[int]:
        """Held ids, least recently used first."""
        with self._lock:
            return list(self._refs)

    def __len__(self) -> int:
        with self._lock:
            return len(self._refs)

    @property
    def index_size(self) -> int:
        """Vectors in the FAISS index (always equals ``len(store)``)."""
        with self._lock:
            return int(self._index.ntotal)

    def memory_bytes(self) -> int:
        """Payload bytes plus, per reference, its signature in the index and in the entry, and its id."""
        with self._lock:
            payload = sum(r.nbytes for r in self._refs.values())
            return payload + len(self._refs) * self.entry_overhead(self.dim)

    @staticmethod
    def entry_overhead(dim: int) -> int:
        """Bytes per reference besides the payload: the float32 signature twice (index + entry), an int64 id."""
        return 2 * dim * 4 + _ID_BYTES
