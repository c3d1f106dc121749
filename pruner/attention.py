"""Attention-based token importance (VisionZip's "dominant tokens"), computed from a SigLIP-style encoder layer.

VisionZip (arXiv 2412.04467) keeps the patches that receive the most attention in the vision tower and merges
the rest into a few contextual tokens. Our pruner's contract is a keep mask, so the ``attention`` policy keeps
the dominant tokens only (no merge). SigLIP has no [CLS] token, so importance is the attention a patch receives,
averaged over heads and queries.

The encoder calls :func:`attention_received` on the layer whose output it projects (LLaVA-OneVision uses the
penultimate layer's output, so pass that layer and its *input*), then :func:`scores_to_tokens` maps the
``P`` patch scores onto the projector's ``T``-token grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.inference_mode()
def attention_received(layer: nn.Module, hidden: torch.Tensor, frames_per_step: int = 4) -> torch.Tensor:
    """Mean attention each patch receives in ``layer`` (over heads and query patches).

    Args:
        layer: a SigLIP-style encoder layer (``layer_norm1``, ``self_attn`` with ``q_proj``, ``k_proj``,
            ``num_heads``, ``head_dim``, ``scale``), e.g. HF ``SiglipEncoderLayer`` / ``Idefics3EncoderLayer``.
        hidden: ``[N, P, D]`` the layer's input hidden states (N frames, P patches).
        frames_per_step: frames per step, bounding the ``[n, heads, P, P]`` attention buffer.

    Returns:
        ``[N, P]`` float32; each row sums to 1 (softmax rows average to a distribution).
    """
    attn = layer.self_attn
    out = []
    for start in range(0, hidden.shape[0], frames_per_step):
        x = layer.layer_norm1(hidden[start:start + frames_per_step])  # [n, P, D]
        n, p, _ = x.shape
        q = attn.q_proj(x).view(n, p, attn.num_heads, attn.head_dim).transpose(1, 2)  # [n, H, P, hd]
        k = attn.k_proj(x).view(n, p, attn.num_heads, attn.head_dim).transpose(1, 2)  # [n, H, P, hd]
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # [n, H, P(query), P(key)]
        out.append(probs.mean(dim=(1, 2)))  # [n, P]
    return torch.cat(out, dim=0)


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
