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
