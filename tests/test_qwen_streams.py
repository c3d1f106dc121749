"""Qwen2.5-VL / Qwen3-VL streams: a frame-size change mid-stream (cacher, pruner, pipeline) and the ``attention``
pruning policy on the Qwen towers (tiny random-weight configs of the real architectures, offline)."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from cache.cacher import StreamCacher
from cache.config import CacherConfig
from pruner import PrunerConfig, StreamPruner
from stream.frames import FrameBatch
from stream.models import load_adapter, make_tiny_model

QUESTION = "What is the man holding?"


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.stack([(base + rng.integers(0, 60, (h, w, 3))) % 256 for _ in range(n)]).astype(np.uint8)


SIZES = [(300, 420), (420, 300), (150, 200)]  # 6x9 tokens, then 9x6 (same count, other grid), then 5x7 / 5x6


def _chunks() -> list[np.ndarray]:
    return [_frames(4, h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


def test_cacher_starts_new_references_when_the_grid_changes(qwen) -> None:
    """Each new grid begins with a full encode (exact); references never cross grids, even of equal token count."""
    cacher = StreamCacher(CacherConfig(ratio=0.25, max_reuse=None, match_threshold=-1.0, refresh_cell_below=None))
    for i, rgb in enumerate(_chunks()):
        pv = qwen.preprocess(rgb)
        before = cacher.stats()["grid_changes"]
        cached, kinds = [], []
        for j in range(len(pv)):  # one temporal patch per call (Qwen3-VL's runner calls are per patch anyway)
            cached.append(qwen.project(qwen.encode_vision(pv[j:j + 1], layer_runner=cacher.runner)))
            kinds += [k for k, _ in cacher.last_chunk_decisions()]
        cached = cached[0]
        plain = qwen.project(qwen.encode_vision(pv))
        assert cacher.stats()["grid_changes"] - before == (i > 0) and kinds == ["new", "reuse"], (i, kinds)
        assert cacher.last_chunk_stats()["refs_held"] == 1  # the old grid's references are gone
        torch.testing.assert_close(cached.embeds[0], plain.embeds[0], atol=1e-5, rtol=1e-5)  # new grid: exact
        assert cached.grid == plain.grid == qwen.grid(*SIZES[i])
    assert cacher.stats()["grid_changes"] == 2
    # a model change (other layer count) is still refused, with the fix
    pv = qwen.preprocess(_chunks()[0])
    hidden, layers = qwen.vision_embed(pv), qwen.grid_layers(*pv.shape[1:3])
    with pytest.raises(ValueError, match=r"\(layers, tokens, dim\).*Fix: call reset\(\)"):
        cacher.encode(hidden, layers[:-1])


@pytest.mark.parametrize("policy", ["temporal_diff", "stc_context", "stc_adaptive"])
def test_pruner_resets_grid_state_on_a_new_grid(qwen, policy: str) -> None:
    """A chunk on a new grid is pruned as a stream start for the grid-bound state: temporal_diff's masks equal a
    fresh pruner's; every policy keeps its budget, no shape error."""
    tokens = [qwen.encode_frames(rgb) for rgb in _chunks()]
    cfg = PrunerConfig(policy=policy, tokens_per_frame=9, min_tokens_per_frame=4)
    pruner = StreamPruner(cfg)
    pts = 0.0
    for i, vt in enumerate(tokens):
        n = vt.embeds.shape[0]
        result = pruner.select(vt.embeds, vt.positions, pts=[pts + k for k in range(n)])
        assert result.tokens_kept == 9 * n and result.mask.shape == vt.embeds.shape[:2]
        if policy == "temporal_diff" and i > 0:
            fresh = StreamPruner(cfg).select(vt.embeds, vt.positions, pts=[pts + k for k in range(n)])
            assert torch.equal(result.mask, fresh.mask)
        pts += n
    assert pruner.stats()["grid_changes"] == 2
    # same grid again: no reset (temporal_diff compares with the previous frame, unlike a fresh pruner)
    if policy == "temporal_diff":
        vt = tokens[-1]
        again = pruner.select(vt.embeds, vt.positions, pts=[pts, pts + 1])
        assert pruner.stats()["grid_changes"] == 2 and again.tokens_kept == 18


