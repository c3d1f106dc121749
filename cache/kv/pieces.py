"""Splitting one long prompt piece into consecutive blocks (pure: an ``LLMInput`` in, ``(LLMInput, extent)`` parts out).

A chunk can hold more tokens than one block may (``min(window_tokens, reserve_tokens)``: a block is prefilled in the
reserve and must fit the window afterwards), e.g. eight 196-token frames with the pruner off. Such a chunk is
appended as several blocks in order. Prefilling them one after the other is exact -- attention is causal, each part
attends to the earlier parts (still in the window) and sits at the positions it would have had -- so under the
budget the answer equals a full cache's.

Positions: part ``k`` covers tokens ``[a, b)``; its relative positions are the piece's ``rel[:, a:b]`` minus the
part's offset, and it advances the stream by ``extent_k`` (the next part's offset minus its own). The offset of a part
is the smallest relative position from its first token on, so every part's positions are ``>= 0`` and the absolute
position of every token is what the whole piece would have given it; the extents add up to the piece's extent. With
plain RoPE (``positions is None``) this is just consecutive ranges. M-RoPE parts may overlap in position (a part
cut inside one temporal patch has extent 0): the tokens still sit exactly where the whole piece put them.
"""
from __future__ import annotations

import math

import torch

from stream.models.inputs import LLMInput


def split_piece(piece: LLMInput, max_tokens: int) -> list[tuple[LLMInput, int]]:
    """``piece`` as parts of at most ``max_tokens`` tokens (sizes within one token of each other), with the extent
    each part advances the stream by. A piece that fits is returned whole.

    Raises:
        ValueError: ``max_tokens < 1``, or the piece carries family extras (opaque: they cannot be cut).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    n = piece.tokens
    if n <= max_tokens:
        return [(piece, piece.extent)]
    if piece.extras:
        raise ValueError("a piece with family extras cannot be split (they are opaque to the KV cache)")
    parts = math.ceil(n / max_tokens)
    bounds = [round(i * n / parts) for i in range(parts + 1)]  # [0, ..., n]
    if piece.positions is None:
        return [(LLMInput(piece.embeds[a:b], None, {}, dict(piece.meta)), b - a) for a, b in zip(bounds, bounds[1:])]
    rel = piece.positions  # [R, L]
    suffix_min = torch.flip(torch.cummin(torch.flip(rel.min(dim=0).values, [0]), 0).values, [0])  # [L]
    offsets = [int(suffix_min[a]) for a in bounds[:-1]] + [piece.extent]
    return [(LLMInput(piece.embeds[a:b], rel[:, a:b] - offsets[k], {}, dict(piece.meta)), offsets[k + 1] - offsets[k])
            for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
