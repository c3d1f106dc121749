"""Registry of selection policies: STC (fixed and adaptive budgets) and the baselines it is compared with.

A policy turns a chunk's tokens and per-frame counts into a keep mask. Counts (fixed or adaptive) and the
stream state (memory mean, previous frame) are supplied by :class:`pruner.stream.StreamPruner`, so policies stay
pure functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pruner.budget import topk_mask, uniform_mask
from pruner.scoring import herding_fill, motion_dissimilarity, smooth_on_grid, stc_redundancy, temporal_dissimilarity
from stream.errors import ConfigError


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may read besides the tokens.

    Attributes:
        positions: ``[T, 2]`` int64 (row, col) grid position of each token.
        frame_index: ``[F]`` int64 index of each frame in the stream (since the last reset).
        seed: seed of random choices.
        bandwidths: Gaussian kernel bandwidths.
        channel_keep: fraction of lowest-variance channels scored on.
        memory_before: ``[F, d]`` memory mean each frame is compared with (policies with ``uses_memory``).
        previous: ``[T, d]`` frame before this chunk, ``None`` at stream start (policies with ``uses_previous``).
        attention: ``[F, T]`` attention each token received (policies with ``needs_attention``).
        novel_share: ``stc_context``: share of each frame's budget spent on the most novel tokens.
        motion_radius: ``stc_context``: novelty compares a token with the tokens of ``background`` within this
            many grid cells (0: the same position only).
        novelty_smooth: ``stc_context``: novelty is averaged over this many grid cells around each token.
        background: ``[F, T, d]`` what each frame's novelty is measured against (policies with
            ``uses_background``): the previous frame or a per-position running memory; NaN rows at stream start.
    """

    positions: torch.Tensor
    frame_index: torch.Tensor
    seed: int = 0
    bandwidths: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    channel_keep: float = 0.5
    memory_before: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    novel_share: float = 0.3
    motion_radius: int = 1
    novelty_smooth: int = 2
    background: torch.Tensor | None = None


SelectFn = Callable[[torch.Tensor, torch.Tensor, PolicyContext], torch.Tensor]


@dataclass(frozen=True)
class Policy:
    """One registered policy. ``select(embeds [F,T,d], counts [F], ctx) -> mask [F,T] bool``."""

    name: str
    description: str
    select: SelectFn
    adaptive: bool = False
    uses_memory: bool = False
    uses_previous: bool = False
    needs_attention: bool = False
    uses_background: bool = False

    def state_bytes(self, tokens: int, dim: int, element_size: int, novelty_horizon: int = 1) -> int:
        """Bytes of a stream's pruner state once it has seen a frame of ``tokens`` x ``dim`` tokens of
        ``element_size`` bytes: the running memory ``[d]`` (float32), the previous frame ``[T, d]`` (the tokens'
        dtype) and the per-position background ``[T, d]`` (float32; at ``novelty_horizon`` 1 it is the previous
        frame and not held twice), as this policy uses them; constant in the stream length
        (``StreamPruner.state_bytes`` measures it)."""
        shared = self.uses_background and novelty_horizon == 1
        previous = tokens * dim * element_size if self.uses_previous or shared else 0
        background = tokens * dim * 4 if self.uses_background and not shared else 0
        return 4 * dim * int(self.uses_memory) + previous + background


