"""One stream's STC cacher: picks a reference per frame, encodes new scenes fully, reuses the rest.

Use it as the adapter's layer runner::

    cacher = StreamCacher(CacherConfig())
    features = adapter.encode_vision(pixel_values, layer_runner=cacher.runner)

Per chunk (``encode(hidden0 [N, P, D], layers)``, frames in stream order):

1. **Plan.** Each frame's signature (:func:`cache.stc.frame_signature`) is searched in the stream's
   :class:`cache.store.ReferenceStore` and among the references this chunk creates (a frame may reuse an earlier
   frame of its own chunk). Below ``match_threshold`` the frame is a *new scene*; a match that drifted
   (cosine < ``refresh_below``, one region's cosine < ``refresh_cell_below``, or reused ``max_reuse`` times) is
   *refreshed* (the frame is encoded fully and
   replaces it); otherwise the frame *reuses* it.
2. **Full encode** of new and refreshing frames in one batch, keeping their per-layer states.
3. **Commit** those states to the store (insert or replace; least recently used evicted).
4. **Selective encode** of reusing frames per reference (:func:`cache.stc.encode_selective`): batched, or with
   ``rolling`` (default) one after another, each writing the tokens it recomputed back into the reference. Changed
   tokens are found by key sketch (``key_sketch``, default 128 wide; :mod:`cache.sketch`) or by exact keys.

Memory bound: ``max_refs * ((3 * D + key_sketch) * L * P * store element size + 2 * signature_dim * 4 + 8)`` bytes,
see :meth:`StreamCacher.memory_bound`; a chunk adds at most its own new references transiently.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from cache.config import CacherConfig
from cache.memory import MemoryReport, tensor_bytes
from cache.stc import (
    ReferenceStates,
    check_layers,
    encode_full,
    encode_selective,
    frame_signature,
    reference_nbytes,
    signature_dim,
)
from cache.store import ReferenceStore

LayerRunner = Callable[[torch.Tensor, Sequence[nn.Module]], torch.Tensor]


@dataclass
class CacheStats:
    """Counters for one chunk or a whole stream.

    ``hits`` counts frames that matched a reference (reused + refreshed); ``misses`` the new scenes.
    ``grid_changes``: chunks whose token grid differed from the previous chunk's (grid-bound layers only): the old
    grid's references were dropped.
    ``tokens_recomputed[l]`` / ``tokens_reusable[l]``: tokens recomputed in layer ``l`` over reused frames / the
    tokens those frames have. ``refs_held``, ``store_bytes`` and its split ``reference_device_bytes`` /
    ``reference_host_bytes`` (:meth:`StreamCacher.memory`) are the state after the chunk.
    """

    chunks: int = 0
    frames: int = 0
    frames_full: int = 0
    frames_reused: int = 0
    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    evictions: int = 0
    grid_changes: int = 0
    tokens_recomputed: list[int] = field(default_factory=list)
    tokens_reusable: list[int] = field(default_factory=list)
    refs_held: int = 0
    store_bytes: int = 0
    reference_device_bytes: int = 0
    reference_host_bytes: int = 0

    @property
    def reuse_rate(self) -> float:
        """Frames reused / frames (0.0 before any frame)."""
        return self.frames_reused / self.frames if self.frames else 0.0

    @property
    def recompute_fraction(self) -> float:
        """Recomputed / reusable tokens over all layers (0.0 when no frame was reused)."""
        total = sum(self.tokens_reusable)
        return sum(self.tokens_recomputed) / total if total else 0.0

    def merge(self, other: "CacheStats") -> None:
        """Add ``other``'s counters (a chunk) into these; gauges take ``other``'s values."""
        for name in ("chunks", "frames", "frames_full", "frames_reused", "hits", "misses", "refreshes", "evictions",
                     "grid_changes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("tokens_recomputed", "tokens_reusable"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if len(mine) < len(theirs):
                mine.extend([0] * (len(theirs) - len(mine)))
            for i, v in enumerate(theirs):
                mine[i] += v
        for name in ("refs_held", "store_bytes", "reference_device_bytes", "reference_host_bytes"):
            setattr(self, name, getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counters plus ``reuse_rate`` and ``recompute_fraction``."""
        return {
            **asdict(self),
            "reuse_rate": round(self.reuse_rate, 6),
            "recompute_fraction": round(self.recompute_fraction, 6),
        }


@dataclass
class _Slot:
    """A reference during planning: a stored one and/or one being (re-)encoded from a frame of this chunk."""

    store_id: int | None
    signature: np.ndarray
    uses: int
    frame: int | None = None  # chunk frame that (re-)encodes it; None: the stored payload stands
    payload: ReferenceStates | None = None


