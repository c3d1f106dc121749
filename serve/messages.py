"""Typed messages between the pipeline stages (vision replica -> LLM replica) and their answers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class EncodedChunk:
    """One chunk's kept visual tokens, ready for the LLM stage.

    Attributes:
        stream_id: the stream it belongs to.
        embeds: ``[K, d]`` kept visual tokens of all frames, frame-major (K = sum(tokens_per_frame)).
        tokens_per_frame: kept tokens of each frame (varies after pruning).
        pts: each frame's time in seconds.
        stats: vision-side numbers for this chunk (``vit_ms``, ``prune_ms``, cache reuse...).
        positions: ``[K, 2]`` int64 (row, col) of every kept token on the frame's token ``grid`` (M-RoPE families
            place kept tokens at their original positions), or ``None``.
        grid: ``(rows, cols)`` of the token grid, or ``None``.
        deepstack: ``[levels, K, d]`` DeepStack features of the kept tokens (Qwen3-VL), or ``None``.
    """

    stream_id: str
    embeds: torch.Tensor
    tokens_per_frame: list[int]
    pts: list[float]
    stats: dict[str, Any] = field(default_factory=dict)
    positions: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    deepstack: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.tokens_per_frame) != len(self.pts):
            raise ValueError(f"{len(self.tokens_per_frame)} frame token counts for {len(self.pts)} pts")
        if self.embeds.ndim != 2 or self.embeds.shape[0] != sum(self.tokens_per_frame):
            raise ValueError(
                f"embeds must be [sum(tokens_per_frame)={sum(self.tokens_per_frame)}, d], got {list(self.embeds.shape)}"
            )
        k = self.embeds.shape[0]
        if self.positions is not None and tuple(self.positions.shape) != (k, 2):
            raise ValueError(f"positions must be [{k}, 2], got {list(self.positions.shape)}")
        if self.deepstack is not None and (self.deepstack.ndim != 3 or self.deepstack.shape[1] != k):
            raise ValueError(f"deepstack must be [levels, {k}, d], got {list(self.deepstack.shape)}")

    def llm_extras(self) -> dict[str, Any]:
        """Per-frame ``positions`` / ``deepstack`` and the ``grid``, as ``adapter.chunk_embeds`` keywords."""
        split = self.tokens_per_frame
        return {
            "positions": None if self.positions is None else list(torch.split(self.positions, split, dim=0)),
            "grid": self.grid,
            "deepstack": None if self.deepstack is None else list(torch.split(self.deepstack, split, dim=1)),
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Ray's transport between the vision and LLM replicas) with ``embeds`` on the CPU: a CUDA tensor
        unpickles only where its device exists, and the LLM replica may sit on another GPU or node, or have no GPU.
        Pickling a CUDA tensor copies it to host memory anyway; the LLM stage moves it to its own device."""
        state = dict(self.__dict__)
        state["embeds"] = self.embeds.detach().cpu()
        return state

    def frames(self) -> list[torch.Tensor]:
        """Per-frame ``[t_i, d]`` views."""
        return list(torch.split(self.embeds, self.tokens_per_frame, dim=0))

    def __repr__(self) -> str:
        return f"EncodedChunk(stream={self.stream_id}, frames={len(self.pts)}, tokens={self.embeds.shape[0]})"


@dataclass
class AnswerStats:
    """Numbers for one answered question."""

    ttft_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0
    context_tokens: int = 0
    kv_tokens: int = 0
    kv_bytes: int = 0
    attended_tokens: int = 0  # KV tokens the question attended to (exact, from the session)
    question_tokens: int = 0  # tokens the question added (exact)
    prompted: bool = False  # the two counts above are filled (the question was placed)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        """What the answer was conditioned on: context attended + question tokens."""
        return self.attended_tokens + self.question_tokens
