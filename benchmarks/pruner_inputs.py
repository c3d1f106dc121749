"""Prefill inputs of ``bench_pruner.py`` for every family: a pruned stream's kept tokens and the sequence fed to
the LLM (1-D RoPE, or Qwen's 3-row M-RoPE positions with DeepStack extras), and the M-RoPE of a scaled LLM shape."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from stream.models.base import VLMAdapter


def mrope_overrides(family: str, shape: dict) -> dict:
    """The family's M-RoPE for an LLM shape: the real ``mrope_section`` scaled to its head dim."""
    if not shape:
        return {}  # tiny: the tiny model's own sections
    hd = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    if family == "qwen2_5_vl":  # Qwen2.5-VL-7B: [16, 24, 24] of head_dim 128
        return {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                    "mrope_section": [hd // 8, 3 * hd // 16, 3 * hd // 16]}}
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,  # Qwen3-VL-8B
                                "mrope_section": [3 * hd // 16, 5 * hd // 32, 5 * hd // 32]}}



@dataclass
class Kept:
    """One stream's pruned frames: per frame the kept tokens ``[k, d]``, their (row, col) ``[k, 2]`` and their rows
    of every family extra ``[k, ...]`` (e.g. Qwen3-VL's DeepStack levels; opaque here)."""

    embeds: list[torch.Tensor]
    positions: list[torch.Tensor]
    extras: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    tokens: int = 0
    select_s: np.ndarray = field(default_factory=lambda: np.zeros(2))


@dataclass
class Seq:
    """A prefill sequence: embeddings ``[L, d]``, absolute M-RoPE positions ``[3, L]`` (``None``: 1-D RoPE,
    ``0..L-1``), the next position after it, and the video piece's family decoder inputs (``extras``, opaque: they
    belong to the tokens after the first ``prefix`` ones, so a sequence with extras is prefilled in two forwards)."""

    embeds: torch.Tensor
    positions: torch.Tensor | None
    extent: int
    extras: dict = field(default_factory=dict)
    prefix: int = 0

    def equal(self, other: "Seq") -> bool:
        same = torch.equal(self.embeds, other.embeds) and self.extent == other.extent
        same &= (self.positions is None) == (other.positions is None)
        same &= self.positions is None or torch.equal(self.positions, other.positions)
        return same and all(torch.equal(v, other.extras[k]) for k, v in self.extras.items())


def forward(adapter: VLMAdapter, seq: Seq, q: torch.Tensor, cache, after_video: bool = False) -> torch.Tensor:
    """Prefill ``seq`` + question ``q`` ``[Lq, d]`` (or only ``q`` on top of a cached ``seq``) -> last logits."""
    pos = None
    if seq.positions is not None:
        tail = torch.arange(seq.extent, seq.extent + q.shape[0], device=seq.positions.device).expand(3, -1)
        pos = (tail if after_video else torch.cat([seq.positions, tail], dim=1))[:, None]  # [3, 1, L]
    if after_video:
        return adapter.llm.forward(q[None], cache=cache, position_ids=pos)[0, -1]
    emb = torch.cat([seq.embeds, q])
    if not seq.extras:
        return adapter.llm.forward(emb[None], cache=cache, position_ids=pos)[0, -1]
    cache = cache if cache is not None else DynamicCache()  # the prefix first: the extras are the piece's
    p = seq.prefix
    adapter.llm.forward(emb[None, :p], cache=cache, position_ids=None if pos is None else pos[..., :p])
    return adapter.llm.forward(emb[None, p:], cache=cache, position_ids=None if pos is None else pos[..., p:],
                               **seq.extras)[0, -1]
