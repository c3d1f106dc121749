"""Attention-based importance: our q/k recomputation against HF's eager attention weights on a tiny SigLIP."""
from __future__ import annotations

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from stream.models.vision_ops import layer_ops, scores_to_tokens


@pytest.fixture(scope="module")
def tower() -> SiglipVisionModel:
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=4, attn_implementation="eager")
    return SiglipVisionModel(cfg).eval()


def test_attention_received_matches_hf_eager_weights(tower: SiglipVisionModel) -> None:
    layer = tower.encoder.layers[1]
    hidden = torch.randn(5, 64, 32)  # [N, P, D]
    with torch.no_grad():
        _, weights = layer.self_attn(layer.layer_norm1(hidden))  # [N, H, P, P]
        got = layer_ops(layer, 1).attention_received(hidden, frames_per_step=2)  # chunks of 2 frames: 2 + 2 + 1
    want = weights.mean(dim=(1, 2))  # [N, P]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(5))


def test_scores_to_tokens_block_means_and_identity() -> None:
    scores = torch.rand(3, 32 * 32)
    got = scores_to_tokens(scores, (8, 8))  # SmolVLM-style 4x4 blocks
    blocks = scores.view(3, 8, 4, 8, 4).mean(dim=(2, 4)).reshape(3, 64)
    torch.testing.assert_close(got, blocks)
    assert scores_to_tokens(scores, (32, 32)).equal(scores)
    assert scores_to_tokens(torch.rand(2, 27 * 27), (14, 14)).shape == (2, 196)  # LLaVA-OneVision grid
    with pytest.raises(ValueError, match="square patch grid, got P=30"):
        scores_to_tokens(torch.rand(1, 30), (5, 6))
