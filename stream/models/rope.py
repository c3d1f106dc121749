"""Rotary position helpers for moving cached keys to new positions.

HF decoders store keys *after* RoPE. A bounded session needs to move some keys (the attention sinks, retrieved
blocks, the window on a re-base) to other positions, and stores offloaded keys *without* RoPE ("canonical"). RoPE is
a rotation ``R(p)`` per channel pair, so ``R(p2) R(-p1) k`` moves a key from position ``p1`` to ``p2`` exactly (up
to float rounding). These functions reproduce the ``rotate_half`` convention of Llama / Qwen2 (channel ``i`` is
paired with ``i + head_dim/2``) and compute angles as HF does (``position * inv_freq`` in float32), so a key rotated
here to position ``p`` matches the key the model computes at ``p``.
"""
from __future__ import annotations

import torch

from stream.errors import ConfigError

# rope types whose inv_freq does not depend on the sequence length (a fixed rotation per position)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_inv_freq(decoder: torch.nn.Module, head_dim: int) -> torch.Tensor:
    """The decoder's rotary inverse frequencies ``[head_dim / 2]`` float32 (CPU).

    Raises:
        ConfigError: the decoder has no ``rotary_emb``, uses a length-dependent rope type, or rotates only part of
            each head (partial rotary) -- bounded sessions cannot move such keys.
    """
    rotary = getattr(decoder, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise ConfigError(
            f"{type(decoder).__name__} has no rotary_emb.inv_freq; the KV session supports RoPE decoders "
            "(Llama, Qwen2, Mistral...). Fix: use a RoPE-based language model."
        )
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ConfigError(
            f"rope_type {rope_type!r} changes frequencies with the sequence length; KV sessions support "
            f"{list(STATIC_ROPE_TYPES)}. Fix: use a model with a static rope type."
        )
    if 2 * inv_freq.numel() != head_dim:
        raise ConfigError(
            f"partial rotary embeddings ({2 * inv_freq.numel()} of {head_dim} channels) are not supported by "
            "KV sessions. Fix: use a model that rotates whole heads (Llama, Qwen2)."
        )
    return inv_freq.detach().float().cpu()


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, head_dim]`` to ``positions`` ``[T]`` (int; negative = inverse rotation).

    Computed in float32, returned in ``x.dtype``. ``apply_rope(apply_rope(k, p), -p) == k`` up to rounding.
    """
    cos, sin = _cos_sin(positions.to(x.device), inv_freq)  # [T, hd]
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)  # rotate_half
    return (x32 * cos + rotated * sin).to(x.dtype)


def move_rope(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move keys ``[..., T, hd]`` rotated at positions ``src`` ``[T]`` to positions ``dst`` ``[T]``.

    Un-rotates then rotates (two float32 passes, one cast), so the result uses the same angles HF uses at ``dst``.
    """
    x32 = apply_rope(x.float(), -src, inv_freq)
    return apply_rope(x32, dst, inv_freq).to(x.dtype)
