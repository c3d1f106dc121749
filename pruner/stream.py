"""``StreamPruner``: one stream's pruning state (bounded) and one call per chunk.

State, whatever the stream length: the running memory mean ``[d]`` and its counter, the previous frame ``[T, d]``
(only for policies that compare with it), the last pts and a fractional token credit (per-second budgets), and
summaries of the last :attr:`StreamPruner.history` chunks.

A chunk on another token grid than the previous one (Qwen: frames of another size mid-stream) starts the new grid
cleanly: the previous frame (grid-bound) is dropped, so the new grid's first frame is treated as a stream start;
the grid-free state (memory mean, pts, token credit, statistics) carries on.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pruner.budget import allocate_budget
from pruner.config import PrunerConfig
from pruner.policies import PolicyContext, get_policy
from pruner.scoring import background_memory, frame_change, running_memory


@dataclass(frozen=True, eq=False)
class PruneResult:
    """The keep decision for one chunk.

    Attributes:
        mask: ``[F, T]`` bool; True = keep. Kept tokens keep their order and their grid positions.
        counts: ``[F]`` int64 tokens kept per frame (``mask.sum(1)``).
        budget_requested: tokens the budget asked for in this chunk, before clamping to what the frames allow.
    """

    mask: torch.Tensor
    counts: torch.Tensor
    budget_requested: int

    @property
    def tokens_in(self) -> int:
        return int(self.mask.numel())

    @property
    def tokens_kept(self) -> int:
        return int(self.counts.sum())

    def kept(self, embeds: torch.Tensor) -> list[torch.Tensor]:
        """``embeds`` ``[F, T, d]`` -> per-frame kept tokens ``[counts[f], d]`` (for ``adapter.chunk_embeds``)."""
        return [embeds[f][self.mask[f]] for f in range(self.mask.shape[0])]

    def kept_positions(self, positions: torch.Tensor) -> list[torch.Tensor]:
        """``positions`` ``[T, 2]`` -> per-frame ``[counts[f], 2]`` original (row, col) of the kept tokens."""
        return [positions[self.mask[f].to(positions.device)] for f in range(self.mask.shape[0])]

    def __repr__(self) -> str:
        return f"PruneResult(frames={self.mask.shape[0]}, kept={self.tokens_kept}/{self.tokens_in})"


class StreamPruner:
    """Prunes one stream's projected visual tokens chunk by chunk.

    Policies with per-frame budgets (all but ``stc_adaptive``) give the same masks whether a stream is fed in one
    call or cut into chunks of any size; ``stc_adaptive`` spends a budget per chunk, so its split depends on the
    chunk by design (its scores and state do not).

    Args:
        config: the pruning config; ``enabled=False`` behaves as ``keep_all``.
    """

    history: int = 64

    def __init__(self, config: PrunerConfig | None = None) -> None:
        self.config = config if config is not None else PrunerConfig()
        self.policy = get_policy(self.config.policy if self.config.enabled else "keep_all")
        self.reset()

    def reset(self) -> None:
        """Forget the stream: memory, previous frame, pts, credit and statistics."""
        self._memory: torch.Tensor | None = None  # [d]
        self._memory_count = 0
        self._previous: torch.Tensor | None = None  # [T, d]
        self._grid: tuple[int, int, int] | None = None  # (T, rows, cols) of the last chunk's token grid
        self._grid_changes = 0
        self._background: torch.Tensor | None = None  # [T, d] per-position running memory (stc_context)
        self._background_count = 0
        self._last_pts: float | None = None
        self._credit = 0.0
        self._frames = 0
        self._chunks = 0
        self._tokens_in = 0
        self._tokens_kept = 0
        self._recent: deque[dict[str, Any]] = deque(maxlen=self.history)

    @torch.inference_mode()
    def select(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        pts: Sequence[float] | torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
    ) -> PruneResult:
        """Choose the tokens to keep in one chunk and advance the stream state.

        Args:
            embeds: ``[F, T, d]`` projected visual tokens of F frames, in stream order.
            positions: ``[T, 2]`` int64 (row, col) of each token on the projector's grid.
            pts: ``[F]`` seconds; required by ``tokens_per_second`` budgets, otherwise only checked and recorded.
            attention: ``[F, T]`` attention each token received (``attention`` policy only).

        Returns:
            :class:`PruneResult` with the ``[F, T]`` keep mask and per-frame counts.
        """
        pts_t = self._check(embeds, positions, pts)
        n, t = embeds.shape[:2]
        self._follow_grid(positions, n)
        # 1. context: memory each frame is compared with, previous frame, global frame indices
        ctx = self._context(embeds, positions, attention)
        # 2. how many tokens each frame keeps
        counts, requested = self._counts(embeds, pts_t)
        # 3. which ones
        mask = self.policy.select(embeds, counts, ctx) if n else torch.zeros(0, t, dtype=torch.bool)
        # 4. advance the state and the statistics
        if (self.policy.uses_previous or self._shares_background) and n:
            self._previous = embeds[-1].detach().to("cpu", copy=True)  # [T, d] in the tokens' dtype (exact)
        if pts_t is not None and n:
            self._last_pts = float(pts_t[-1])
        self._frames += n
        result = PruneResult(mask=mask, counts=mask.sum(dim=1).long().cpu(), budget_requested=requested)
        self._record(result)
        return result

    def _follow_grid(self, positions: torch.Tensor, n: int) -> None:
        """Drop the grid-bound state (previous frame, per-position background) when this chunk's grid differs."""
        if n == 0:
            return
        t = positions.shape[0]
        grid = (t, int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1) if t else (0, 0, 0)
        if self._grid is not None and grid != self._grid:
            self._previous = None
            self._background, self._background_count = None, 0
            self._grid_changes += 1
        self._grid = grid

    def _check(
        self, embeds: torch.Tensor, positions: torch.Tensor, pts: Sequence[float] | torch.Tensor | None
    ) -> torch.Tensor | None:
        if embeds.ndim != 3:
            raise ValueError(f"embeds must have shape [frames, tokens, dim], got {list(embeds.shape)}")
        n, t = embeds.shape[:2]
        if positions.shape != (t, 2):
            raise ValueError(f"positions must have shape [{t}, 2] (row, col per token), got {list(positions.shape)}")
        if pts is None:
            if self.config.tokens_per_second is not None and self.policy.adaptive:
                raise ValueError("tokens_per_second budgets need pts [frames] (seconds); pass pts=...")
            return None
        pts_t = torch.as_tensor(pts, dtype=torch.float64).flatten().cpu()
        if pts_t.numel() != n or not torch.isfinite(pts_t).all():
            raise ValueError(f"pts must hold {n} finite seconds (one per frame), got {pts_t.tolist()}")
        prev = pts_t if self._last_pts is None else torch.cat([torch.tensor([self._last_pts]), pts_t])
        if (prev.diff() < 0).any():
            raise ValueError(f"pts must not go backwards (last seen {self._last_pts}), got {pts_t.tolist()}")
        return pts_t

    def _context(
        self, embeds: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor | None
    ) -> PolicyContext:
        n = embeds.shape[0]
        memory_before, background = None, None
        if self.policy.uses_background and n:
            shared = self._shares_background  # horizon 1: the background is the previous frame, held once
            background, kept, self._background_count = background_memory(
                embeds.detach(), self._previous if shared else self._background, self._background_count,
                self.config.novelty_horizon,
            )
            self._background = None if shared else kept.cpu()
        if self.policy.uses_memory and n:
            frame_means = embeds.detach().float().mean(dim=1)  # [F, d]
            memory_before, memory, self._memory_count = running_memory(
                frame_means, self._memory, self._memory_count, self.config.memory_frames
            )
            self._memory = memory.cpu()
        return PolicyContext(
            positions=positions,
            frame_index=torch.arange(self._frames, self._frames + n),
            seed=self.config.seed,
            bandwidths=tuple(self.config.bandwidths),
            channel_keep=self.config.channel_keep,
            memory_before=memory_before,
            previous=self._previous,
            attention=attention,
            novel_share=self.config.novel_share,
            motion_radius=self.config.motion_radius,
            novelty_smooth=self.config.novelty_smooth,
            background=background,
        )

    def _counts(self, embeds: torch.Tensor, pts: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        n, t = embeds.shape[:2]
        if not self.policy.adaptive:
            k = t if self.policy.name == "keep_all" else self.config.frame_budget(t)
            return torch.full((n,), k, dtype=torch.long), n * k
        requested = self._chunk_budget(n, t, pts)
        if n == 0:
            return torch.zeros(0, dtype=torch.long), requested
        minimum = min(self.config.min_tokens_per_frame, t)
        budget = max(n * minimum, min(n * t, requested))
        change = frame_change(embeds, self._previous)  # [F]
        return allocate_budget(change, budget, t, minimum), requested

    def _chunk_budget(self, n: int, t: int, pts: torch.Tensor | None) -> int:
        cfg = self.config
        if cfg.chunk_budget is not None:
            return cfg.chunk_budget if n else 0
        if cfg.tokens_per_second is None:
            return n * cfg.frame_budget(t)
        if n == 0 or pts is None:
            return 0
        if self._last_pts is None:  # the stream's first frame covers one typical interval (1 s when unknown)
            first = float(pts.diff().median()) if n > 1 else 1.0
            seconds = first + float(pts[-1] - pts[0])
        else:
            seconds = float(pts[-1]) - self._last_pts
        self._credit += cfg.tokens_per_second * seconds
        budget = math.floor(self._credit + 1e-9)
        self._credit -= budget
        return budget

    def _record(self, result: PruneResult) -> None:
        self._chunks += 1
        self._tokens_in += result.tokens_in
        self._tokens_kept += result.tokens_kept
        self._recent.append({
            "frames": int(result.mask.shape[0]),
            "tokens_in": result.tokens_in,
            "tokens_kept": result.tokens_kept,
            "kept_per_frame": result.counts.tolist(),
            "budget_requested": result.budget_requested,
        })

    def stats(self) -> dict[str, Any]:
        """Totals since the last reset and per-chunk summaries of the last :attr:`history` chunks."""
        return {
            "policy": self.policy.name,
            "frames": self._frames,
            "chunks": self._chunks,
            "tokens_in": self._tokens_in,
            "tokens_kept": self._tokens_kept,
            "kept_ratio": self._tokens_kept / self._tokens_in if self._tokens_in else 1.0,
            "grid_changes": self._grid_changes,
            "recent_chunks": list(self._recent),
            "state_bytes": self.state_bytes(),
        }

    @property
    def _shares_background(self) -> bool:
        return self.policy.uses_background and self.config.novelty_horizon == 1

    def state_bytes(self) -> int:
        """Host bytes of the tensor state (memory mean, previous frame, background); constant in the stream length
        (``Policy.state_bytes`` on paper)."""
        return sum(x.numel() * x.element_size() for x in (self._memory, self._previous, self._background)
                   if x is not None)
