"""Pruner: pure scoring/budget functions against brute-force oracles, and the StreamPruner invariants
(chunked == one-shot, exact budgets, keep-all identity, determinism, bounded state)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pruner import PrunerConfig, StreamPruner, available_policies, get_policy
from pruner.budget import allocate_budget, grid_of, topk_mask, uniform_indices, uniform_mask
from pruner.scoring import (
    low_variance_channels,
    running_memory,
    stc_redundancy,
    temporal_dissimilarity,
)
from stream.errors import ConfigError

BW = [0.125, 0.25, 0.5, 1.0, 2.0]


def grid(rows: int, cols: int) -> torch.Tensor:
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], dim=-1)


def video(frames: int = 12, tokens: int = 36, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Slowly drifting tokens with a scene cut in the middle: [F, T, d]."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g)
    out = [(a if f < frames // 2 else b) + 0.3 * torch.randn(tokens, dim, generator=g) for f in range(frames)]
    return torch.stack(out)


def pruner(**cfg) -> StreamPruner:
    return StreamPruner(PrunerConfig.parse(cfg))


# ---------------------------------------------------------------- scoring oracles


def test_low_variance_channels_match_per_frame_sort() -> None:
    x = torch.randn(3, 10, 8) * torch.arange(1, 9).float()  # channel j has std ~ j+1
    got = low_variance_channels(x, 0.5)
    for f in range(3):
        var = [float(x[f, :, j].var(unbiased=False)) for j in range(8)]
        assert got[f].tolist() == sorted(range(8), key=lambda j: var[j])[:4]


def test_running_memory_is_exact_mean_then_bounded_average() -> None:
    means = torch.randn(10, 4)
    before, mem, count = running_memory(means, None, 0, horizon=100)
    torch.testing.assert_close(mem, means.mean(0))
    torch.testing.assert_close(before[0], means[0])  # nothing before the first frame: its own mean
    torch.testing.assert_close(before[5], means[:5].mean(0))
    assert count == 10
    # past the horizon the memory forgets: 200 frames of a new value pull it there
    _, mem2, _ = running_memory(torch.ones(200, 4), mem, count, horizon=10)
    torch.testing.assert_close(mem2, torch.ones(4), atol=1e-6, rtol=0)


def test_running_memory_chunked_equals_one_shot() -> None:
    means = torch.randn(17, 6)
    b_all, m_all, c_all = running_memory(means, None, 0, horizon=5)
    mem, count, parts = None, 0, []
    for s in range(0, 17, 4):
        b, mem, count = running_memory(means[s:s + 4], mem, count, horizon=5)
        parts.append(b)
    torch.testing.assert_close(torch.cat(parts), b_all)
    torch.testing.assert_close(mem, m_all)
    assert count == c_all


def test_stc_redundancy_matches_brute_force() -> None:
    x, memory = torch.randn(2, 6, 8), torch.randn(2, 8)
    got = stc_redundancy(x, memory, BW, 0.5)
    for f in range(2):
        var = x[f].var(0, unbiased=False)
        ch = sorted(range(8), key=lambda j: float(var[j]))[:4]
        feats = [F.normalize(x[f, t, ch], dim=0) for t in range(6)]
        mean = sum(feats) / 6
        mem = F.normalize(memory[f, ch], dim=0)
        for t in range(6):
            want = sum(math.exp(-float(((feats[t] - m) ** 2).sum()) / (2 * a)) for m in (mean, mem) for a in BW)
            assert got[f, t].item() == pytest.approx(want, rel=1e-5)


def test_stc_keeps_the_novel_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 32, generator=g)
    frame = base + 0.01 * torch.randn(20, 32, generator=g)  # 20 near-duplicates
    novel = [3, 8, 15, 19]
    frame[novel] = torch.randn(4, 32, generator=g)
    result = pruner(policy="stc", tokens_per_frame=4).select(frame[None], grid(4, 5))
    assert result.mask[0].nonzero().flatten().tolist() == novel


def test_temporal_dissimilarity_zero_when_static_nan_at_start() -> None:
    x = torch.randn(1, 5, 3).repeat(3, 1, 1)
    d = temporal_dissimilarity(x, None)
    assert torch.isnan(d[0]).all()
    torch.testing.assert_close(d[1:], torch.zeros(2, 5), atol=1e-6, rtol=0)
    assert (temporal_dissimilarity(x, -x[0])[0] > 1.99).all()  # opposite previous frame: 1 - cos = 2
    y, prev = torch.randn(4, 6, 8), torch.randn(6, 8)
    want = 1 - F.cosine_similarity(y, torch.cat([prev[None], y[:-1]]), dim=-1)
    torch.testing.assert_close(temporal_dissimilarity(y, prev), want)


# ---------------------------------------------------------------- budgets and masks


@pytest.mark.parametrize("seed", range(20))
def test_allocate_budget_exact_and_bounded(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, tokens = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(4, 50, (1,), generator=g))
    minimum = int(torch.randint(1, tokens + 1, (1,), generator=g))
    budget = int(torch.randint(n * minimum, n * tokens + 1, (1,), generator=g))
    change = torch.rand(n, generator=g) ** 3 * (torch.rand(n, generator=g) > 0.3)
    counts = allocate_budget(change, budget, tokens, minimum)
    assert int(counts.sum()) == budget
    assert counts.min() >= minimum and counts.max() <= tokens


def test_allocate_budget_favours_change() -> None:
    change = torch.tensor([1.0, 0.0, 0.0, 0.9, 0.0, 0.0])
    counts = allocate_budget(change, budget=60, tokens=36, minimum=2)
    assert counts.tolist()[1:3] == [2, 2] and counts[4:].tolist() == [2, 2]  # static frames: the minimum
    assert counts[0] > counts[3] > 2 and int(counts.sum()) == 60
    equal = allocate_budget(torch.zeros(4), budget=10, tokens=36, minimum=1)
    assert sorted(equal.tolist()) == [2, 2, 3, 3]
    capped = allocate_budget(torch.tensor([100.0, 1.0, 1.0]), budget=50, tokens=20, minimum=1)
    assert capped.tolist() == [20, 15, 15]  # water-filling past the cap


def test_allocate_budget_rejects_infeasible() -> None:
    with pytest.raises(ValueError, match="budget=3 over 2 frames with minimum=2"):
        allocate_budget(torch.ones(2), budget=3, tokens=10, minimum=2)


def test_topk_mask_matches_sort_and_breaks_ties_by_index() -> None:
    p = torch.randn(4, 30)
    counts = torch.tensor([0, 5, 17, 30])
    mask = topk_mask(p, counts)
    for f in range(4):
        want = sorted(range(30), key=lambda t: -float(p[f, t]))[: counts[f]]
        assert mask[f].nonzero().flatten().tolist() == sorted(want)
    tied = topk_mask(torch.zeros(1, 6), torch.tensor([3]))
    assert tied[0].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize(("rows", "cols", "k"), [(14, 14, 49), (14, 14, 50), (8, 8, 16), (8, 8, 5), (3, 7, 20)])
def test_uniform_indices_exact_distinct_spread(rows: int, cols: int, k: int) -> None:
    idx = uniform_indices(rows, cols, k)
    assert idx.numel() == k == idx.unique().numel() and idx.max() < rows * cols
    r, c = idx // cols, idx % cols
    if k >= max(rows, cols) * 2:  # dense enough to touch every quarter of the frame
        for rr in (r < rows / 2, r >= rows / 2):
            for cc in (c < cols / 2, c >= cols / 2):
                assert (rr & cc).any()
    assert uniform_indices(14, 14, 49).tolist() == [r * 14 + c for r in range(1, 14, 2) for c in range(1, 14, 2)]


def test_uniform_mask_follows_positions_and_grid_errors() -> None:
    pos = grid(4, 4).flip(0)  # tokens listed in reverse raster order
    mask = uniform_mask(pos, torch.tensor([4]))
    kept = {tuple(p) for p in pos[mask[0]].tolist()}
    assert kept == {(1, 1), (1, 3), (3, 1), (3, 3)}
    with pytest.raises(ValueError, match="full \\(rows, cols\\) grid"):
        grid_of(torch.tensor([[0, 0], [0, 0]]))


# ---------------------------------------------------------------- StreamPruner invariants

STREAMING = ["stc", "uniform", "random", "temporal_diff", "attention", "keep_all"]


def run_chunks(p: StreamPruner, x: torch.Tensor, size: int, attn: torch.Tensor | None = None) -> torch.Tensor:
    masks = []
    for s in range(0, x.shape[0], size):
        a = None if attn is None else attn[s:s + size]
        pts = [0.5 * f for f in range(s, min(s + size, x.shape[0]))]
        masks.append(p.select(x[s:s + size], grid(6, 6), pts=pts, attention=a).mask)
    return torch.cat(masks)


@pytest.mark.parametrize("policy", STREAMING)
def test_chunked_equals_one_shot(policy: str) -> None:
    x, attn = video(frames=13), torch.rand(13, 36)
    one_shot = run_chunks(pruner(policy=policy, keep_ratio=0.3, seed=3), x, 13, attn)
    for size in (1, 2, 5):
        assert torch.equal(run_chunks(pruner(policy=policy, keep_ratio=0.3, seed=3), x, size, attn), one_shot)


def test_adaptive_state_is_chunk_invariant_and_budget_exact() -> None:
    x = video(frames=12)
    a, b = pruner(policy="stc_adaptive", chunk_budget=40), pruner(policy="stc_adaptive", chunk_budget=40)
    a.select(x, grid(6, 6))
    for s in range(0, 12, 4):
        r = b.select(x[s:s + 4], grid(6, 6))
        assert int(r.counts.sum()) == 40 and r.counts.min() >= 4
    torch.testing.assert_close(a._memory, b._memory)
    torch.testing.assert_close(a._previous, b._previous)


def test_adaptive_static_frames_get_minimum_new_scene_many() -> None:
    g = torch.Generator().manual_seed(0)
    scene_a, scene_b = torch.randn(36, 16, generator=g), torch.randn(36, 16, generator=g)
    x = torch.stack([scene_a] * 4 + [scene_b] * 4)  # frame 4 is a cut, the rest repeat
    for budget, static in ((6 * 2 + 30, [2] * 6), (6 * 2 + 36 + 15, [5, 5, 5, 4, 4, 4])):
        p = pruner(policy="stc_adaptive", chunk_budget=budget, min_tokens_per_frame=2)
        p.select(x[:1], grid(6, 6))  # warm up: the stream has seen scene A
        counts = p.select(x[1:], grid(6, 6)).counts.tolist()  # frames 1..7
        assert sum(counts) == budget
        assert counts[3] == min(36, budget - 12)  # the cut takes everything above the minimums, up to all tokens
        assert counts[:3] + counts[4:] == static  # static frames: the minimum, then an equal share of the rest


def test_adaptive_budget_is_clamped_to_the_minimum() -> None:
    r = pruner(policy="stc_adaptive", chunk_budget=3, min_tokens_per_frame=2).select(video(4), grid(6, 6))
    assert r.counts.tolist() == [2, 2, 2, 2] and r.budget_requested == 3


def test_tokens_per_second_budget_is_exact_over_time() -> None:
    p = pruner(policy="stc_adaptive", tokens_per_second=7.3, min_tokens_per_frame=1)
    x = video(frames=40)
    kept = 0
    for s in range(0, 40, 3):  # 2 fps, ragged chunks
        pts = [0.5 * f for f in range(s, min(s + 3, 40))]
        kept += p.select(x[s:s + 3], grid(6, 6), pts=pts).tokens_kept
    assert kept == math.floor(7.3 * 20.0 + 1e-9)  # 40 frames x 0.5 s, first frame covers one interval
    with pytest.raises(ValueError, match="need pts"):
        pruner(policy="stc_adaptive", tokens_per_second=7.3).select(x[:2], grid(6, 6))


@pytest.mark.parametrize("policy", [p for p in available_policies() if p != "attention"])
def test_fixed_budget_exact_and_order_kept(policy: str) -> None:
    x = video(frames=5)
    r = pruner(policy=policy, tokens_per_frame=7, min_tokens_per_frame=2).select(x, grid(6, 6))
    want = 36 if policy == "keep_all" else 7
    if policy == "stc_adaptive":
        assert int(r.counts.sum()) == 5 * want
    else:
        assert r.counts.tolist() == [want] * 5
    assert (r.mask.sum(1) == r.counts).all()
    for f, kept in enumerate(r.kept(x)):
        idx = r.mask[f].nonzero().flatten()
        assert torch.equal(kept, x[f, idx])  # original order
        assert torch.equal(r.kept_positions(grid(6, 6))[f], grid(6, 6)[idx])  # original positions


def test_budget_clamped_to_frame_and_default_ratio() -> None:
    assert pruner(tokens_per_frame=500).select(video(2), grid(6, 6)).counts.tolist() == [36, 36]
    assert PrunerConfig().frame_budget(196) == 49 and PrunerConfig().frame_budget(64) == 16
    assert PrunerConfig(keep_ratio=0.001).frame_budget(64) == 1


@pytest.mark.parametrize("cfg", [{"policy": "keep_all"}, {"policy": "stc", "enabled": False}])
def test_keep_all_is_identity(cfg: dict) -> None:
    x = video(frames=3)
    r = pruner(**cfg).select(x, grid(6, 6))
    assert r.mask.all() and torch.equal(torch.stack(r.kept(x)), x)


def test_selection_is_deterministic_for_a_seed() -> None:
    x = video(frames=6)
    for policy in ("random", "stc", "temporal_diff", "stc_adaptive"):
        a = pruner(policy=policy, seed=7).select(x, grid(6, 6)).mask
        assert torch.equal(a, pruner(policy=policy, seed=7).select(x, grid(6, 6)).mask)
    assert not torch.equal(pruner(policy="random", seed=7).select(x, grid(6, 6)).mask,
                           pruner(policy="random", seed=8).select(x, grid(6, 6)).mask)


def test_reset_equals_fresh_pruner() -> None:
    x = video(frames=6)
    p = pruner(policy="stc_adaptive")
    first = p.select(x, grid(6, 6)).mask
    p.select(video(frames=6, seed=1), grid(6, 6))
    p.reset()
    assert torch.equal(p.select(x, grid(6, 6)).mask, first)
    assert p.stats()["frames"] == 6 and p.stats()["chunks"] == 1


@pytest.mark.parametrize("policy", ["stc_adaptive", "stc_context"])
def test_state_is_bounded_over_10000_frames(policy: str) -> None:
    adaptive = get_policy(policy).adaptive  # budgets per second are for the adaptive policies
    p = pruner(policy=policy, **({"tokens_per_second": 20.0, "min_tokens_per_frame": 1} if adaptive else {}))
    x = torch.randn(100, 16, 8)
    sizes = set()
    for c in range(100):
        p.select(x, grid(4, 4), pts=[0.1 * (c * 100 + f) for f in range(100)])
        sizes.add(p.state_bytes())
    stats = p.stats()
    assert sizes == {(8 + 16 * 8) * 4}  # memory [d] + previous frame [T, d] (stc_context: also its background), float32
    assert sizes == {get_policy(policy).state_bytes(16, 8, 4)}  # on paper = measured
    assert stats["frames"] == 10_000 and len(stats["recent_chunks"]) == StreamPruner.history
    if adaptive:
        assert stats["tokens_kept"] == pytest.approx(20.0 * 1000, abs=1)


def test_attention_policy_needs_scores_of_the_right_shape() -> None:
    x = video(frames=2)
    with pytest.raises(ConfigError, match="encode_vision_attention"):
        pruner(policy="attention").select(x, grid(6, 6))
    with pytest.raises(ValueError, match=r"\[2, 36\]"):
        pruner(policy="attention").select(x, grid(6, 6), attention=torch.rand(2, 35))
    attn = torch.rand(2, 36)
    r = pruner(policy="attention", tokens_per_frame=5).select(x, grid(6, 6), attention=attn)
    assert torch.equal(r.mask, topk_mask(attn, torch.tensor([5, 5])))


def test_bad_inputs_name_the_problem() -> None:
    p = pruner()
    with pytest.raises(ValueError, match=r"\[frames, tokens, dim\]"):
        p.select(torch.randn(36, 16), grid(6, 6))
    with pytest.raises(ValueError, match=r"positions must have shape \[36, 2\]"):
        p.select(video(2), grid(5, 5))
    p.select(video(2), grid(6, 6), pts=[1.0, 2.0])
    with pytest.raises(ValueError, match="must not go backwards"):
        p.select(video(2), grid(6, 6), pts=[1.5, 3.0])


# ---------------------------------------------------------------- registry and config


def test_registry_names_and_unknown_policy() -> None:
    assert set(available_policies()) >= {"stc", "stc_adaptive", "uniform", "random", "temporal_diff",
                                         "attention", "keep_all"}
    assert get_policy("stc_adaptive").adaptive and not get_policy("stc").adaptive
    with pytest.raises(ConfigError, match="unknown pruning policy 'visionzip'.*stc_adaptive"):
        get_policy("visionzip")


@pytest.mark.parametrize(("cfg", "needle"), [
    ({"policy": "nope"}, "allowed: stc, stc_adaptive"),
    ({"tokens_per_frame": 4, "keep_ratio": 0.5}, "set only one"),
    ({"chunk_budget": 100}, "only applies to adaptive policies"),
    ({"policy": "stc_adaptive", "chunk_budget": 10, "tokens_per_second": 5}, "set only one"),
    ({"policy": "stc_adaptive", "tokens_per_frame": 2, "min_tokens_per_frame": 4}, "below min_tokens_per_frame"),
    ({"bandwidths": [1.0, -2.0]}, "finite and > 0"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"budget": 3}, "unknown key"),
])
def test_config_errors_are_readable(cfg: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        PrunerConfig.parse(cfg, where="pruner")


@pytest.mark.parametrize("horizon", [1, 3])
def test_state_on_paper_is_what_each_policy_holds_in_host_memory(horizon: int) -> None:
    """Every policy's state after a bf16 stream, measured on its tensors, equals ``Policy.state_bytes``; it lives in
    host memory (read once per chunk) and the previous frame is held in the tokens' dtype; at novelty horizon 1
    ``stc_context``'s background is the previous frame, held once."""
    x = video(frames=6, tokens=36, dim=16).to(torch.bfloat16)
    for name in available_policies():
        p = pruner(policy=name, novelty_horizon=horizon)
        attention = torch.rand(6, 36) if get_policy(name).needs_attention else None
        for c in range(3):
            p.select(x[2 * c: 2 * c + 2], grid(6, 6), attention=None if attention is None else attention[:2])
        held = [t for t in (p._memory, p._previous, p._background) if t is not None]
        assert all(t.device.type == "cpu" for t in held), name
        assert p.state_bytes() == get_policy(name).state_bytes(36, 16, 2, horizon), (name, horizon)
        assert p.stats()["state_bytes"] == p.state_bytes()
    held = get_policy("stc_context").state_bytes(36, 16, 2, horizon)
    assert held == 16 * 4 + 36 * 16 * 2 + (0 if horizon == 1 else 36 * 16 * 4)