def _stc(embeds: torch.Tensor, counts: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
    if ctx.memory_before is None:
        raise ValueError("the stc policies need ctx.memory_before [F, d] (StreamPruner supplies it)")
    redundancy = stc_redundancy(embeds, ctx.memory_before, list(ctx.bandwidths), ctx.channel_keep)  # [F, T]
    return topk_mask(-redundancy, counts)


def _stc_context(embeds: torch.Tensor, counts: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
    """``novel_share`` of the budget on the most novel tokens (what changed since the previous frame: an object
    that appeared or moved; STC's frame/memory novelty for the stream's first frame), the rest on context tokens
    chosen by mean matching (:func:`herding_fill`), so the kept set still represents the whole frame."""
    novel = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)  # [F, T]
    k = (counts.float() * ctx.novel_share).round().long().clamp(max=counts)  # [F]
    if ctx.novel_share > 0:
        if ctx.memory_before is None or ctx.background is None:
            raise ValueError("stc_context needs ctx.memory_before [F, d] and ctx.background [F, T, d] "
                             "(StreamPruner supplies them)")
        score = motion_dissimilarity(embeds, ctx.background, ctx.positions, ctx.motion_radius)  # [F, T], NaN row
        # at the stream's start
        score = smooth_on_grid(score, ctx.positions, ctx.novelty_smooth)  # regions over isolated tokens
        if torch.isnan(score[:, 0]).any():  # the first frame has nothing before it: STC's novelty instead
            first = -stc_redundancy(embeds[:1], ctx.memory_before[:1], list(ctx.bandwidths), ctx.channel_keep)
            score[0] = first[0]
        novel = topk_mask(score, k)
    return herding_fill(embeds, novel.to(embeds.device), counts)


def _uniform(embeds: torch.Tensor, counts: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
    return uniform_mask(ctx.positions, counts).to(embeds.device)


def random_priority(frame_index: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """``[F, T]`` random priorities; frame ``i``'s row depends only on ``(seed, i)``, never on chunking."""
    rows = []
    for idx in frame_index.tolist():
        gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + int(idx)) % (2**63))
        rows.append(torch.rand(tokens, generator=gen))
    return torch.stack(rows) if rows else torch.zeros(0, tokens)


def _random(embeds: torch.Tensor, counts: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
    return topk_mask(random_priority(ctx.frame_index, embeds.shape[1], ctx.seed), counts).to(embeds.device)


def _temporal_diff(embeds: torch.Tensor, counts: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
    dissim = temporal_dissimilarity(embeds, ctx.previous)  # [F, T], NaN row for the stream's first frame
    mask = topk_mask(dissim, counts)
    first = torch.isnan(dissim[:, 0])
    if first.any():  # nothing to compare with: spread the budget evenly instead of taking the top rows
        mask[first] = uniform_mask(ctx.positions, counts[first]).to(mask.device)
    return mask


def _attention(embeds: torch.Tensor, counts: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
    if ctx.attention is None:
        raise ConfigError(
            "policy 'attention' needs per-token attention scores [F, T]: compute them in the encoder with "
            "the model adapter's encode_vision_attention + attention_tokens and pass attention=...; or choose another policy"
        )
    if ctx.attention.shape != embeds.shape[:2]:
        raise ValueError(
            f"attention scores must have shape {list(embeds.shape[:2])} ([frames, tokens]), got "
            f"{list(ctx.attention.shape)}; map patch scores with the adapter's attention_tokens"
        )
    return topk_mask(ctx.attention, counts)


def _keep_all(embeds: torch.Tensor, counts: torch.Tensor, ctx: PolicyContext) -> torch.Tensor:
    return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)


_REGISTRY: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("stc", "STC: keep tokens least similar to their frame mean and the memory mean; fixed per frame",
               _stc, uses_memory=True),
        Policy("stc_adaptive", "STC scores; a chunk budget spread over frames by how much each frame changed",
               _stc, adaptive=True, uses_memory=True, uses_previous=True),
        Policy("stc_context", "default: part of the budget on STC's most novel tokens, the rest on context tokens "
               "that keep the kept set's mean at the frame's mean (herding)", _stc_context, uses_memory=True,
               uses_previous=True, uses_background=True),
        Policy("uniform", "uniform spatial subsampling on an even sub-grid (the keep-mask form of pooling)",
               _uniform),
        Policy("random", "random tokens per frame, seeded by (seed, frame index)", _random),
        Policy("temporal_diff", "EVS-style: keep tokens least similar to the same position in the previous frame",
               _temporal_diff, uses_previous=True),
        Policy("attention", "VisionZip-style dominant tokens: most attention received in the vision tower",
               _attention, needs_attention=True),
        Policy("keep_all", "identity: keep every token", _keep_all),
    )
}


def available_policies() -> list[str]:
    """Names accepted by :func:`get_policy` and ``PrunerConfig.policy``."""
    return list(_REGISTRY)


def get_policy(name: str) -> Policy:
    """The registered policy ``name``; unknown names raise :class:`ConfigError` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown pruning policy {name!r}; allowed: {', '.join(_REGISTRY)}. Fix: set pruner.policy to one of them"
        ) from None
