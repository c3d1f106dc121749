"""Asymmetric min/max quantization of offloaded KV blocks (int8, and packed int4).

Statistics (scale, minimum) are taken over one axis, so every group along the other axes has its own range. Keys
are quantized per channel (over a block's tokens) and values per token (over the head dim): keys carry outlier
channels, values do not (the KIVI recipe). Scales and minima are stored as float16 (float32 when the data would
overflow float16). Worst-case reconstruction error is half a quantization step, ``(max - min) / (2^bits - 1) / 2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True, eq=False)
class QTensor:
    """A quantized tensor: ``data`` uint8 (two 4-bit codes per byte along the last dim for 4 bits)."""

    data: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held (codes + scales + minima)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.minimum))

    def __repr__(self) -> str:
        return f"QTensor(int{self.bits}, shape={list(self.shape)}, nbytes={self.nbytes})"


def quantize(x: torch.Tensor, bits: int, dim: int) -> QTensor:
    """Quantize ``x`` with per-group min/max ranges reduced over ``dim``.

    Args:
        x: any float tensor; for ``bits=4`` its last dim must be even.
        bits: 8 or 4.
        dim: the axis the statistics are reduced over (``-2`` = per channel over tokens, ``-1`` = per token).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dim, got shape {list(x.shape)}")
    x32 = x.float()
    qmax = (1 << bits) - 1
    lo = _round_to_storage(x32.amin(dim, keepdim=True), up=False)
    span = x32.amax(dim, keepdim=True) - lo.float()
    scale = _round_to_storage((span / qmax).clamp_min(torch.finfo(torch.float16).tiny), up=True, like=lo.dtype)
    codes = ((x32 - lo.float()) / scale.float()).round_().clamp_(0, qmax).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., n/2]
    return QTensor(codes.contiguous(), scale, lo, bits, tuple(x.shape), x.dtype)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to floats ``q.shape`` in ``dtype`` (default: the original dtype)."""
    codes = q.data
    if q.bits == 4:
        low, high = codes & 0x0F, codes >> 4
        codes = torch.stack((low, high), dim=-1).flatten(-2)  # [..., n]
    out = codes.float() * q.scale.float() + q.minimum.float()
    return out.to(dtype or q.dtype)


def _round_to_storage(t: torch.Tensor, up: bool, like: torch.dtype | None = None) -> torch.Tensor:
    """float16 rounded towards ``+inf`` (``up``) or ``-inf``, so the stored range still covers the data; float32
    when float16 would overflow (or ``like`` is float32 already)."""
    if like == torch.float32 or t.abs().max() > torch.finfo(torch.float16).max / 2:
        return t.float()
    h = t.half()
    direction = torch.full_like(h, float("inf") if up else float("-inf"))
    wrong_side = h.float() < t if up else h.float() > t
    return torch.where(wrong_side, torch.nextafter(h, direction), h)


def quantize_tokens(x: torch.Tensor) -> QTensor:
    """int8 codes of ``x [..., tokens, head_dim]`` with one range per token (and head): what a quantized KV window
    slot holds (:class:`cache.kv.kvcache.BoundedLayer`), float16 scale and minimum ``[..., tokens, 1]``.

    Raises:
        ValueError: a value is too large for float16 statistics (|x| > 32752), which a window slot cannot store.
    """
    q = quantize(x, 8, dim=-1)
    if q.scale.dtype != torch.float16 or q.minimum.dtype != torch.float16:
        raise ValueError(
            f"KV values reach {float(x.abs().max()):.4g}, beyond what an int8 window slot's float16 range holds "
            "(32752). Fix: set kv.window_quant: none for this model."
        )
    return q
