"""The family-neutral per-layer API the STC cacher (``cache/stc.py``) calls, so it never touches HF module names.

A vision layer is ``x -> x + attn(norm1(x)) -> + mlp(norm2(.))``. :class:`LayerOps` exposes its pieces for a
subset of query tokens ``idx`` ``[N, k]`` against all ``P`` keys:

* ``norm1(x)``, ``keys(h)`` (every token, rotary applied where the family has it), ``keys_at(h_sel, idx)`` (only
  those tokens), ``key_projection()`` (the pre-rotary key weights, for :mod:`cache.sketch`), ``queries(h_sel, idx)``,
  ``values(h_sel)``, ``attend(q, k, v, idx)`` (the block's own attention, window-local where the block is
  windowed, then its output projection), ``mlp_residual(x)`` (``x + mlp(norm2(x))``), and ``finish(out)``
  (called with the layer's output; Qwen3-VL records DeepStack levels there).
* ``token_groups(P)``: the attention window of each token where the layer attends locally (the STC cacher then
  recomputes whole windows first, see :func:`cache.stc.select_tokens`), ``None`` for full attention.
* ``attention_received(x)``: the attention each patch receives in this layer, averaged over heads and queries
  (VisionZip's dominant-token score, for the ``attention`` pruning policy), from the same pieces;
  :func:`scores_to_tokens` maps those patch scores onto the projector's token grid.

:func:`layer_ops` returns a layer's ops: ``layer.stc_ops()`` when the layer provides it (the Qwen adapters' grid-bound
blocks), else SigLIP-style ops for ``SiglipEncoderLayer`` / ``Idefics3EncoderLayer`` (LLaVA-OneVision, SmolVLM).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_SIGLIP_ATTRS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
_SIGLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale")


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    n, t, d = x.shape  # [N, T, D]
    return x.view(n, t, heads, d // heads).transpose(1, 2)  # [N, H, T, D/H]


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, t, hd = x.shape  # [N, H, T, D/H]
    return x.transpose(1, 2).reshape(n, t, h * hd)  # [N, T, D]


class LayerOps:
    """Base: the SigLIP-style layer (separate q/k/v projections, no rotary, full attention)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.layer_norm1(x)

    def keys(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, P, D]`` keys of every token."""
        return self.layer.self_attn.k_proj(h)

    def keys_at(self, h_sel: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``[N, k, D]`` keys of the tokens at ``idx`` ``[N, k]`` only (rotary at those positions)."""
        return self.layer.self_attn.k_proj(h_sel)

    def key_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight [D_k, D_in], bias [D_k] | None)`` of the keys before any rotary (the sketch's source)."""
        proj = self.layer.self_attn.k_proj
        return proj.weight, proj.bias

    def queries(self, h_sel: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``[N, k, D]`` queries of the tokens at ``idx`` ``[N, k]``."""
        return self.layer.self_attn.q_proj(h_sel)

    def values(self, h_sel: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attn.v_proj(h_sel)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Attention of ``q [N, k, D]`` over ``k, v [N, P, D]``, then the output projection -> ``[N, k, D]``."""
        attn = self.layer.self_attn
        h = attn.num_heads
        o = F.scaled_dot_product_attention(split_heads(q, h), split_heads(k, h), split_heads(v, h), scale=attn.scale)
        return attn.out_proj(merge_heads(o))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer.mlp(self.layer.layer_norm2(x))

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        return out

    @property
    def num_heads(self) -> int:
        return int(self.layer.self_attn.num_heads)

    @property
    def attn_scale(self) -> float:
        return float(self.layer.self_attn.scale)

    def token_groups(self, p: int) -> torch.Tensor | None:
        """``[P]`` int64 attention window of each token when the layer attends locally; ``None`` = full attention."""
        return None

    def attention_mask(self, idx: torch.Tensor, p: int) -> torch.Tensor | None:
        """``[N, 1, k, P]`` bool: which keys the queries at ``idx`` ``[N, k]`` see; ``None`` = all (full attention)."""
        wid = self.token_groups(p)
        if wid is None:
            return None
        wid = wid.to(idx.device)
        return wid[idx][:, None, :, None] == wid[None, None, None, :]

    def attention_received(self, x: torch.Tensor, frames_per_step: int = 4) -> torch.Tensor:
        """``[N, P, D]`` layer input -> ``[N, P]`` float32 mean attention each patch receives (over heads and
        queries; rows of a full-attention layer sum to 1). ``frames_per_step`` bounds the ``[n, H, P, P]`` buffer."""
        out = []
        for start in range(0, x.shape[0], frames_per_step):
            xs = x[start:start + frames_per_step]  # [n, P, D]
            n, p, _ = xs.shape
            idx = torch.arange(p, device=xs.device).expand(n, -1)  # [n, P]
            h = self.norm1(xs)
            q, k = split_heads(self.queries(h, idx), self.num_heads), split_heads(self.keys(h), self.num_heads)
            logits = (q @ k.transpose(-1, -2)).float() * self.attn_scale  # [n, H, P(query), P(key)]
            mask = self.attention_mask(idx, p)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            out.append(torch.softmax(logits, dim=-1).mean(dim=(1, 2)))  # [n, P]
        return torch.cat(out, dim=0)


def layer_ops(layer: nn.Module, index: int = 0) -> LayerOps:
    """The ops of one vision layer; ``TypeError`` naming what is missing when the layer is not supported."""
    if hasattr(layer, "stc_ops"):
        return layer.stc_ops()
    missing = [a for a in _SIGLIP_ATTRS if not hasattr(layer, a)]
    attn = getattr(layer, "self_attn", None)
    missing += [f"self_attn.{a}" for a in _SIGLIP_ATTN if attn is not None and not hasattr(attn, a)]
    if missing:
        raise TypeError(
            f"vision layer {index} ({type(layer).__name__}) lacks {missing}; the STC cacher supports SigLIP-style "
            "layers (SiglipEncoderLayer, Idefics3EncoderLayer) and layers with stc_ops() (the Qwen adapters). "
            "Fix: disable the cache for this model."
        )
    return LayerOps(layer)


def scores_to_tokens(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Map patch scores ``[N, P]`` (a square patch grid) onto a token grid ``(rows, cols)`` by area averaging.

    Matches how the projector pools patches into tokens: 27x27 -> 14x14 for LLaVA-OneVision (bilinear pooling),
    32x32 -> 8x8 for SmolVLM (4x4 pixel shuffle, exact blocks). Token order is row-major, like ``positions``.

    Returns:
        ``[N, rows * cols]`` float32.
    """
    n, p = scores.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"patch scores must come from a square patch grid, got P={p} patches")
    if grid == (side, side):
        return scores.float()
    x = scores.float().view(n, 1, side, side)  # [N, 1, side, side]
    return F.adaptive_avg_pool2d(x, grid).view(n, grid[0] * grid[1])  # [N, T]