@dataclass
class _Plan:
    slots: list[_Slot] = field(default_factory=list)
    full: list[int] = field(default_factory=list)  # frames encoded fully, in stream order
    reuse: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # source -> frames reusing it
    stored: dict[int, ReferenceStates] = field(default_factory=dict)  # store id -> payload, for ("ref", id)
    decisions: list[tuple[str, _Slot]] = field(default_factory=list)  # per frame: kind, its reference
    hits: int = 0
    misses: int = 0
    refreshes: int = 0


class StreamCacher:
    """STC-Cacher state for one stream (not shared between streams; calls on one instance are serialised).

    Args:
        config: the cache settings; ``None`` takes the defaults.
    """

    def __init__(self, config: CacherConfig | None = None) -> None:
        self.config = (config or CacherConfig()).resolved()  # 'auto' region refresh: the generic value
        self._store: ReferenceStore[ReferenceStates] | None = None
        self._shape: tuple[int, int, int] | None = None  # (layers, tokens, dim) the store was built for
        self._grid: object = None  # the grid of grid-bound layers (Qwen: (rows, cols)) the store was built for
        self._lock = threading.RLock()
        self._last = CacheStats()
        self._total = CacheStats()
        self._decisions: list[tuple[str, int]] = []

    @property
    def runner(self) -> LayerRunner:
        """``layer_runner(hidden [N, P, D], layers) -> [N, P, D]`` for ``adapter.encode_vision``."""
        return self.encode

    def __call__(self, hidden: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
        return self.encode(hidden, layers)

    def encode(self, hidden: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
        """Encode one chunk ``hidden [N, P, D]`` (patch + position embeddings, stream order) -> ``[N, P, D]``."""
        if hidden.ndim != 3 or hidden.shape[0] == 0:
            raise ValueError(
                f"encode needs patch embeddings [frames, tokens, dim] with frames >= 1, got {list(hidden.shape)}"
            )
        with self._lock, torch.inference_mode():
            if not self.config.enabled:
                out, _ = encode_full(hidden, layers)
                self._record(CacheStats(chunks=1, frames=len(hidden), frames_full=len(hidden)))
                self._decisions = [("off", -1)] * len(hidden)
                return out
            check_layers(layers)
            store, new_grid = self._ensure_store(len(layers), hidden.shape[1], hidden.shape[2],
                                                 getattr(layers[0], "grid", None))
            signatures = frame_signature(hidden, self.config.signature_grid).cpu().numpy()  # [N, S]
            plan = self._plan(store, signatures)  # 1
            out = torch.empty_like(hidden)
            fresh = self._encode_full_frames(hidden, layers, plan, out)  # 2
            stats = CacheStats(chunks=1, frames=len(hidden), frames_full=len(plan.full), hits=plan.hits)
            stats.misses, stats.refreshes, stats.grid_changes = plan.misses, plan.refreshes, int(new_grid)
            host = self.config.reference_placement == "host"
            copies: list[tuple[ReferenceStates, ReferenceStates]] = []  # (on the device, in the store), host only
            stats.evictions = self._commit(store, plan, fresh, copies if host else None)  # 3
            self._encode_reused(hidden, layers, plan, fresh, out, stats, copies if host else None)  # 4
            if self.config.rolling:  # 5. host: rolling rows written on the device go back to the stored copy
                for on_device, stored in copies:
                    stored.copy_from(on_device)
            memory = self._memory(store)
            stats.refs_held, stats.store_bytes = len(store), store.memory_bytes()
            stats.reference_device_bytes, stats.reference_host_bytes = memory.references, memory.host_references
            self._record(stats)
            self._decisions = [(kind, slot.store_id) for kind, slot in plan.decisions]
            return out

    def _record(self, stats: CacheStats) -> None:
        self._last = stats
        self._total.merge(stats)

    def _ensure_store(self, num_layers: int, tokens: int, dim: int,
                      grid: object = None) -> tuple[ReferenceStore[ReferenceStates], bool]:
        """The store for this encoder shape. Layers bound to a token grid (``layer.grid``, the Qwen adapters) may
        change grid mid-stream (a frame of another size): the old grid's references cannot serve the new one, so
        they are dropped and the new grid starts with a new reference (``CacheStats.grid_changes``)."""
        shape = (num_layers, tokens, dim)
        changed = (self._store is not None and grid is not None and self._grid != grid
                   and (num_layers, dim) == self._shape[::2])
        if changed:
            self._store, self._shape = None, None
        if self._store is not None and self._shape != shape:
            raise ValueError(
                f"this stream's cacher holds references for (layers, tokens, dim)={self._shape}, got {shape}; a "
                "stream must keep one model and frame size. Fix: call reset() before changing either."
            )
        if self._store is None:
            self._store = ReferenceStore(signature_dim(tokens, dim, self.config.signature_grid), self.config.max_refs)
            self._shape, self._grid = shape, grid
        return self._store, changed

    def _plan(self, store: ReferenceStore[ReferenceStates], signatures: np.ndarray) -> _Plan:
        """Step 1: decide per frame: new scene, refresh or reuse (see the module docstring)."""
        plan, cfg = _Plan(), self.config
        found = store.search_many(signatures, k=len(signatures) + 1)  # one FAISS call; N + 1 covers every exclusion
        for i, sig in enumerate(signatures):
            slot, score = self._best_slot(store, sig, found[i], plan.slots)
            if slot is None or score < cfg.match_threshold:
                plan.misses += 1
                plan.slots.append(_Slot(store_id=None, signature=sig, uses=0, frame=i))
                plan.full.append(i)
                plan.decisions.append(("new", plan.slots[-1]))
                continue
            plan.hits += 1
            drifted = cfg.refresh_below is not None and score < cfg.refresh_below
            if cfg.refresh_cell_below is not None and not drifted and self._shape is not None:
                drifted = min_cell_cosine(sig, slot.signature, self._shape[2]) < cfg.refresh_cell_below
            if drifted or (cfg.max_reuse is not None and slot.uses >= cfg.max_reuse):
                plan.refreshes += 1
                slot.signature, slot.uses, slot.frame, slot.payload = sig, 0, i, None
                plan.full.append(i)
                plan.decisions.append(("refresh", slot))
                continue
            slot.uses += 1
            plan.decisions.append(("reuse", slot))
            if slot.frame is not None:
                plan.reuse.setdefault(("frame", slot.frame), []).append(i)
            else:
                plan.stored[slot.store_id] = slot.payload
                plan.reuse.setdefault(("ref", slot.store_id), []).append(i)
                store.touch(slot.store_id)
        return plan

    @staticmethod
    def _best_slot(
        store: ReferenceStore[ReferenceStates], sig: np.ndarray, found: list[tuple[int, float]], slots: list[_Slot]
    ) -> tuple[_Slot | None, float]:
        """The most similar reference: one this chunk already uses or creates, or the best other stored one
        (``found``: the store's search result for ``sig``, best first)."""
        best, best_score = None, -np.inf
        for slot in slots:
            score = float(np.dot(slot.signature, sig))
            if score > best_score:
                best, best_score = slot, score
        taken = {s.store_id for s in slots if s.store_id is not None}
        for ref_id, score in [hit for hit in found if hit[0] not in taken][:1]:
            if score > best_score:
                ref = store.get(ref_id)
                best, best_score = _Slot(ref_id, ref.signature, ref.uses, payload=ref.payload), score
                slots.append(best)
        return best, best_score

    def _encode_full_frames(
        self, hidden: torch.Tensor, layers: Sequence[nn.Module], plan: _Plan, out: torch.Tensor
    ) -> dict[int, ReferenceStates]:
        """Step 2: encode new/refreshing frames fully; return the states of those that serve as references."""
        if not plan.full:
            return {}
        needed = {s.frame for s in plan.slots if s.frame is not None}
        needed |= {src for kind, src in plan.reuse if kind == "frame"}
        keep = [plan.full.index(f) for f in sorted(needed)]
        dtype = self.config.torch_store_dtype(hidden.dtype)
        out[plan.full], refs = encode_full(hidden[plan.full], layers, keep=keep, store_dtype=dtype,
                                           sketch_dim=self.config.sketch_width(hidden.shape[2]))
        return dict(zip(sorted(needed), refs))

    @staticmethod
    def _commit(store: ReferenceStore[ReferenceStates], plan: _Plan, fresh: dict[int, ReferenceStates],
                copies: list[tuple[ReferenceStates, ReferenceStates]] | None = None) -> int:
        """Step 3: store (re-)encoded references: refreshes replace theirs, new scenes are added. Returns evictions.
        ``copies`` (host placement): the store gets a host copy, and ``(device, host)`` is recorded."""
        evicted = 0
        ordered = sorted((s for s in plan.slots if s.frame is not None), key=lambda s: s.store_id is None)
        for slot in ordered:
            payload = fresh[slot.frame]
            if copies is not None:
                stored = payload.to("cpu", pin=torch.cuda.is_available())
                copies.append((payload, stored))
                payload = stored
            if slot.store_id is not None and slot.store_id in store.ids():
                store.replace(slot.store_id, slot.signature, payload, payload.nbytes, slot.uses)
                continue
            slot.store_id, gone = store.add(slot.signature, payload, payload.nbytes, slot.uses)
            evicted += len(gone)
        return evicted

    def _encode_reused(
        self,
        hidden: torch.Tensor,
        layers: Sequence[nn.Module],
        plan: _Plan,
        fresh: dict[int, ReferenceStates],
        out: torch.Tensor,
        stats: CacheStats,
        copies: list[tuple[ReferenceStates, ReferenceStates]] | None = None,
    ) -> None:
        """Step 4: selective recompute of reusing frames, batched per reference (``copies``: host placement, a
        stored reference is copied to the encoder's device for this chunk and the pair recorded)."""
        cfg, tokens = self.config, hidden.shape[1]
        stats.tokens_recomputed = [0] * len(layers)
        stats.tokens_reusable = [0] * len(layers)
        for (kind, src), frames in plan.reuse.items():
            ref = fresh[src] if kind == "frame" else plan.stored[src]
            if kind == "ref" and copies is not None:
                stored, ref = ref, ref.to(hidden.device)
                copies.append((ref, stored))
            out[frames], counts = encode_selective(hidden[frames], layers, ref, cfg.ratio, cfg.threshold,
                                                   rolling=cfg.rolling)
            stats.frames_reused += len(frames)
            for i, c in enumerate(counts):
                stats.tokens_recomputed[i] += c
                stats.tokens_reusable[i] += len(frames) * tokens

    def last_chunk_stats(self) -> dict[str, Any]:
        """Counters of the most recent ``encode`` call (:meth:`CacheStats.to_dict`)."""
        with self._lock:
            return self._last.to_dict()

    def stats(self) -> dict[str, Any]:
        """Counters since creation or the last :meth:`reset` (:meth:`CacheStats.to_dict`)."""
        with self._lock:
            return self._total.to_dict()

    def last_chunk_decisions(self) -> list[tuple[str, int]]:
        """Per frame of the last chunk: ``(kind, reference id)``, kind ``new`` (a new scene, encoded fully and
        stored), ``refresh`` (encoded fully, replacing the reference it matched), ``reuse`` (selective recompute
        against that reference) or ``off`` (cache disabled, id -1). Replaying them in order tells which frame's
        full encode each reused frame was computed against."""
        with self._lock:
            return list(self._decisions)

    def held_references(self) -> list[dict[str, int]]:
        """Stored references, least recently used first: ``id``, ``uses`` (since last encoded), ``hits``, ``bytes``."""
        with self._lock:
            if self._store is None:
                return []
            refs = [self._store.get(i) for i in self._store.ids()]
            return [{"id": r.ref_id, "uses": r.uses, "hits": r.hits, "bytes": r.nbytes} for r in refs]

    def reset(self) -> None:
        """Forget every reference and counter (a new stream, or another model / frame size)."""
        with self._lock:
            self._store, self._shape, self._grid = None, None, None
            self._last, self._total, self._decisions = CacheStats(), CacheStats(), []

    def memory_bytes(self) -> int:
        """Bytes held by the reference store now (device + host: :meth:`memory` splits them)."""
        with self._lock:
            return self._store.memory_bytes() if self._store is not None else 0

    def memory(self) -> MemoryReport:
        """The store's bytes measured on the tensors held, on the device or the host as
        ``reference_placement`` says (the index's signatures and ids are host memory either way)."""
        with self._lock:
            return self._memory(self._store) if self._store is not None else MemoryReport()

    def _memory(self, store: ReferenceStore[ReferenceStates]) -> MemoryReport:
        refs = [store.get(i).payload for i in store.ids()]
        held, index = tensor_bytes(t for r in refs for t in r.tensors()), len(refs) * store.entry_overhead(store.dim)
        if self.config.reference_placement == "host":
            return MemoryReport(host_references=held + index)
        return MemoryReport(references=held, host_references=index)

    def memory_bound(self, num_layers: int, tokens: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
        """Most bytes the store can hold for this config and encoder shape (``dtype``: the encoder's dtype)."""
        per_ref = reference_nbytes(num_layers, tokens, dim, self.config.torch_store_dtype(dtype),
                                   self.config.sketch_width(dim))
        overhead = ReferenceStore.entry_overhead(signature_dim(tokens, dim, self.config.signature_grid))
        return self.config.max_refs * (per_ref + overhead)


def min_cell_cosine(a: np.ndarray, b: np.ndarray, dim: int) -> float:
    """Lowest per-cell cosine between two signatures of :func:`cache.stc.frame_signature` (``[dim * cells]``,
    laid out ``[dim, cells]``): how much the most changed region of the frame moved."""
    x, y = a.reshape(dim, -1), b.reshape(dim, -1)  # [D, cells]
    den = np.maximum(np.linalg.norm(x, axis=0) * np.linalg.norm(y, axis=0), 1e-12)  # [cells]
    return float(((x * y).sum(axis=0) / den).min())


def make_layer_runner(cacher: StreamCacher | None) -> LayerRunner | None:
    """The ``layer_runner`` for ``adapter.encode_vision``: the cacher's, or ``None`` (plain loop) without one."""
    return cacher.runner if cacher is not None else None
