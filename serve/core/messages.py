"""Typed messages between the stages (vision replica -> LLM replica -> whoever asked): chunks and answers.

Numbers travel as the models of :mod:`serve.core.stats`; an answer streams as text pieces and :class:`AnswerStats`
snapshots (:data:`AnswerItem`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import torch

from serve.core.stats import ChunkStats


@dataclass(eq=False)
class EncodedChunk:
    """One chunk's kept visual tokens, ready for the LLM stage.

    Attributes:
        stream_id: the stream it belongs to.
        embeds: ``[K, d]`` kept visual tokens of all frames, frame-major (K = sum(tokens_per_frame)).
        tokens_per_frame: kept tokens of each frame (varies after pruning).
        pts: each frame's time in seconds.
        stats: the vision stage's numbers for this chunk.
        positions: ``[K, 2]`` int64 (row, col) of every kept token on the frame's token ``grid`` (M-RoPE families
            place kept tokens at their original positions), or ``None``.
        grid: ``(rows, cols)`` of the token grid, or ``None``.
        extras: the family's per-token extras of the kept tokens, each ``[K, ...]`` (e.g. Qwen3-VL's DeepStack
            ``[K, levels, d]``); opaque here, read by the model adapter only.
    """

    stream_id: str
    embeds: torch.Tensor
    tokens_per_frame: list[int]
    pts: list[float]
    stats: ChunkStats = field(default_factory=ChunkStats)
    positions: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

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
        for name, x in self.extras.items():
            if x.ndim < 1 or x.shape[0] != k:
                raise ValueError(f"extra {name!r} must be [{k}, ...] (one row per kept token), got {list(x.shape)}")

    def llm_extras(self) -> dict[str, Any]:
        """Per-frame ``positions`` and ``extras`` and the ``grid``, as ``adapter.chunk_embeds`` keywords."""
        split = self.tokens_per_frame
        return {
            "positions": None if self.positions is None else list(torch.split(self.positions, split, dim=0)),
            "grid": self.grid,
            "extras": {name: list(torch.split(x, split, dim=0)) for name, x in self.extras.items()},
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Ray's transport between the vision and LLM replicas) with ``embeds`` on the CPU: a CUDA tensor
        unpickles only where its device exists, and the LLM replica may sit on another GPU or node, or have no GPU.
        Pickling a CUDA tensor copies it to host memory anyway; the LLM stage moves it to its own device."""
        state = dict(self.__dict__)
        state["embeds"] = self.embeds.detach().cpu()
        state["extras"] = {name: x.detach().cpu() for name, x in self.extras.items()}
        return state

    def frames(self) -> list[torch.Tensor]:
        """Per-frame ``[t_i, d]`` views."""
        return list(torch.split(self.embeds, self.tokens_per_frame, dim=0))

    def __repr__(self) -> str:
        return f"EncodedChunk(stream={self.stream_id}, frames={len(self.pts)}, tokens={self.embeds.shape[0]})"


@dataclass
class AnswerStats:
    """Numbers for one answered question. An answer's items carry two snapshots: one once the question was placed
    (``prompted``: the exact prompt counts, before the first piece) and the last one (``done``)."""

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
    done: bool = False  # the answer ended (the last snapshot of an answer)
    total_ms: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        """What the answer was conditioned on: context attended + question tokens."""
        return self.attended_tokens + self.question_tokens


AnswerItem = Union[str, AnswerStats]
"""What an answer streams: text pieces, and :class:`AnswerStats` snapshots (prompted, then done)."""


def text_of(items: Iterable[AnswerItem]) -> str:
    """The answer's text: its pieces joined (the stats snapshots left out)."""
    return "".join(item for item in items if isinstance(item, str))