def _hf_inputs(a, chunks: list[np.ndarray], pts: list[np.ndarray]) -> dict:
    """HF's input for temporal patches of mixed sizes: one 2-frame video per temporal patch, each with its grid."""
    ids, rows, grids = [a.stream_prefix_ids()], [], []
    for rgb, p in zip(chunks, pts):
        pv = a.preprocess(rgb)  # [N, r, c, 4, E]
        n, r, c, _, e = pv.shape
        ids.append(a.chunk_placeholder_ids(n, a.patch_pts(p.tolist()), r * c))
        rows.append(pv.reshape(-1, e))
        grids += [[1, 2 * r, 2 * c]] * n
    ids = torch.cat(ids + [a.question_ids(QUESTION)])
    return {"input_ids": ids[None], "mm_token_type_ids": (ids == a.placeholder_id).int()[None] * 2,
            "pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids)}


def test_pipeline_over_a_resolution_change_equals_hf_generate(qwen) -> None:
    """Three chunks of three frame sizes through vision stage -> KV session -> answer == HF generate on the same
    temporal patches (compression off; then the cacher at ratio 1.0); with the default cacher and the pruner on,
    the stream carries on over both changes."""
    from serve.core.options import StreamOptions
    from serve.core.pipeline import StreamPipeline

    chunks = _chunks()
    pts = [np.arange(4 * i, 4 * i + 4) * 0.5 for i in range(len(chunks))]
    inputs = _hf_inputs(qwen, chunks, pts)
    eos = sorted(qwen.eos_token_ids)
    with torch.inference_mode():
        out = qwen.model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                  pad_token_id=qwen.tokenizer.pad_token_id)
    ref = qwen.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    kv = {"policy": "sink_window", "budget_tokens": 4096}
    for cacher, pruner in (({"enabled": False}, {"enabled": False}), ({"ratio": 1.0}, {"enabled": False}),
                           ({}, {"policy": "stc_context", "tokens_per_frame": 9})):
        pipe = StreamPipeline(qwen, StreamOptions.model_validate({"cacher": cacher, "pruner": pruner, "kv": kv}),
                              1 << 30)
        sid = pipe.open("s")
        for i, (rgb, p) in enumerate(zip(chunks, pts)):
            chunk = pipe.push_chunk(sid, FrameBatch(rgb, p, np.arange(4 * i, 4 * i + 4)))
            assert chunk.grid == qwen.grid(*SIZES[i])
        answer = "".join(pipe.ask(sid, QUESTION, 6))
        if not pruner.get("policy"):
            assert answer == ref, (cacher, answer, ref)
        else:
            stats = pipe.vision.stats(sid)
            assert stats.pruner.grid_changes == 2 and stats.cache.grid_changes == 2
            assert stats.tokens_kept == 9 * 6 and answer


def _hf_attention_received(a, pv: torch.Tensor) -> torch.Tensor:
    """Oracle: the last HF block's own qkv, HF's rotary and its cu_seqlens segments -> ``[N, T]`` mean attention
    each token's patches receive (over heads and queries), row-major on the token grid."""
    seen = {}
    block = a.visual.blocks[-1]
    hook = block.register_forward_pre_hook(lambda _m, args, kw: seen.update(x=args[0], **kw), with_kwargs=True)
    try:
        with torch.inference_mode():
            a.encode_vision(pv)
    finally:
        hook.remove()
    rope = importlib.import_module(f"transformers.models.{a.family}.modeling_{a.family}").apply_rotary_pos_emb_vision
    x, cu, (cos, sin) = seen["x"], seen["cu_seqlens"], seen["position_embeddings"]
    n, rows, cols, unit, _ = pv.shape
    p = rows * cols * unit
    with torch.inference_mode():
        h = block.norm1(x)
        q, k, _ = block.attn.qkv(h).reshape(x.shape[0], 3, block.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rope(q, k, cos, sin)  # [N*P, H, hd]
        received = torch.zeros(x.shape[0])
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            logits = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]).float() * block.attn.scaling
            received[s:e] = torch.softmax(logits, -1).sum(dim=(0, 1))  # [seg] summed over heads and queries
    received = received.view(n, p) / (block.attn.num_heads * p)  # [N, P] in the order the blocks see patches
    if a.family == "qwen2_5_vl":
        order, _ = a._window_index(rows, cols)
        received = received.view(n, rows * cols, unit)[:, torch.argsort(order)].reshape(n, p)
    return received.view(n, rows * cols, unit).mean(-1)


@pytest.mark.parametrize("last_windowed", [False, True])
def test_attention_policy_on_qwen_towers_matches_hf_blocks(qwen, tmp_path, last_windowed: bool) -> None:
    a = qwen
    if last_windowed:  # a Qwen2.5-VL tower whose last block is window-local
        if qwen.family != "qwen2_5_vl":
            pytest.skip("only Qwen2.5-VL has windowed blocks")
        a = load_adapter(str(make_tiny_model(tmp_path / "w", "qwen2_5_vl", vision_overrides={
            "fullatt_block_indexes": [1]})))
        assert a.grid_layers(6, 9)[-1].windows is not None
    rgb = _frames(4, 300, 420)  # 6 x 9 tokens: two windows per row band
    pv = a.preprocess(rgb)
    feats, scores = a.encode_vision_attention(pv)
    torch.testing.assert_close(feats, a.encode_vision(pv))  # the features are the plain tower's
    vt = a.project(feats)
    tokens = a.attention_tokens(scores, vt.grid)  # [N, T]
    torch.testing.assert_close(tokens, _hf_attention_received(a, pv), atol=1e-6, rtol=1e-4)
    assert tokens.shape == vt.embeds.shape[:2] and (tokens.std(dim=1) > 0).all()
    # end to end: the vision stage keeps the tokens that receive the most attention
    from serve.core.options import StreamOptions
    from serve.core.stages import VisionStage

    opts = StreamOptions.model_validate({"cacher": {"enabled": False},
                                         "pruner": {"policy": "attention", "tokens_per_frame": 7}})
    stage = VisionStage(a, opts)
    stage.open("s")
    chunk = stage.encode("s", FrameBatch(rgb, np.arange(4) * 0.5, np.arange(4)))
    top = torch.topk(tokens, 7, dim=1).indices
    for f in range(2):
        got = chunk.positions[7 * f: 7 * f + 7]
        assert sorted((got[:, 0] * vt.grid[1] + got[:, 1]).tolist()) == sorted(top[f].tolist())


