"""Qwen2.5-VL and Qwen3-VL: our preprocessing, windowed tower, M-RoPE positions and streamed prompt against the HF model itself
(tiny random-weight config of the real architecture, offline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from cache.kv import KVConfig, LLMEngine
from stream.models import load_adapter
from stream.models.inputs import LLMInput
from stream.models.qwen_parts import frames_to_patches, smart_resize

QUESTION = "What is the man holding?"


def _pts(n_frames: int) -> list[float]:
    return [0.5 * i for i in range(n_frames)]


def _frames(n: int, h: int = 150, w: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.stack([(base + rng.integers(0, 60, (h, w, 3))) % 256 for _ in range(n)]).astype(np.uint8)


def _hf_inputs(a, rgb: np.ndarray, question: str = QUESTION) -> dict:
    """What the HF processor builds for a stream of 2-frame videos: ids, mm_token_type_ids, pixels, grids."""
    pv = a.preprocess(rgb)  # [N, r, c, 4, E]
    n, r, c, _, e = pv.shape
    pts = a.patch_pts(_pts(len(rgb)))
    ids = torch.cat([a.stream_prefix_ids(), a.chunk_placeholder_ids(n, pts, r * c), a.question_ids(question)])
    return {"input_ids": ids[None], "mm_token_type_ids": (ids == a.placeholder_id).int()[None] * 2,
            "pixel_values_videos": pv.reshape(-1, e), "video_grid_thw": torch.tensor([[1, 2 * r, 2 * c]] * n)}


def _ours(a, rgb: np.ndarray, chunks: int = 1, flat_positions: bool = False) -> torch.Tensor:
    """Prefix, chunks (each an LLMInput at the stream's next position), question; logits of the question."""
    cache, pos = DynamicCache(), 0
    prefix = a.llm.embed(a.stream_prefix_ids())
    a.llm.forward(prefix[None], cache, position_ids=torch.arange(len(prefix)).expand(3, 1, -1))
    pos = len(prefix)
    for idx in np.array_split(np.arange(len(rgb) // 2), chunks):
        frames = rgb[2 * idx[0]: 2 * idx[-1] + 2]
        vt = a.encode_frames(frames)
        extras = {name: list(x) for name, x in vt.extras.items()}  # per temporal patch [T, ...]
        piece = a.chunk_embeds(list(vt.embeds), a.patch_pts(_pts(len(rgb))[2 * idx[0]: 2 * idx[-1] + 2]),
                               grid=vt.grid, extras=extras)
        rel = piece.position_rows(3) if not flat_positions else torch.arange(piece.tokens).expand(3, -1)
        a.llm.forward(piece.embeds[None], cache, position_ids=(rel + pos)[:, None], **piece.extras)
        pos += piece.extent if not flat_positions else piece.tokens
    q = a.question_embeds(QUESTION)
    return a.llm.forward(q[None], cache, position_ids=torch.arange(pos, pos + len(q)).expand(3, 1, -1),
                         logits_to_keep=len(q))[0]


def test_qwen3_video_resize_matches_hf_rule_for_one_temporal_patch(qwen) -> None:
    if qwen.family != "qwen3_vl":
        pytest.skip("Qwen3-VL's video resize rule")
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_resize

    from stream.models.qwen3_vl import smart_resize_video

    for h, w in [(150, 200), (480, 640), (1080, 1920), (20, 900), (720, 720)]:
        assert smart_resize_video(h, w, 32, 8 * 1024, 128 * 1024) == hf_video_resize(2, h, w, 2, 32, 8 * 1024,
                                                                                        128 * 1024)
    assert qwen.preprocess(_frames(2)).shape[1:3] == qwen.grid(150, 200)


def test_smart_resize_and_patches_match_hf_processor(qwen) -> None:
    if qwen.family != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL's image processor (PIL backend) is the reference")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(150, 200), (480, 640), (1080, 1920), (33, 900), (720, 720)]:
        assert smart_resize(h, w, 28, 4 * 784, 64 * 784) == hf_smart_resize(h, w, 28, 4 * 784, 64 * 784)
    frame = _frames(1)[0]
    # a temporal patch of one frame repeated == HF's image path (which repeats the image to 2 frames)
    proc = Qwen2VLImageProcessorPil(min_pixels=qwen.min_pixels, max_pixels=qwen.max_pixels, patch_size=14,
                                    merge_size=2, temporal_patch_size=2)
    out = proc(images=[frame], return_tensors="pt")
    ours = frames_to_patches(frame[None], 14, 2, 2, proc.image_mean, proc.image_std, qwen.min_pixels,
                             qwen.max_pixels)
    assert out["image_grid_thw"].tolist() == [[1, 2 * ours.shape[1], 2 * ours.shape[2]]]
    torch.testing.assert_close(ours.reshape(-1, ours.shape[-1]), out["pixel_values"].float(), atol=2e-5, rtol=0)
    # odd chunk: the last frame is repeated to fill the last temporal patch
    two = _frames(3)
    odd = frames_to_patches(two, 14, 2, 2, proc.image_mean, proc.image_std, qwen.min_pixels, qwen.max_pixels)
    padded = frames_to_patches(np.concatenate([two, two[-1:]]), 14, 2, 2, proc.image_mean, proc.image_std,
                               qwen.min_pixels, qwen.max_pixels)
    assert odd.shape[0] == 2
    torch.testing.assert_close(odd, padded)


def test_tower_equals_hf_video_features(qwen) -> None:
    rgb = _frames(4, 300, 420)  # a 6 x 8 token grid over 2 windows: windowed and full blocks both matter
    vt = qwen.encode_frames(rgb)
    inputs = _hf_inputs(qwen, rgb)
    with torch.inference_mode():
        ref = qwen.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    torch.testing.assert_close(vt.embeds, torch.cat(ref.pooler_output).view(vt.embeds.shape), atol=1e-5, rtol=1e-5)
    assert vt.grid[0] * vt.grid[1] == vt.embeds.shape[1]
    if qwen.family == "qwen3_vl":
        deep = vt.extras["deepstack"]  # [N, T, levels, d]
        assert deep.shape[2] == len(ref.deepstack_features) == 2
        for level, feats in enumerate(ref.deepstack_features):
            feats = torch.cat(feats) if isinstance(feats, (tuple, list)) else feats
            torch.testing.assert_close(deep[:, :, level], feats.view(vt.embeds.shape), atol=1e-5, rtol=1e-5)
    else:
        assert vt.extras == {}


def test_stream_path_equals_model_forward_and_needs_mrope_positions(qwen) -> None:
    rgb = _frames(4)
    inputs = _hf_inputs(qwen, rgb)
    n_q = len(qwen.question_ids(QUESTION))
    with torch.inference_mode():
        ref = qwen.model(**inputs).logits[0, -n_q:].float()
        without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        if qwen.family == "qwen3_vl":  # Qwen3-VL refuses; Qwen2.5-VL silently falls back to 1-D positions
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                qwen.model(**without)
            no_types = ref + 1
        else:
            no_types = qwen.model(**without).logits[0, -n_q:]
    ours = _ours(qwen, rgb)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    # without the 3-row positions (HF: without mm_token_type_ids) the output is silently different
    assert (_ours(qwen, rgb, flat_positions=True) - ref).abs().max() > 1e-3
    assert (no_types.float() - ref).abs().max() > 1e-3
    assert (_ours(qwen, _frames(4, seed=1)) - ref).abs().max() > 1e-3


def test_chunked_prefill_equals_one_shot(qwen) -> None:
    rgb = _frames(6)
    torch.testing.assert_close(_ours(qwen, rgb, chunks=3), _ours(qwen, rgb, chunks=1), atol=1e-4, rtol=1e-4)


def test_pruned_chunk_equals_hf_fed_kept_tokens_at_original_positions(qwen) -> None:
    rgb = _frames(2)
    vt = qwen.encode_frames(rgb)
    keep = torch.tensor([0, 3, 4, 10, 17, 20, 29])  # kept token indices of the one temporal patch
    extras = {name: [x[0, keep]] for name, x in vt.extras.items()}  # a dropped token leaves every level
    piece = qwen.chunk_embeds([vt.embeds[0, keep]], qwen.patch_pts(_pts(2)), positions=[vt.positions[keep]],
                              grid=vt.grid, extras=extras)
    extra = piece.extras
    prefix = qwen.llm.embed(qwen.stream_prefix_ids())
    q = qwen.question_embeds(QUESTION)
    cache = DynamicCache()
    qwen.llm.forward(prefix[None], cache, position_ids=torch.arange(len(prefix)).expand(3, 1, -1))
    base = len(prefix)
    qwen.llm.forward(piece.embeds[None], cache, position_ids=(piece.position_rows(3) + base)[:, None], **extra)
    pos = base + piece.extent
    ours = qwen.llm.forward(q[None], cache, position_ids=torch.arange(pos, pos + len(q)).expand(3, 1, -1))[0, -1]
    # HF: full-grid positions from its own get_rope_index, the pruned tokens' rows removed, one forward
    inputs = _hf_inputs(qwen, rgb)
    ids = inputs["input_ids"]
    full_pos, _ = qwen.model.model.get_rope_index(ids, inputs["mm_token_type_ids"],
                                                  video_grid_thw=inputs["video_grid_thw"])
    video = (ids[0] == qwen.placeholder_id).nonzero()[:, 0]
    drop = torch.ones(ids.shape[1], dtype=torch.bool)
    drop[video] = False
    drop[video[keep]] = True
    with torch.inference_mode():
        embeds = qwen.model.model.get_input_embeddings()(ids)
        embeds[0, video] = vt.embeds[0]
        kw = {}
        if "deepstack" in extras:  # HF's decoder fed the kept tokens' rows of every DeepStack level
            levels = list(extras["deepstack"][0].transpose(0, 1))  # [keep, levels, d] -> levels x [keep, d]
            kw = {"visual_pos_masks": (ids == qwen.placeholder_id)[:, drop], "deepstack_visual_embeds": levels}
        hidden = qwen.model.model.language_model(inputs_embeds=embeds[:, drop], position_ids=full_pos[:, :, drop],
                                                 **kw).last_hidden_state
        ref = qwen.model.lm_head(hidden[0, -1]).float()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_rotate_keys_matches_hf_mrope(qwen) -> None:
    import importlib

    apply_rotary_pos_emb = importlib.import_module(f"transformers.models.{qwen.family}.modeling_{qwen.family}")
    apply_rotary_pos_emb = apply_rotary_pos_emb.apply_rotary_pos_emb

    llm = qwen.llm
    keys = torch.randn(1, llm.num_kv_heads, 9, llm.head_dim)
    pos = torch.tensor([[0, 5, 5, 5, 9, 10, 11, 12, 40], [0, 5, 6, 7, 9, 10, 11, 12, 41], [0, 5, 6, 5, 9, 10, 13, 2, 0]])
    cos, sin = llm.decoder.rotary_emb(keys, pos[:, None])
    _, hf = apply_rotary_pos_emb(keys, keys, cos, sin)
    torch.testing.assert_close(llm.rotate_keys(keys, pos), hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llm.rotate_keys(llm.rotate_keys(keys, pos), -pos), keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llm.shift_keys(llm.rotate_keys(keys, pos), 7), llm.rotate_keys(keys, pos + 7),
                               atol=1e-4, rtol=1e-4)


def _engine_answer(a, cfg: KVConfig, chunks: list[LLMInput], eos: list[int]) -> tuple[list[int], int]:
    engine = LLMEngine(a.llm, cfg, 1 << 30)
    engine.open("s", a.llm.embed(a.stream_prefix_ids()))
    for piece in chunks:
        engine.append("s", piece)
    got = list(engine.ask("s", a.question_embeds(QUESTION), 8, eos))
    rebases = engine.stats("s").rebases
    engine.close("s")
    return got, rebases


def test_engine_answer_equals_hf_generate(qwen) -> None:
    rgb = _frames(4)
    inputs = _hf_inputs(qwen, rgb)
    eos = sorted(qwen.eos_token_ids)
    with torch.inference_mode():
        out = qwen.model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                                  pad_token_id=qwen.tokenizer.pad_token_id)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    vt = qwen.encode_frames(rgb)
    cfg = KVConfig(policy="sink_window", budget_tokens=4096, sink_tokens=256, reserve_tokens=512, window_quant="none")
    extras = {name: list(x) for name, x in vt.extras.items()}
    piece = qwen.chunk_embeds(list(vt.embeds), qwen.patch_pts(_pts(4)), grid=vt.grid, extras=extras)
    got, _ = _engine_answer(qwen, cfg, [piece], eos)
    assert got == ref and len(ref) > 0


def test_compact_rebase_under_mrope_is_a_uniform_shift(qwen) -> None:
    """120 chunks push the stream past rebase_position: the window's keys are shifted back (every M-RoPE row by the
    same delta), so the answer equals a session that never rebased (same relative positions)."""
    vts = [qwen.encode_frames(_frames(2, seed=s)) for s in range(4)]
    chunks = [qwen.chunk_embeds(list(vts[i % 4].embeds), [float(i)], grid=vts[0].grid) for i in range(120)]
    eos = sorted(qwen.eos_token_ids)
    small = dict(policy="sink_window", budget_tokens=512, sink_tokens=64, reserve_tokens=128, window_quant="none")
    got, rebases = _engine_answer(qwen, KVConfig(**small, rebase_position=1024), chunks, eos)
    ref, none = _engine_answer(qwen, KVConfig(**small, rebase_position=1 << 16), chunks, eos)
    assert rebases > 0 and none == 0
    assert got == ref


def test_pipeline_answer_equals_hf_generate_with_compression_off(qwen) -> None:
    """Vision stage -> EncodedChunk (positions, grid, DeepStack) -> LLM stage, 2 chunks of 2 frames, vs HF generate
    on the 4 frames; the same with the STC cacher at ratio 1.0."""
    from serve.core.options import StreamOptions
    from serve.core.pipeline import StreamPipeline
    from stream.frames import FrameBatch

    rgb = _frames(4)
    inputs = _hf_inputs(qwen, rgb)
    eos = sorted(qwen.eos_token_ids)
    with torch.inference_mode():
        out = qwen.model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                  pad_token_id=qwen.tokenizer.pad_token_id)
    ref = qwen.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    for cacher in ({"enabled": False}, {"ratio": 1.0}):
        opts = StreamOptions.model_validate({"cacher": cacher, "pruner": {"enabled": False},
                                             "kv": {"policy": "sink_window", "budget_tokens": 4096}})
        pipe = StreamPipeline(qwen, opts, 1 << 30)
        sid = pipe.open("s")
        pts = np.asarray(_pts(4))
        for i in (0, 2):
            chunk = pipe.push_chunk(sid, FrameBatch(rgb[i:i + 2], pts[i:i + 2], np.arange(i, i + 2)))
            assert chunk.grid is not None and chunk.positions.shape == (chunk.embeds.shape[0], 2)
            assert ("deepstack" in chunk.extras) == (qwen.family == "qwen3_vl")
        assert "".join(pipe.ask(sid, QUESTION, 6)) == ref


def test_pruned_stream_keeps_positions_and_deepstack_rows(qwen) -> None:
    """With the pruner on, the vision stage sends each kept token's original (row, col) and its DeepStack rows."""
    from serve.core.options import StreamOptions
    from serve.core.stages import VisionStage
    from stream.frames import FrameBatch

    opts = StreamOptions.model_validate({"cacher": {"enabled": False},
                                         "pruner": {"policy": "uniform", "tokens_per_frame": 9}})
    stage = VisionStage(qwen, opts)
    stage.open("s")
    rgb = _frames(3)  # odd: the last frame is repeated into the second temporal patch
    chunk = stage.encode("s", FrameBatch(rgb, np.asarray(_pts(3)), np.arange(3)))
    vt = qwen.encode_frames(rgb)
    assert len(chunk.pts) == 2 and chunk.tokens_per_frame == [9, 9]
    idx = chunk.positions[:, 0] * vt.grid[1] + chunk.positions[:, 1]  # token index on the grid
    frame = torch.repeat_interleave(torch.arange(2), 9)
    torch.testing.assert_close(chunk.embeds, vt.embeds[frame, idx])
    for name, x in vt.extras.items():
        torch.testing.assert_close(chunk.extras[name], x[frame, idx])
    piece = qwen.chunk_embeds(chunk.frames(), chunk.pts, **chunk.llm_extras())
    assert piece.tokens == int(piece.position_rows(3).shape[1]) and piece.extent > 9


def test_an_unreachable_hub_id_fails_at_once_with_the_fix(monkeypatch, tmp_path) -> None:
    import time

    from huggingface_hub import constants

    from stream.errors import ConfigError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="not in the local HF cache.*HF_HUB_OFFLINE is set.*Fix: pass a local"):
        load_adapter("Qwen/Qwen2.5-VL-3B-Instruct")
    assert time.monotonic() - t0 < 2.0
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_vl_moe"}')
    with pytest.raises(ConfigError, match="mixture-of-experts decoder; the dense qwen3_vl is supported"):
        load_adapter(str(tmp_path))


