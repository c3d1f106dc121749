"""Sketched change detection for the STC cacher: pick the tokens to recompute from a random projection of their keys.

STC computes every token's key in every layer of a reused frame, to find the tokens whose key changed. That full
``D x D`` key projection is ~7 % of a SigLIP-so400m layer and, at a recompute ratio of 0.15, about 30 % of a reused
frame's cost. A Johnson-Lindenstrauss sketch does the finding instead: ``s = k_pre @ R`` with a fixed Gaussian
``R [D, r] / sqrt(r)`` folded into the key weights once per layer (``M = W_k^T R``, ``c = b_k R``), so a token's
sketch costs ``D x r`` (r = 128: 1/9 of its key) and the cosine of two sketches estimates the cosine of the two
keys (relative error of ``1 - cos`` about ``sqrt(2 / r)``). Only the picked tokens' keys are then computed; every
other token attends with its reference key, as it already does with its reference value (its key barely changed:
that is why it was not picked).

Keys are sketched before any rotary embedding (``LayerOps.key_projection``), so the sketch of a position does not
depend on the rotary angle; a reference keeps its tokens' sketches (``[L, P, r]``, r/D of its keys' bytes).
"""
from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import nn

from stream.models.vision_ops import LayerOps

__all__ = ["SKETCH_SEED", "key_sketch", "sketch_projection"]

SKETCH_SEED = 20_251_200  # fixed: the same layer gets the same sketch in every process and every stream
_cache: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[torch.Tensor, torch.Tensor | None]]]" = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def sketch_projection(ops: LayerOps, dim: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(M [D_in, r], c [r] | None)`` with ``h @ M + c == k_pre @ R`` for this layer (cached per layer module,
    shared by every stream of the process; built in float32, returned in ``dtype`` on ``device``)."""
    key = (dim, dtype, str(device))
    with _lock:
        hit = _cache.get(ops.layer, {}).get(key)
    if hit is not None:
        return hit
    weight, bias = ops.key_projection()  # [D_k, D_in], [D_k] | None
    with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable in and outside inference mode
        gen = torch.Generator().manual_seed(SKETCH_SEED + weight.shape[0])
        basis = torch.randn(weight.shape[0], dim, generator=gen) / math.sqrt(dim)  # [D_k, r] float32, CPU
        basis = basis.to(weight.device)
        proj = (weight.detach().float().t() @ basis).to(device=device, dtype=dtype).contiguous()  # [D_in, r]
        shift = None if bias is None else (bias.detach().float() @ basis).to(device=device, dtype=dtype)  # [r]
    with _lock:
        _cache.setdefault(ops.layer, {})[key] = (proj, shift)
    return proj, shift


def key_sketch(ops: LayerOps, h: torch.Tensor, dim: int) -> torch.Tensor:
    """Sketches ``[N, P, r]`` of the pre-rotary keys of ``h [N, P, D_in]`` (the layer's normed input)."""
    proj, shift = sketch_projection(ops, dim, h.dtype, h.device)
    s = h @ proj  # [N, P, r]
    return s + shift if shift is not None else s
