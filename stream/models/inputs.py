"""The typed LLM input of one piece of a stream (its prompt prefix, a chunk, a question): the adapter -> KV boundary.

A piece is a run of input embeddings plus, for families whose rotary positions are not simply ``0, 1, 2, ...``
(Qwen2.5-VL / Qwen3-VL's 3-row M-RoPE: time, height, width), the position of every token *relative to the piece's
first position*. The KV session adds the stream's next position to every row, so a piece never needs to know where
in the stream it lands, and after the piece the next position advances by :attr:`LLMInput.extent` (Qwen: the largest
relative position + 1, which for a video chunk is less than its token count). Families with 1-D RoPE leave
``positions`` as ``None`` (``arange(L)``, extent ``L``).

A family may need more decoder inputs than embeddings and positions (Qwen3-VL's DeepStack features of the visual
tokens, with the mask saying which tokens they belong to). They travel in ``extras``: keyword arguments of the
family's ``TextLM.forward``, built by the adapter and read by that family's decoder only. The KV session, the
engine and the scheduler pass them through unread (a piece with extras runs as a batch of one, whole).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class LLMInput:
    """One piece of LLM input.

    Attributes:
        embeds: ``[L, d]`` input embeddings.
        positions: ``[R, L]`` int64 rotary positions relative to the piece's first position (``R`` = 1 for plain
            RoPE, 3 for M-RoPE); ``None`` = ``arange(L)`` in every row.
        extras: the family's extra decoder inputs (keywords of its ``TextLM.forward``), opaque to everything else;
            empty for most families.
        meta: reported with the block when it is retrieved (``pts``, frame token counts...).
    """

    embeds: torch.Tensor
    positions: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeds.ndim != 2:
            raise ValueError(f"LLMInput.embeds must be [tokens, d], got {list(self.embeds.shape)}")
        n = self.embeds.shape[0]
        if self.positions is not None:
            p = self.positions
            if p.ndim != 2 or p.shape[1] != n or p.dtype != torch.long:
                raise ValueError(f"LLMInput.positions must be int64 [rows, {n}], got {p.dtype} {list(p.shape)}")
            if n and int(p.min()) < 0:
                raise ValueError("LLMInput.positions are relative to the piece's start and must be >= 0")

    @property
    def tokens(self) -> int:
        """Token count ``L``."""
        return int(self.embeds.shape[0])

    @property
    def extent(self) -> int:
        """How far the piece advances the stream's next rotary position (``L`` for plain RoPE)."""
        if self.positions is None or not self.tokens:
            return self.tokens
        return int(self.positions.max()) + 1

    def position_rows(self, rows: int) -> torch.Tensor:
        """``[rows, L]`` relative positions (a 1-D piece is broadcast to every row)."""
        if self.positions is None:
            return torch.arange(self.tokens, device=self.embeds.device).expand(rows, -1)
        if self.positions.shape[0] == rows:
            return self.positions
        if self.positions.shape[0] == 1:
            return self.positions.expand(rows, -1)
        raise ValueError(f"LLMInput has {self.positions.shape[0]} position rows; the model uses {rows}")

    def __repr__(self) -> str:
        rows = "1-D" if self.positions is None else f"{self.positions.shape[0]} rows"
        ex = "".join(f", {k}={list(v.shape)}" for k, v in self.extras.items())
        return f"LLMInput(tokens={self.tokens}, positions={rows}, extent={self.extent}{ex})"
