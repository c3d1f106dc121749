"""CPU storage of evicted KV blocks with a FAISS index over their retrieval vectors.

One block = the tokens of one ``append`` call (one chunk; one frame when chunks are single frames). Keys are stored
*without* RoPE (canonical), so a block can be placed at any position when it is brought back. Storage is optionally
quantized (:mod:`cache.kv.quant`). The store is bounded by its owner: the session and the replica budget drop
blocks oldest-first (:meth:`BlockStore.drop_oldest`); ``nbytes`` counts block tensors and the index.

Thread safety: every method takes the store's own lock, and no other lock is taken while holding it (it is the
innermost lock of the engine), so the replica budget may drop blocks of a stream that is answering a question;
:meth:`get` then returns ``None`` for the dropped block.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch

from cache.kv.quant import BITS, QTensor, dequantize, quantize


@dataclass(eq=False)
class StoredBlock:
    """One offloaded block.

    Attributes:
        block_id: the session's block id (append order).
        seq: engine-wide arrival order (smaller = older), used to drop the oldest history across streams.
        tokens: number of tokens.
        stream_pos: stream position (un-rebased) of its first token.
        keys, values: ``[layers, kv_heads, tokens, head_dim]`` keys without RoPE, values; tensors or :class:`QTensor`.
        meta: the caller's block metadata (pts, frame indices...).
        positions: ``[R, tokens]`` int64 rotary positions relative to the block's first position (``None`` =
            ``arange(tokens)``); keys are stored un-rotated at ``stream_pos + positions``.
        extent: how far the block advances the stream position (``tokens`` for plain RoPE; ``None`` = ``tokens``; a
            part of a split M-RoPE chunk may have 0).
    """

    block_id: int
    seq: int
    tokens: int
    stream_pos: int
    keys: torch.Tensor | QTensor
    values: torch.Tensor | QTensor
    meta: dict[str, Any] = field(default_factory=dict)
    positions: torch.Tensor | None = None
    extent: int | None = None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    @property
    def span(self) -> int:
        """Positions the block covers (its extent)."""
        return self.tokens if self.extent is None else self.extent


def _nbytes(t: torch.Tensor | QTensor) -> int:
    return t.nbytes if isinstance(t, QTensor) else t.numel() * t.element_size()


def pack_block(keys: torch.Tensor, values: torch.Tensor, quant: str) -> tuple[torch.Tensor | QTensor, ...]:
    """Move a block to CPU storage: ``[layers, kv_heads, tokens, hd]`` -> stored keys, values.

    ``quant``: ``"none"`` (copy), ``"int8"`` / ``"int4"`` (keys per channel over tokens, values per token).
    """
    keys, values = keys.to("cpu"), values.to("cpu")
    if quant == "none":
        return keys.contiguous(), values.contiguous()
    bits = BITS[quant]
    return quantize(keys, bits, dim=-2), quantize(values, bits, dim=-1)


def unpack_block(block: StoredBlock, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored block -> keys (no RoPE), values ``[layers, kv_heads, tokens, hd]`` in ``dtype`` on ``device``."""
    out = []
    for t in (block.keys, block.values):
        t = dequantize(t, dtype) if isinstance(t, QTensor) else t.to(dtype)
        out.append(t.to(device))
    return out[0], out[1]


class BlockStore:
    """Offloaded blocks of one stream, oldest first, with a FAISS inner-product index on their vectors.

    Args:
        dim: length of a retrieval vector.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._blocks: OrderedDict[int, StoredBlock] = OrderedDict()  # oldest first
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._block_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)

    @property
    def nbytes(self) -> int:
        """Block tensors + index vectors (float32) + index ids (int64)."""
        with self._lock:
            return self._block_bytes + len(self._blocks) * (self.dim * 4 + 8)

    @property
    def tokens(self) -> int:
        with self._lock:
            return sum(b.tokens for b in self._blocks.values())

    def block_cost(self, block: StoredBlock) -> int:
        """Bytes ``block`` will take once added (tensors + its index entry)."""
        return block.nbytes + self.dim * 4 + 8

    def add(self, block: StoredBlock, vector: torch.Tensor) -> None:
        """Store ``block`` with its retrieval ``vector`` ``[dim]``. Blocks must arrive oldest first."""
        vec = np.ascontiguousarray(vector.detach().float().cpu().numpy().reshape(1, self.dim))
        with self._lock:
            self._index.add_with_ids(vec, np.array([block.block_id], dtype=np.int64))
            self._blocks[block.block_id] = block
            self._block_bytes += block.nbytes

    def oldest_seq(self) -> int | None:
        """Engine-wide arrival order of the oldest block (``None`` when empty)."""
        with self._lock:
            return next(iter(self._blocks.values())).seq if self._blocks else None

    def drop_oldest(self) -> int:
        """Drop the oldest block; returns the bytes freed (0 when empty)."""
        with self._lock:
            if not self._blocks:
                return 0
            block_id, block = self._blocks.popitem(last=False)
            self._index.remove_ids(np.array([block_id], dtype=np.int64))
            self._block_bytes -= block.nbytes
            return block.nbytes + self.dim * 4 + 8

    def clear(self) -> int:
        """Drop everything; returns the bytes freed."""
        freed = self.nbytes
        with self._lock:
            self._blocks.clear()
            self._index.reset()
            self._block_bytes = 0
        return freed

    def search(self, vector: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """The ``k`` blocks with the largest inner product with ``vector`` ``[dim]``: ``[(block_id, score)]``."""
        vec = np.ascontiguousarray(vector.detach().float().cpu().numpy().reshape(1, self.dim))
        with self._lock:
            k = min(k, self._index.ntotal)
            if k == 0:
                return []
            scores, ids = self._index.search(vec, k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def blocks(self) -> list[StoredBlock]:
        """The stored blocks now, oldest first (a snapshot: the budget may drop some right after)."""
        with self._lock:
            return list(self._blocks.values())

    def get(self, block_id: int) -> StoredBlock | None:
        """The stored block, or ``None`` if it was dropped."""
        with self._lock:
            return self._blocks.get(block_id)
