"""Budgets and masks as pure functions: how many tokens each frame keeps, and which.

Every mask is ``[F, T]`` bool over the tokens in their original order; applying it with boolean indexing keeps
that order, and the kept tokens keep their original grid positions.
"""
from __future__ import annotations

import math

import torch


def allocate_budget(change: torch.Tensor, budget: int, tokens: int, minimum: int) -> torch.Tensor:
    """Split ``budget`` tokens over frames in proportion to how much each changed.

    Every frame gets at least ``minimum`` and at most ``tokens``; the rest goes by ``change`` (water-filling
    when a frame hits its cap), rounded with the largest-remainder rule so the total is exact. Frames that all
    have zero change share equally.

    Args:
        change: ``[F]`` non-negative weights (e.g. :func:`pruner.scoring.frame_change`).
        budget: total tokens; must lie in ``[F * minimum, F * tokens]`` (clamp it first).
        tokens: tokens per frame (the cap).
        minimum: floor per frame, ``1 <= minimum <= tokens``.

    Returns:
        ``[F]`` int64 counts summing exactly to ``budget``.
    """
    n = int(change.shape[0])
    if not (1 <= minimum <= tokens) or not (n * minimum <= budget <= n * tokens):
        raise ValueError(
            f"cannot split budget={budget} over {n} frames with minimum={minimum} and cap={tokens}; "
            f"need 1 <= minimum <= cap and {n * minimum} <= budget <= {n * tokens} (clamp the budget first)"
        )
    w = change.detach().double().cpu().clamp_min(0.0)  # [F]
    room = float(tokens - minimum)
    extra = float(budget - n * minimum)
    alloc = _water_fill(w, extra, room)  # [F] float64, sums to extra
    base = alloc.floor()
    left = int(round(extra - base.sum().item()))
    frac = torch.where(base < room, alloc - base, torch.full_like(alloc, -1.0))
    order = torch.argsort(-frac, stable=True)  # largest remainder first, ties by frame index
    base[order[:left]] += 1.0
    return (base + minimum).long()


def _water_fill(w: torch.Tensor, extra: float, room: float) -> torch.Tensor:
    alloc = torch.zeros_like(w)  # [F]
    active = torch.ones_like(w, dtype=torch.bool)
    for _ in range(w.shape[0]):
        remaining = extra - alloc.sum().item()
        weight = torch.where(active, w, torch.zeros_like(w))
        if weight.sum() <= 0:
            weight = active.double()
        share = remaining * weight / weight.sum()
        over = active & (alloc + share > room)
        if not over.any():
            return alloc + share
        alloc[over] = room
        active &= ~over
        if not active.any():
            break
    return alloc


def topk_mask(priority: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep the ``counts[f]`` highest-priority tokens of each frame (ties: lower token index wins).

    Args:
        priority: ``[F, T]`` float, higher = keep first. NaN ranks last.
        counts: ``[F]`` int64 in ``[0, T]``.

    Returns:
        ``[F, T]`` bool with exactly ``counts[f]`` True in row ``f``.
    """
    p = torch.nan_to_num(priority.float(), nan=-math.inf)
    order = torch.argsort(p, dim=1, descending=True, stable=True)  # [F, T]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(p.shape[1], device=p.device).expand_as(order))
    return ranks < counts.to(p.device)[:, None]


def grid_of(positions: torch.Tensor) -> tuple[int, int]:
    """``(rows, cols)`` of a full grid given ``positions`` ``[T, 2]`` (row, col); raises if not a full grid."""
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must have shape [T, 2] (row, col), got {list(positions.shape)}")
    rows, cols = int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1
    flat = positions[:, 0].long() * cols + positions[:, 1].long()
    if positions.min() < 0 or rows * cols != positions.shape[0] or flat.unique().numel() != rows * cols:
        raise ValueError(
            f"positions must cover a full (rows, cols) grid once each; got {positions.shape[0]} positions "
            f"spanning {rows}x{cols}. Pass the adapter's VisualTokens.positions unchanged"
        )
    return rows, cols


def uniform_indices(rows: int, cols: int, k: int) -> torch.Tensor:
    """Flat (row-major) grid cells of an evenly spread ``k``-subset: a strided sub-grid, trimmed evenly to ``k``.

    Returns:
        ``[k]`` int64, ascending, distinct.
    """
    total = rows * cols
    if k >= total:
        return torch.arange(total)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    g_rows = max(1, min(rows, round(math.sqrt(k * rows / cols))))
    g_cols = max(1, min(cols, math.ceil(k / g_rows)))
    while g_rows * g_cols < k:
        g_rows += 1
    r = ((torch.arange(g_rows) + 0.5) * rows / g_rows).long()  # [g_rows] distinct rows
    c = ((torch.arange(g_cols) + 0.5) * cols / g_cols).long()  # [g_cols] distinct cols
    cells = (r[:, None] * cols + c[None, :]).flatten()  # [g_rows * g_cols]
    pick = ((torch.arange(k) + 0.5) * cells.numel() / k).long()  # [k] evenly spaced among candidates
    return cells[pick].sort().values


def uniform_mask(positions: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Uniform spatial subsampling: frame ``f`` keeps ``counts[f]`` tokens on an even sub-grid.

    Args:
        positions: ``[T, 2]`` int64 (row, col) of each token.
        counts: ``[F]`` int64.

    Returns:
        ``[F, T]`` bool (a token is kept when its cell is picked).
    """
    rows, cols = grid_of(positions)
    token_of_cell = torch.empty(rows * cols, dtype=torch.long)
    token_of_cell[positions[:, 0].long().cpu() * cols + positions[:, 1].long().cpu()] = torch.arange(rows * cols)
    mask = torch.zeros(counts.shape[0], rows * cols, dtype=torch.bool)
    for f, k in enumerate(counts.tolist()):
        mask[f, token_of_cell[uniform_indices(rows, cols, int(k))]] = True
    return mask.to(positions.device)
