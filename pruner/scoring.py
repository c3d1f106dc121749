"""Token scores as pure tensor functions (no state, no config objects).

STC-style redundancy (arXiv 2512.00891): a token is redundant when it looks like its frame's mean and like the
stream's memory mean; we keep the least similar (most novel) ones. Similarity is a sum of Gaussian kernels on
L2-normalised features restricted to the lowest-variance channels of the frame. Differences from STC's reference
code, on purpose: the channel subset is chosen per frame (not per chunk) and the memory is updated per frame with
a bounded running mean, so a frame's score never depends on how the stream was cut into chunks.

Temporal difference (EVS-style): a token is redundant when it looks like the token at the same grid position in
the previous frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def low_variance_channels(embeds: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices of the ``round(d * keep)`` (at least 1) channels with the lowest variance over each frame's tokens.

    Args:
        embeds: ``[F, T, d]``.

    Returns:
        ``[F, c]`` int64, ascending variance (ties broken by channel index).
    """
    d = embeds.shape[-1]
    c = max(1, min(d, round(d * keep)))
    var = embeds.float().var(dim=1, unbiased=False)  # [F, d]
    order = torch.argsort(var, dim=1, stable=True)  # [F, d]
    return order[:, :c]


def running_memory(
    frame_means: torch.Tensor, memory: torch.Tensor | None, count: int, horizon: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scan a bounded running mean over frames: ``m += (x - m) / min(n, horizon)``.

    Exact mean of the first ``horizon`` frames, then an exponential average with momentum ``1 - 1/horizon``;
    the state is one ``[d]`` vector and a counter whatever the stream length.

    Args:
        frame_means: ``[F, d]`` per-frame mean features, in stream order.
        memory: ``[d]`` memory before the first of these frames, or ``None`` after a reset.
        count: frames already folded into ``memory`` (0 after a reset).
        horizon: the bound N (>= 1).

    Returns:
        ``(before [F, d], memory [d], count)``: ``before[f]`` is the memory frame ``f`` is scored against (its own
        mean when nothing came before it), then the updated memory and counter.
    """
    before = torch.empty_like(frame_means)  # [F, d]
    m = None if memory is None else memory.to(frame_means)
    for f in range(frame_means.shape[0]):
        x = frame_means[f]  # [d]
        before[f] = x if m is None else m
        count += 1
        m = x.clone() if m is None else m + (x - m) / min(count, horizon)
    return before, (memory if m is None else m), count


def stc_redundancy(
    embeds: torch.Tensor, memory_before: torch.Tensor, bandwidths: list[float], channel_keep: float
) -> torch.Tensor:
    """STC redundancy of every token: kernel similarity to its frame mean + to the memory mean.

    Args:
        embeds: ``[F, T, d]`` projected visual tokens.
        memory_before: ``[F, d]`` memory mean each frame is compared with (see :func:`running_memory`).
        bandwidths: Gaussian kernel bandwidths.
        channel_keep: fraction of lowest-variance channels scored on.

    Returns:
        ``[F, T]`` float32; higher = more redundant (keep the lowest).
    """
    x = embeds.float()
    ch = low_variance_channels(x, channel_keep)  # [F, c]
    sub = F.normalize(x.gather(2, ch[:, None, :].expand(-1, x.shape[1], -1)), dim=-1)  # [F, T, c] unit rows
    frame_mean = sub.mean(dim=1)  # [F, c]
    mem = F.normalize(memory_before.float().to(x.device).gather(1, ch), dim=-1)  # [F, c]
    targets = torch.stack([frame_mean, mem], dim=1)  # [F, 2, c]
    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y with |x| = 1: one batched matmul instead of [F, T, c] temporaries
    dist_sq = 1.0 + targets.pow(2).sum(-1)[:, None, :] - 2.0 * torch.bmm(sub, targets.transpose(1, 2))  # [F, T, 2]
    dist_sq = dist_sq.clamp_min(0.0)
    return sum(torch.exp(-dist_sq / (2.0 * a)) for a in bandwidths).sum(dim=-1)  # [F, T]


def temporal_dissimilarity(embeds: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """``1 - cos`` between each token and the token at the same position in the previous frame.

    Args:
        embeds: ``[F, T, d]``.
        previous: ``[T, d]`` frame before ``embeds[0]``, or ``None`` (start of stream).

    Returns:
        ``[F, T]`` in ``[0, 2]``; row 0 is NaN when ``previous`` is ``None`` (nothing to compare with).
    """
    x = embeds.float()
    norms = x.norm(dim=-1).clamp_min(1e-8)  # [F, T]
    cos = (x[1:] * x[:-1]).sum(-1) / (norms[1:] * norms[:-1])  # [F-1, T] frame f vs f-1
    if previous is None:
        first = torch.full_like(norms[:1], float("nan"))  # [1, T]
    else:
        p = previous.float().to(x.device)  # [T, d]
        first = ((x[0] * p).sum(-1) / (norms[0] * p.norm(dim=-1).clamp_min(1e-8)))[None]  # [1, T]
    return 1.0 - torch.cat([first, cos], dim=0)  # [F, T]


def neighbourhood(positions: torch.Tensor, radius: int) -> torch.Tensor:
    """``[T, T]`` bool: token ``j`` lies within ``radius`` grid cells of token ``i`` (Chebyshev distance) for
    ``positions [T, 2]`` (row, col)."""
    pos = positions.long()
    return (pos[:, None, :] - pos[None, :, :]).abs().amax(dim=-1) <= radius  # [T, T]


def background_memory(
    embeds: torch.Tensor, background: torch.Tensor | None, count: int, horizon: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scan a bounded per-position running mean of the tokens: ``m += (x - m) / min(n, horizon)``.

    With ``horizon = 1`` it is the previous frame; larger horizons remember the scene longer, so an object that
    appeared a few frames ago still differs from it (it is not absorbed after one frame). State: one ``[T, d]``.

    Args:
        embeds: ``[F, T, d]`` in stream order.
        background: ``[T, d]`` memory before the first of these frames, or ``None`` after a reset.
        count: frames already folded into ``background``.
        horizon: the bound (>= 1).

    Returns:
        ``(before [F, T, d], background [T, d], count)``: ``before[f]`` is what frame ``f`` is compared with (NaN
        for a stream's first frame: nothing came before it), then the updated memory and counter.
    """
    x = embeds.float()
    before = torch.empty_like(x)  # [F, T, d]
    m = None if background is None else background.float().to(x.device)
    for f in range(x.shape[0]):
        before[f] = float("nan") if m is None else m
        count += 1
        m = x[f].clone() if m is None or min(count, horizon) == 1 else m + (x[f] - m) / min(count, horizon)
    return before, (background if m is None else m), count


def motion_dissimilarity(
    embeds: torch.Tensor, before: torch.Tensor, positions: torch.Tensor, radius: int
) -> torch.Tensor:
    """Motion-compensated novelty: ``1 - max cos`` between each token and the tokens of ``before`` (what its frame
    is compared with: the previous frame or a background memory) within ``radius`` grid cells of its position.

    A camera that pans shifts the background by a few cells, so a background token still finds its match nearby
    and scores low; something that was not there before (an object that appeared) finds none. With ``radius = 0``
    and the previous frame as ``before`` it equals :func:`temporal_dissimilarity`.

    Args:
        embeds: ``[F, T, d]``.
        before: ``[F, T, d]``; a frame whose row is NaN has nothing to compare with.
        positions: ``[T, 2]`` grid (row, col) of each token.
        radius: search radius in cells (>= 0).

    Returns:
        ``[F, T]`` in ``[0, 2]``; NaN rows where ``before`` is NaN.
    """
    x = F.normalize(embeds.float(), dim=-1)  # [F, T, d]
    missing = torch.isnan(before[:, 0, 0])  # [F]
    ref = F.normalize(torch.nan_to_num(before.float().to(x.device)), dim=-1)  # [F, T, d]
    near = neighbourhood(positions, radius).to(x.device)  # [T, T]
    cos = torch.bmm(x, ref.transpose(1, 2)).masked_fill(~near, float("-inf"))  # [F, T, T]
    out = 1.0 - cos.amax(dim=-1)  # [F, T]
    out[missing] = float("nan")
    return out


def smooth_on_grid(score: torch.Tensor, positions: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of ``score [F, T]`` over each token's ``(2 radius + 1)^2`` grid neighbourhood (cells that exist):
    a change that covers a region (an object) keeps its score, an isolated one (noise, an edge under camera
    motion) is diluted. ``radius = 0`` returns ``score``. NaN rows stay NaN."""
    if radius <= 0:
        return score
    near = neighbourhood(positions, radius).to(score.device).float()  # [T, T]
    return (score @ near.T) / near.sum(dim=1)  # [F, T]


CHANGE_FLOOR = 1e-5  # float32 cosine noise of identical frames is ~1e-7; below this a frame counts as static


def frame_change(embeds: torch.Tensor, previous: torch.Tensor | None, first: float = 1.0) -> torch.Tensor:
    """How much each frame changed: mean over tokens of :func:`temporal_dissimilarity`.

    Values under :data:`CHANGE_FLOOR` are set to exactly 0, so rounding noise never steers a budget.

    Args:
        embeds: ``[F, T, d]``.
        previous: ``[T, d]`` or ``None``; the first frame of a stream gets ``first`` (1.0 = unrelated content,
            i.e. a new scene).

    Returns:
        ``[F]`` float32 >= 0; a static frame is ~0.
    """
    change = temporal_dissimilarity(embeds, previous).mean(dim=1)  # [F]
    change = torch.nan_to_num(change, nan=first)
    return torch.where(change < CHANGE_FLOOR, torch.zeros_like(change), change)


def herding_fill(embeds: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grow each frame's ``chosen`` set to ``counts`` tokens so the kept tokens' mean stays at the frame's mean.

    Greedy mean matching (kernel herding with a linear kernel): each step adds the token that brings the mean of
    the kept set closest to the mean of all tokens, ``argmin_i |S + x_i - (n + 1) mu|^2``, using a ``[T, T]`` Gram
    matrix, so a step costs O(T). These are the "context" tokens: they stand for the tokens that are dropped, and
    they compensate the drift of tokens picked for another reason (e.g. the most novel ones).

    Args:
        embeds: ``[F, T, d]`` tokens.
        chosen: ``[F, T]`` bool, tokens already kept (counted in the mean).
        counts: ``[F]`` int64 tokens each frame keeps in total (>= chosen per frame, <= T).

    Returns:
        ``[F, T]`` bool mask with ``counts[f]`` tokens per frame, a superset of ``chosen``.
    """
    x = embeds.float()
    mask = chosen.clone().to(x.device)  # [F, T]
    gram = torch.bmm(x, x.transpose(1, 2))  # [F, T, T]
    to_mean = gram.mean(dim=2)  # [F, T]  x_i . mu
    diag = gram.diagonal(dim1=1, dim2=2)  # [F, T]  |x_i|^2
    n = mask.sum(dim=1).float()  # [F] tokens kept so far
    acc = torch.bmm(gram, mask.float()[:, :, None])[:, :, 0]  # [F, T]  x_i . S
    todo = counts.to(x.device).long() - mask.sum(dim=1)  # [F] tokens still to add
    rows = torch.arange(x.shape[0], device=x.device)
    for _ in range(int(todo.max()) if todo.numel() else 0):  # one step for every frame at once
        active = todo > 0  # [F]
        score = diag + 2.0 * (acc - (n + 1)[:, None] * to_mean)  # [F, T]
        score = score.masked_fill(mask, float("inf"))
        pick = score.argmin(dim=1)  # [F]
        r, i = rows[active], pick[active]
        mask[r, i] = True
        acc[r] += gram[r, :, i]
        n[r] += 1
        todo[r] -= 1
    return mask