def test_attention_policy_on_a_tower_without_layer_ops_fails_at_open(qwen) -> None:
    """A tower whose last layer has no per-layer ops is refused when the stream opens (4xx), naming the layer."""
    from serve.core.options import StreamOptions
    from serve.core.stages import VisionStage
    from stream.errors import RequestError
    from stream.models.base import VLMAdapter

    class Opaque(type(qwen)):
        check_attention = VLMAdapter.check_attention  # the family-neutral check on the raw HF blocks

    a = Opaque.__new__(Opaque)
    a.__dict__.update(qwen.__dict__)
    opts = StreamOptions.model_validate({"cacher": {"enabled": False}, "pruner": {"policy": "attention"}})
    stage = VisionStage(a, opts)
    block = type(qwen.visual.blocks[-1]).__name__
    with pytest.raises(RequestError, match=rf"pruner.policy='attention': the last vision layer \({block}\) has no "
                                           r"per-layer ops.*choose another pruning policy"):
        stage.open("s")
    assert stage.streams() == []
    stage.open("t", opts.merged({"pruner": {"policy": "uniform"}}))  # other policies open fine


@pytest.mark.parametrize("family,layers", [("qwen2_5_vl", 8), ("qwen3_vl", 9)])
def test_bench_pruner_family_runs_its_own_checks(family: str, layers: int, media_dir, capsys) -> None:
    """``bench_pruner.py --family``: real-shape Qwen blocks (fewer of them), M-RoPE LLM input; the script's own
    checks pass (keep_all is the identity on the 3-row input, cached == one-shot, exact budgets)."""
    import json

    from benchmarks import bench_pruner

    bench_pruner.main(["--family", family, "--video", str(media_dir / "vtest.avi"), "--llm-shape", "tiny",
                       "--vision-layers", str(layers), "--max-pixels", str(64 * 28 * 28), "--frames", "4",
                       "--chunk", "2", "--repeats", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    t = out["tokens_per_frame"]
    assert out["family"] == family and out["pruner_frames"] == 2 and out["grid"][0] * out["grid"][1] == t
    assert out["budget_per_frame"] == round(t / 4) and out["tokens_kept"] == 2 * out["budget_per_frame"]
    assert out["seq_len_full"] - out["seq_len_pruned"] == 2 * (t - out["budget_per_frame"])
    assert out["kl_mean"] >= 0 and out["kl_random"] >= 0 and out["vision_tower"]["layers"] == layers


def test_window_aware_selection_takes_whole_changed_windows() -> None:
    """In a window-local layer the recompute budget goes to whole windows, most changed first, then the least
    similar other tokens; exactly k tokens; tokens below the threshold always; full attention is unchanged."""
    from cache.stc import select_tokens

    groups = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)  # 3 windows of 4 tokens
    sim = torch.tensor([[0.9, 0.9, 0.9, 0.2,  0.5, 0.5, 0.5, 0.5,  0.99, 0.99, 0.99, 0.99]])
    # token-level: the 6 least similar are window 1 and token 3 + one of window 0
    plain = set(select_tokens(sim, 0.5, None).flatten().tolist())
    assert plain == {3, 4, 5, 6, 7} | (plain & {0, 1, 2}) and len(plain) == 6
    got = select_tokens(sim, 0.5, None, groups).flatten().tolist()  # k = 6: window 1 (mean change .5) whole,
    assert len(got) == 6 and set(got) >= {4, 5, 6, 7, 3}  # then window 0 does not fit: its least similar tokens
    got = select_tokens(sim, 0.7, None, groups).flatten().tolist()  # k = 9: windows 1 and 0 whole, then one more
    assert len(got) == 9 and set(got) >= set(range(8))
    # a token below the threshold is always recomputed, even outside the whole windows
    sim2 = sim.clone()
    sim2[0, 9] = 0.1
    got = set(select_tokens(sim2, 0.4, 0.15, groups).flatten().tolist())  # k = 5
    assert 9 in got and len(got) == 5 and {4, 5, 6, 7} <= got
    torch.testing.assert_close(select_tokens(sim, 1.0, None, groups).sort().values, torch.arange(12)[None])
