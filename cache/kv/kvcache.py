"""A transformers ``Cache`` with a preallocated, hard-capped buffer per layer (gpt-fast style).

The model appends through :meth:`BoundedLayer.update` as with ``DynamicCache``; the session edits the buffer
between forward calls (evict a span, write retrieved blocks, re-rotate sinks, roll back a question). The buffer never
grows: writing past ``capacity`` raises instead of allocating, so a session's attention memory is fixed at open.

A buffer holds the model's dtype (``quant="none"``) or int8 codes with a float16 scale and minimum per token and head
(``quant="int8"``, :func:`cache.kv.quant.quantize_tokens`): a token is quantized once, when it is written, and read
back dequantized inside the attention path (:meth:`BoundedLayer.update` hands attention float keys and values; the
tokens being prefilled in that call attend to their own exact keys and values). Edits that move tokens (delete,
truncate) move codes and statistics as they are, without requantizing.

Token order in the buffer only matters for the causal mask of the tokens being prefilled (they must come last);
earlier tokens are all visible to every new token, so retrieved blocks may be written after the window.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from cache.kv.quant import QTensor, dequantize, quantize_tokens
from cache.memory import check_window_quant


class KVBufferFullError(RuntimeError):
    """Internal invariant broken: a write would pass the preallocated capacity (a bug, not a user error)."""


class KVPlane:
    """The keys or the values of one layer: ``[1, kv_heads, capacity, head_dim]`` in ``dtype``, or int8 codes
    (uint8, offset by the minimum) with float16 ``scale`` / ``minimum`` ``[1, kv_heads, capacity, 1]``."""

    def __init__(self, buf: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None,
                 minimum: torch.Tensor | None = None) -> None:
        self.buf, self.scale, self.minimum, self.dtype = buf, scale, minimum, dtype

    @classmethod
    def allocate(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, quant: str) -> "KVPlane":
        check_window_quant(quant)
        if quant == "none":
            return cls(torch.zeros(shape, dtype=dtype, device=device), dtype)
        stats = (*shape[:-1], 1)
        return cls(torch.zeros(shape, dtype=torch.uint8, device=device), dtype,
                   torch.zeros(stats, dtype=torch.float16, device=device),
                   torch.zeros(stats, dtype=torch.float16, device=device))

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.buf, self.scale, self.minimum) if t is not None]

    def write(self, row: int, start: int, x: torch.Tensor) -> None:
        """Store ``x [kv_heads, L, hd]`` at tokens ``[start, start + L)`` of batch row ``row``."""
        end = start + x.shape[-2]
        if not self.quantized:
            self.buf[row, :, start:end] = x
            return
        q = quantize_tokens(x)
        self.buf[row, :, start:end] = q.data
        self.scale[row, :, start:end] = q.scale
        self.minimum[row, :, start:end] = q.minimum

    def read(self, row: int, start: int, end: int) -> torch.Tensor:
        """Tokens ``[start, end)`` of batch row ``row`` as ``[kv_heads, L, hd]`` in ``dtype`` (a view when not
        quantized)."""
        if not self.quantized:
            return self.buf[row, :, start:end]
        sl = (row, slice(None), slice(start, end))
        q = QTensor(self.buf[sl], self.scale[sl], self.minimum[sl], 8, tuple(self.buf[sl].shape), self.dtype)
        return dequantize(q)

    def attend(self, end: int, new: torch.Tensor) -> torch.Tensor:
        """What attention sees after an append of ``new [B, kv_heads, L, hd]``: ``[B, kv_heads, end, hd]``, the held
        tokens (dequantized) followed by ``new`` exactly."""
        if not self.quantized:
            return self.buf[:, :, :end]
        past = end - new.shape[-2]
        held = torch.stack([self.read(b, 0, past) for b in range(new.shape[0])])  # [B, kv_heads, past, hd]
        return torch.cat([held, new.to(self.dtype)], dim=2)

    def move(self, dst: int, src: int, n: int) -> None:
        """Move tokens ``[src, n)`` to ``dst`` (``dst < src``) in every tensor, codes and statistics as they are."""
        for t in self.tensors():
            t[:, :, dst : dst + n - src] = t[:, :, src:n].clone()


class BoundedLayer(CacheLayerMixin):
    """One decoder layer's keys and values in ``[1, kv_heads, capacity, head_dim]`` buffers (``quant``: ``"none"``,
    the model's ``dtype``; ``"int8"``, codes + per-token statistics, see the module docstring)."""

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 quant: str = "none"):
        super().__init__()
        shape = (1, kv_heads, capacity, head_dim)
        self.keys_plane = KVPlane.allocate(shape, dtype, device, quant)
        self.values_plane = KVPlane.allocate(shape, dtype, device, quant)
        self.capacity = capacity
        self.length = 0
        self.dtype, self.device, self.quant = dtype, device, quant
        self.is_initialized = True

    @property
    def k_buf(self) -> torch.Tensor:
        """The keys' storage ``[1, kv_heads, capacity, head_dim]`` (int8 codes when quantized)."""
        return self.keys_plane.buf

    @property
    def v_buf(self) -> torch.Tensor:
        return self.values_plane.buf

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (codes, statistics)."""
        return self.keys_plane.tensors() + self.values_plane.tensors()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated in ``__init__``; nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[1, kv_heads, L, head_dim]`` states; return everything held ``[1, kv_heads, n, hd]`` (views of the
        buffers, or the dequantized past followed by the exact new states)."""
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise KVBufferFullError(f"KV buffer overflow: {end} tokens > capacity {self.capacity}")
        for b in range(key_states.shape[0]):  # batch rows (one for a session's own cache)
            self.keys_plane.write(b, self.length, key_states[b])
            self.values_plane.write(b, self.length, value_states[b])
        self.length = end
        return self.keys_plane.attend(end, key_states), self.values_plane.attend(end, value_states)

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

    Shapes below: ``[layers, kv_heads, tokens, head_dim]`` for multi-layer reads and writes (always in the model's
    dtype; an int8 buffer quantizes on write and dequantizes on read).
    """

    def __init__(
        self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
        quant: str = "none",
    ):
        layers = [BoundedLayer(capacity, kv_heads, head_dim, dtype, device, quant) for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.capacity = capacity
        self.quant = quant
        self.peak = 0

    @property
    def length(self) -> int:
        """Tokens held (the same in every layer between forward calls)."""
        return self.layers[0].length

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of every layer (the whole preallocated buffer)."""
        return [t for layer in self.layers for t in layer.tensors()]

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated buffers (codes and statistics when quantized)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def slot_bytes(self) -> int:
        """Bytes of one token slot, every layer, keys and values (``nbytes / capacity``)."""
        return self.nbytes // self.capacity if self.layers else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.peak = max(self.peak, self.layers[layer_idx].length)
        return out

    def read(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of tokens ``[start, end)``: keys, values ``[layers, kv_heads, end - start, head_dim]``."""
        keys = torch.stack([l.keys_plane.read(0, start, end) for l in self.layers])
        values = torch.stack([l.values_plane.read(0, start, end) for l in self.layers])
        return keys, values

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite tokens from ``start`` with ``[layers, kv_heads, L, hd]``; extends ``length`` if writing past it."""
        end = start + keys.shape[2]
        if end > self.capacity or start > self.length:
            raise KVBufferFullError(f"KV write [{start}, {end}) outside [0, {self.capacity}) / length {self.length}")
        for i, layer in enumerate(self.layers):
            layer.keys_plane.write(0, start, keys[i])
            layer.values_plane.write(0, start, values[i])
            layer.length = max(layer.length, end)
        self.peak = max(self.peak, self.length)

    def write_keys(self, start: int, keys: torch.Tensor) -> None:
        """Overwrite the keys of held tokens ``[start, start + L)`` (re-rotation); values are untouched."""
        end = start + keys.shape[2]
        if end > self.length:
            raise KVBufferFullError(f"KV key rewrite [{start}, {end}) past length {self.length}")
        for i, layer in enumerate(self.layers):
            layer.keys_plane.write(0, start, keys[i])

    def delete(self, start: int, end: int) -> None:
        """Remove tokens ``[start, end)``, shifting later tokens down (their positions/rotations are unchanged)."""
        n = self.length
        for layer in self.layers:
            layer.keys_plane.move(start, end, n)
            layer.values_plane.move(start, end, n)
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
            row.keys_plane.write(0, row.length, key_states[b, :, :n])
            row.values_plane.write(0, row.length, value_states[b, :, :n])
            row.length = end
        if not self.rows[0].keys_plane.quantized:
            if len(self.rows) == 1:
                row = self.rows[0]
                return row.k_buf[:, :, : self.kv_len], row.v_buf[:, :, : self.kv_len]
            keys = torch.stack([r.k_buf[0, :, : self.kv_len] for r in self.rows])  # [B, kv_heads, kv_len, hd]
            values = torch.stack([r.v_buf[0, :, : self.kv_len] for r in self.rows])
            return keys, values
        return self._dequantized(key_states, "keys_plane"), self._dequantized(value_states, "values_plane")

    def _dequantized(self, states: torch.Tensor, plane: str) -> torch.Tensor:
        """int8 rows: each row's held tokens dequantized, its new tokens exact: ``[B, kv_heads, kv_len, hd]``."""
        out = torch.stack([getattr(r, plane).read(0, 0, self.kv_len) for r in self.rows])  # [B, kv_heads, kv_len, hd]
        for b, row in enumerate(self.rows):
            n = self.new[b]
            out[b, :, row.length - n : row.length] = states[b, :, :n]
        return out

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