def test_cacher_on_qwen_towers_ratio_one_equals_full_tower_and_reuses(qwen) -> None:
    """STC through the family-neutral per-layer ops: the block's own (window-local) attention, fused qkv, rotary.
    ratio 1.0 == the plain tower (DeepStack levels too); an identical frame reused at a low ratio is exact."""
    from cache.cacher import StreamCacher
    from cache.config import CacherConfig
    from cache.stc import encode_full, encode_selective

    rgb = _frames(8, 300, 420)  # several windows
    pv = qwen.preprocess(rgb)
    plain = qwen.project(qwen.encode_vision(pv))
    cacher = StreamCacher(CacherConfig(ratio=1.0, refresh_cell_below=None))  # reuse is tested, not region refresh
    cached = [qwen.project(qwen.encode_vision(pv[i:i + 2], layer_runner=cacher.runner)) for i in (0, 2)]
    assert cacher.stats()["frames_reused"] > 0
    torch.testing.assert_close(torch.cat([c.embeds for c in cached]), plain.embeds, atol=1e-4, rtol=1e-4)
    for name, x in plain.extras.items():
        torch.testing.assert_close(torch.cat([c.extras[name] for c in cached]), x, atol=1e-4, rtol=1e-4)
    # full_layer through the ops == the block's own forward; a frame identical to its reference is exact
    rows, cols = pv.shape[1:3]
    layers = qwen.grid_layers(rows, cols)
    with torch.inference_mode():
        hidden = qwen.vision_embed(pv[:1])
    ref_out, refs = encode_full(hidden, layers, keep=[0])
    with torch.inference_mode():
        out = hidden
        for layer in layers:  # the HF blocks' own forward (cu_seqlens windows)
            out = layer(out)
    torch.testing.assert_close(ref_out, out, atol=1e-5, rtol=1e-5)
    again, counts = encode_selective(hidden, layers, refs[0], ratio=0.1)
    torch.testing.assert_close(again, ref_out, atol=1e-5, rtol=1e-5)
    assert 0 < sum(counts) < len(layers) * hidden.shape[1]
