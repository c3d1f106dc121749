"""The adapter's step-by-step path (our preprocessing + per-layer ViT + projection + streamed prompt) gives the same
logits as the HF model's own ``forward`` on the same frames, for both families."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from stream.models import load_adapter, run_layers
from stream.models.preprocess import frames_to_pixel_values

QUESTION = "What is the man holding?"


def _frames(n: int = 3, h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    return np.stack([(base + rng.integers(0, 60, (h, w, 3))) % 256 for _ in range(n)]).astype(np.uint8)


def _ours(adapter, rgb: np.ndarray, pts: list[float], chunks: int = 1) -> torch.Tensor:
    """Stream the frames chunk by chunk into a cache, then the question; logits of every question position."""
    cache = DynamicCache()
    adapter.llm.forward(adapter.llm.embed(adapter.stream_prefix_ids())[None], cache)
    for idx in np.array_split(np.arange(len(rgb)), chunks):
        vt = adapter.encode_frames(rgb[idx])
        emb = adapter.chunk_embeds(list(vt.embeds), [pts[i] for i in idx])
        adapter.llm.forward(emb[None], cache)
    q = adapter.question_embeds(QUESTION)
    return adapter.llm.forward(q[None], cache, logits_to_keep=q.shape[0])[0]


def _reference(adapter, rgb: np.ndarray, pts: list[float]) -> torch.Tensor:
    """HF forward on placeholder ids + pixel values (what the HF processor would build)."""
    end = torch.full((adapter.video_end_embeds().shape[0],), adapter.placeholder_id)
    q_ids = adapter.question_ids(QUESTION)
    ids = torch.cat([adapter.stream_prefix_ids(), adapter.chunk_placeholder_ids(len(rgb), pts), end, q_ids])
    pv = adapter.preprocess(rgb)[None]  # [1, F, 3, S, S]
    kwargs = {"pixel_values_videos": pv} if adapter.family == "llava_onevision" else {"pixel_values": pv}
    with torch.inference_mode():
        logits = adapter.model(input_ids=ids[None].to(adapter.device), **kwargs).logits[0]
    return logits[-(len(q_ids) + len(end)):].float()


def test_stream_path_equals_model_forward(tiny_adapter) -> None:
    rgb, pts = _frames(3), [0.0, 1.0, 2.0]
    ours, ref = _ours(tiny_adapter, rgb, pts), _reference(tiny_adapter, rgb, pts)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    # and it is not trivially equal: different frames give different logits
    other = _ours(tiny_adapter, _frames(3, seed=1), pts)
    assert (other - ref).abs().max() > 1e-3


def test_chunked_prefill_equals_one_shot(tiny_adapter) -> None:
    rgb, pts = _frames(4), [0.0, 1.0, 2.0, 3.0]
    torch.testing.assert_close(_ours(tiny_adapter, rgb, pts, chunks=2), _ours(tiny_adapter, rgb, pts, chunks=1),
                               atol=1e-4, rtol=1e-4)


def test_layer_runner_seam_is_used(tiny_adapter) -> None:
    pv = tiny_adapter.preprocess(_frames(2))
    calls = []

    def runner(hidden, layers):
        calls.append((tuple(hidden.shape), len(layers)))
        return run_layers(hidden, layers)

    torch.testing.assert_close(tiny_adapter.encode_vision(pv, layer_runner=runner), tiny_adapter.encode_vision(pv))
    n_patches = (tiny_adapter.image_size // tiny_adapter.model.config.vision_config.patch_size) ** 2
    assert calls == [((2, n_patches, tiny_adapter.vision_layers[0].embed_dim), len(tiny_adapter.vision_layers))]


def test_token_geometry(tiny_llava, tiny_smolvlm) -> None:
    assert tiny_llava.tokens_per_frame == 196 and tiny_smolvlm.tokens_per_frame == 64
    for a in (tiny_llava, tiny_smolvlm):
        vt = a.encode_frames(_frames(1))
        rows, cols = vt.grid
        assert vt.embeds.shape == (1, rows * cols, a.llm.hidden_size)
        # every grid cell exactly once
        assert len({tuple(p) for p in vt.positions.tolist()}) == rows * cols


def test_preprocessing_matches_hf_image_processor(real_frames) -> None:
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    frame = real_frames[0]
    hf = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=[[384, 384]],
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    expected = hf(images=[frame], return_tensors="pt")["pixel_values"][0, 0]  # base (whole-image) patch
    ours = frames_to_pixel_values(frame[None], 384, [0.5] * 3, [0.5] * 3, "bicubic")[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_tiny_model_reloads_identically(tiny_llava_dir, tiny_llava) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    again = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_dir, local_files_only=True)
    for (name, a), (_, b) in zip(tiny_llava.model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_adapter(tiny_llava_dir).random_weights is True


def test_bad_model_path_is_a_clear_error(tmp_path) -> None:
    from stream.errors import ConfigError

    with pytest.raises(ConfigError, match="config.json"):
        load_adapter(tmp_path)
