"""Pure selection functions of the bounded KV session: what to evict, what to retrieve, where tokens sit.

No state, no config objects: numbers and tensors in, numbers and tensors out.
"""
from __future__ import annotations

from typing import Sequence

import torch


def blocks_to_evict(block_tokens: Sequence[int], window_tokens: int) -> int:
    """How many of the oldest blocks to evict so the remaining ones fit in ``window_tokens``.

    Args:
        block_tokens: token count of each window block, oldest first.
        window_tokens: the window's capacity.
    """
    total = sum(block_tokens)
    count = 0
    while total > window_tokens and count < len(block_tokens):
        total -= block_tokens[count]
        count += 1
    return count


def select_blocks(
    ids: Sequence[int], scores: Sequence[float], tokens: Sequence[int], allowance: int
) -> list[int]:
    """Greedy retrieval: highest score first, skipping blocks that no longer fit ``allowance`` tokens.

    Args:
        ids, scores, tokens: candidate blocks (any order), their scores and token counts.
        allowance: tokens available for retrieved blocks.

    Returns:
        the chosen ids, best first.
    """
    order = sorted(range(len(ids)), key=lambda i: -scores[i])
    chosen, used = [], 0
    for i in order:
        if used + tokens[i] <= allowance:
            chosen.append(ids[i])
            used += tokens[i]
    return chosen


def compact_sink_start(window_start: int, retrieved_tokens: int, sink_tokens: int) -> int:
    """Compact positions: the sinks sit right before the retrieved blocks, which sit right before the window.

    With no eviction yet (``window_start == sink_tokens``, nothing retrieved) this is 0, i.e. the plain layout.
    """
    return max(0, window_start - retrieved_tokens - sink_tokens)


def block_summary(keys: torch.Tensor) -> torch.Tensor:
    """Retrieval vector of one block from its un-rotated keys.

    Args:
        keys: ``[layers, kv_heads, tokens, head_dim]`` keys without RoPE.

    Returns:
        ``[layers * kv_heads * head_dim]`` float32: the mean key of each layer, L2-normalised per layer and scaled
        by ``1/sqrt(layers)``, so an inner product is the mean per-layer cosine similarity.
    """
    mean = keys.float().mean(dim=2)  # [layers, kv_heads, head_dim]
    return _normalise_layers(mean.flatten(1))


def query_summary(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Retrieval vector of a question from its un-rotated queries (or keys), comparable to :func:`block_summary`.

    Args:
        queries: ``[layers, heads, tokens, head_dim]`` without RoPE; ``heads`` may be a multiple of ``kv_heads``
            (grouped-query attention): the query heads sharing one kv head are averaged, which is the mean
            attention logit against that kv head up to a constant.
        kv_heads: number of kv heads.
    """
    layers, heads, _, head_dim = queries.shape
    mean = queries.float().mean(dim=2)  # [layers, heads, head_dim]
    grouped = mean.view(layers, kv_heads, heads // kv_heads, head_dim).mean(dim=2)  # [layers, kv_heads, head_dim]
    return _normalise_layers(grouped.flatten(1))


def _normalise_layers(per_layer: torch.Tensor) -> torch.Tensor:
    """``[layers, dim]`` -> ``[layers * dim]``, unit norm per layer, unit norm overall."""
    unit = per_layer / per_layer.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit / per_layer.shape[0] ** 0.5).flatten()
