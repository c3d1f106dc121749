"""The default pruning policy ``stc_context``: novel tokens + context tokens chosen by mean matching (herding)."""
from __future__ import annotations

import itertools

import pytest
import torch

from pruner import PrunerConfig, StreamPruner
from pruner.scoring import herding_fill


def grid(rows: int, cols: int) -> torch.Tensor:
    return torch.tensor([(r, c) for r in range(rows) for c in range(cols)], dtype=torch.long)


def _brute_force_herding(x: torch.Tensor, chosen: list[int], k: int) -> list[int]:
    """Oracle: add, k times, the token whose addition puts the kept mean closest to the frame mean."""
    mu, sel = x.mean(0), list(chosen)
    for _ in range(k - len(sel)):
        best = min((i for i in range(len(x)) if i not in sel),
                   key=lambda i: float((x[sel + [i]].mean(0) - mu).norm()))
        sel.append(best)
    return sorted(sel)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_herding_equals_brute_force_greedy(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 5, generator=g, dtype=torch.float64).float()
    chosen = torch.zeros(2, 12, dtype=torch.bool)
    chosen[0, [3, 7]] = True
    counts = torch.tensor([6, 4])
    mask = herding_fill(x, chosen, counts)
    assert mask.sum(1).tolist() == [6, 4] and bool((mask | ~chosen).all())  # exact counts, a superset
    for f in range(2):
        want = _brute_force_herding(x[f], chosen[f].nonzero().flatten().tolist(), int(counts[f]))
        assert mask[f].nonzero().flatten().tolist() == want


def test_herding_keeps_the_mean_better_than_random_subsets() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 16, generator=g) + torch.linspace(0, 3, 64)[None, :, None]
    mask = herding_fill(x, torch.zeros(1, 64, dtype=torch.bool), torch.tensor([16]))
    err = float((x[0][mask[0]].mean(0) - x[0].mean(0)).norm())
    rand = [float((x[0][torch.randperm(64, generator=g)[:16]].mean(0) - x[0].mean(0)).norm()) for _ in range(50)]
    assert err < min(rand)


def _planted_video(frames: int = 8, planted: tuple[int, ...] = (3, 4, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    """A static textured background ``[F, 64, 16]`` with an object (8 tokens, very different) in some frames."""
    g = torch.Generator().manual_seed(0)
    bg = torch.randn(64, 16, generator=g)
    x = (bg[None] + 0.05 * torch.randn(frames, 64, 16, generator=g)).clone()
    obj = torch.zeros(frames, 64, dtype=torch.bool)
    for k, f in enumerate(planted):
        cells = [9 + k + r * 8 + c for r in range(2) for c in range(4)]  # a 2x4 block moving right
        x[f, cells] = 3.0 + torch.randn(len(cells), 16, generator=g)
        obj[f, cells] = True
    return x, obj


SAME_PLACE = {"novel_share": 0.4, "motion_radius": 0, "novelty_smooth": 0}  # stc_context before issue 13


def _masks(policy: str, x: torch.Tensor, chunk: int = 4, **extra) -> torch.Tensor:
    p = StreamPruner(PrunerConfig(policy=policy, keep_ratio=0.25, **extra))
    return torch.cat([p.select(x[s:s + chunk], grid(8, 8)).mask for s in range(0, len(x), chunk)])


def test_default_policy_keeps_the_planted_object() -> None:
    assert PrunerConfig().policy == "stc_context"
    x, obj = _planted_video()
    kept = {p: (_masks(p, x) & obj).sum(1) for p in ("random", "uniform")}  # [F] object tokens kept
    kept["stc_context"] = (_masks("stc_context", x, **SAME_PLACE) & obj).sum(1)
    # same-position novelty, unsmoothed (the grid-smoothed default is tested on a 14x14 grid in
    # test_pruner_novelty.py; on this 8x8 grid its 5x5 window is wider than the object). 16 kept per frame, round(0.4 * 16) = 6 of them novel: where the object appears on a static background, all
    # 6 are object tokens; when it moves, the uncovered background changed as much and takes some of them
    assert kept["stc_context"][3] == 6 and (kept["stc_context"][[4, 5]] >= 4).all()
    recall = {p: float(k.sum() / obj.sum()) for p, k in kept.items()}
    assert recall["stc_context"] >= 2 * recall["uniform"] and recall["stc_context"] > 1.9 * recall["random"]


@pytest.mark.parametrize("chunks", [(8,), (1,) * 8, (3, 5), (2, 2, 4)])
def test_chunked_equals_one_shot(chunks: tuple[int, ...]) -> None:
    x, _ = _planted_video()
    whole = StreamPruner(PrunerConfig()).select(x, grid(8, 8)).mask
    p, parts, s = StreamPruner(PrunerConfig()), [], 0
    for n in chunks:
        parts.append(p.select(x[s:s + n], grid(8, 8)).mask)
        s += n
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_novel_share_bounds(share: float) -> None:
    x, obj = _planted_video()
    r = StreamPruner(PrunerConfig(novel_share=share, tokens_per_frame=16)).select(x, grid(8, 8))
    assert r.counts.tolist() == [16] * 8
    if share == 0.0:  # context only: the planted frames keep the tokens that stand for the whole frame
        ctx = herding_fill(x, torch.zeros(8, 64, dtype=torch.bool), torch.full((8,), 16))
        assert torch.equal(r.mask, ctx)


def test_novel_share_is_validated() -> None:
    from stream.errors import ConfigError

    with pytest.raises(ConfigError, match="novel_share"):
        PrunerConfig.parse({"novel_share": 1.5})
    assert list(itertools.islice(PrunerConfig.model_fields, 0, None)).count("novel_share") == 1
