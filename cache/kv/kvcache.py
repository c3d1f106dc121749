"""A transformers ``Cache`` with a preallocated, hard-capped buffer per layer (gpt-fast style).

The model appends through :meth:`BoundedLayer.update` as with ``DynamicCache``; the session edits the buffer
between forward calls (evict a span, write retrieved blocks, re-rotate sinks, roll back a question). The buffer never
grows: writing past ``capacity`` raises instead of allocating, so a session's attention memory is fixed at open.

Token order in the buffer only matters for the causal mask of the tokens being prefilled (they must come last);
earlier tokens are all visible to every new token, so retrieved blocks may be written after the window.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class KVBufferFullError(RuntimeError):
    """Internal invariant broken: a write would pass the preallocated capacity (a bug, not a user error)."""


class BoundedLayer(CacheLayerMixin):
    """One decoder layer's keys and values in ``[1, kv_heads, capacity, head_dim]`` buffers."""

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (1, kv_heads, capacity, head_dim)
        self.k_buf = torch.zeros(shape, dtype=dtype, device=device)
        self.v_buf = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated in ``__init__``; nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[1, kv_heads, L, head_dim]`` states; return views of everything held ``[1, kv_heads, n, hd]``."""
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise KVBufferFullError(f"KV buffer overflow: {end} tokens > capacity {self.capacity}")
        self.k_buf[:, :, self.length : end] = key_states
        self.v_buf[:, :, self.length : end] = value_states
        self.length = end
        return self.k_buf[:, :, :end], self.v_buf[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """HF convention: a negative count removes that many tokens from the end."""
        if tokens_to_remove < 0:
            self.length = max(0, self.length + tokens_to_remove)


class BoundedCache(Cache):
    """All layers of one stream's resident KV, plus the editing operations a bounded session needs.

    Shapes below: ``[layers, kv_heads, tokens, head_dim]`` for multi-layer reads and writes.
    """

    def __init__(
        self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ):
        layers = [BoundedLayer(capacity, kv_heads, head_dim, dtype, device) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.capacity = capacity
        self.peak = 0

    @property
    def length(self) -> int:
        """Tokens held (the same in every layer between forward calls)."""
        return self.layers[0].length

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated buffers."""
        return sum(l.k_buf.numel() * l.k_buf.element_size() * 2 for l in self.layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.peak = max(self.peak, self.layers[layer_idx].length)
        return out

    def read(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of tokens ``[start, end)``: keys, values ``[layers, kv_heads, end - start, head_dim]``."""
        keys = torch.stack([l.k_buf[0, :, start:end] for l in self.layers])
        values = torch.stack([l.v_buf[0, :, start:end] for l in self.layers])
        return keys, values

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite tokens from ``start`` with ``[layers, kv_heads, L, hd]``; extends ``length`` if writing past it."""
        end = start + keys.shape[2]
        if end > self.capacity or start > self.length:
            raise KVBufferFullError(f"KV write [{start}, {end}) outside [0, {self.capacity}) / length {self.length}")
        for i, layer in enumerate(self.layers):
            layer.k_buf[0, :, start:end] = keys[i]
            layer.v_buf[0, :, start:end] = values[i]
            layer.length = max(layer.length, end)
        self.peak = max(self.peak, self.length)

    def write_keys(self, start: int, keys: torch.Tensor) -> None:
        """Overwrite the keys of held tokens ``[start, start + L)`` (re-rotation); values are untouched."""
        end = start + keys.shape[2]
        if end > self.length:
            raise KVBufferFullError(f"KV key rewrite [{start}, {end}) past length {self.length}")
        for i, layer in enumerate(self.layers):
            layer.k_buf[0, :, start:end] = keys[i]

    def delete(self, start: int, end: int) -> None:
        """Remove tokens ``[start, end)``, shifting later tokens down (their positions/rotations are unchanged)."""
        n = self.length
        for layer in self.layers:
            for buf in (layer.k_buf, layer.v_buf):
                buf[:, :, start : n - (end - start)] = buf[:, :, end:n].clone()
            layer.length = n - (end - start)

    def truncate(self, length: int) -> None:
        """Drop everything from ``length`` on (roll back a question and its answer)."""
        for layer in self.layers:
            layer.length = min(layer.length, length)


class _RowsLayer(CacheLayerMixin):
    """One decoder layer of a ragged batch: row ``b`` appends its first ``new[b]`` tokens to its own buffer."""

    is_sliding = False
    is_compileable = False

    def __init__(self, rows: list[BoundedLayer], new: list[int], kv_len: int) -> None:
        super().__init__()
        self.rows, self.new, self.kv_len = rows, new, kv_len
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Row buffers exist already; nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write row ``b``'s ``[kv_heads, new[b], hd]`` (padding dropped); return ``[B, kv_heads, kv_len, hd]``.

        Key slots a row does not use (past its own length) hold stale values; the engine's 4-D mask hides them.
        """
        for b, row in enumerate(self.rows):
            n = self.new[b]
            end = row.length + n
            if end > row.capacity:
                raise KVBufferFullError(f"KV buffer overflow: {end} tokens > capacity {row.capacity}")
            row.k_buf[0, :, row.length : end] = key_states[b, :, :n]
            row.v_buf[0, :, row.length : end] = value_states[b, :, :n]
            row.length = end
        if len(self.rows) == 1:
            row = self.rows[0]
            return row.k_buf[:, :, : self.kv_len], row.v_buf[:, :, : self.kv_len]
        keys = torch.stack([r.k_buf[0, :, : self.kv_len] for r in self.rows])  # [B, kv_heads, kv_len, hd]
        values = torch.stack([r.v_buf[0, :, : self.kv_len] for r in self.rows])
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv_len, 0

    def get_seq_length(self) -> int:
        return min(r.length for r in self.rows)

    def get_max_length(self) -> int:
        return min(r.capacity for r in self.rows)

    def reset(self) -> None:
        """A batch view owns no tokens; rows are reset through their own session."""


class RowsCache(Cache):
    """A ragged batch over the :class:`BoundedCache` of several streams (one row each), for one forward call.

    Row ``b`` holds ``past[b]`` tokens and appends ``new[b]`` (the batch is padded to ``max(new)``); keys come
    back as ``[B, kv_heads, kv_len, hd]`` with ``kv_len = max(past + new)`` (static per step; at most the
    sessions' ``capacity``). Pair it with :func:`ragged_mask`.
    """

    def __init__(self, caches: list[BoundedCache], new: list[int]) -> None:
        self.past = [c.length for c in caches]
        self.new = list(new)
        self.kv_len = max(p + n for p, n in zip(self.past, self.new))
        self.caches = caches
        depth = len(caches[0].layers)
        layers = [_RowsLayer([c.layers[i] for c in caches], self.new, self.kv_len) for i in range(depth)]
        super().__init__(layers=layers)

    def finish(self) -> None:
        """Record the sessions' peaks after the forward call."""
        for c in self.caches:
            c.peak = max(c.peak, c.length)


def ragged_mask(past: list[int], new: list[int], kv_len: int, device: torch.device) -> torch.Tensor:
    """Exact attention of a ragged batch: ``[B, 1, max(new), kv_len]`` bool, True = attend.

    Query ``i < new[b]`` of row ``b`` sees that row's ``past[b]`` held tokens and its own new tokens up to itself
    (causal); padding queries ``i >= new[b]`` see the same as the row's last real query (their output is unused).
    """
    width = max(new)
    past_t = torch.tensor(past, device=device)[:, None]  # [B, 1]
    new_t = torch.tensor(new, device=device)[:, None]
    q = torch.arange(width, device=device)[None, :]  # [1, Lq]
    limit = past_t + torch.minimum(q, new_t - 1) + 1  # [B, Lq]: keys < limit are visible
    keys = torch.arange(kv_len, device=device)[None, None, :]  # [1, 1, kv]
    return (keys < limit[:, :, None])[:, None]  # [B, 1, Lq, kv]
