"""cache.stc: selective recompute against brute-force oracles, on real HF SigLIP / Idefics3 vision layers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cache import stc

IMAGE, PATCH = 56, 14  # 4 x 4 = 16 tokens per frame


@dataclass
class Tower:
    """A tiny vision tower split at the cacher's seam."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    layers: nn.ModuleList
    finish: Callable[[torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]  # the HF model's own forward


def _siglip(seed: int) -> Tower:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=IMAGE, patch_size=PATCH)
    m = SiglipVisionModel(cfg).eval()
    return Tower(m.embeddings, m.encoder.layers, m.post_layernorm, lambda pv: m(pv).last_hidden_state)


def _idefics3(seed: int) -> Tower:
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    torch.manual_seed(seed)
    cfg = Idefics3VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                               image_size=IMAGE, patch_size=PATCH)
    m = Idefics3VisionTransformer(cfg).eval()

    def embed(pv: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(pv.shape[0], IMAGE // PATCH, IMAGE // PATCH, dtype=torch.bool)
        return m.embeddings(pixel_values=pv, patch_attention_mask=mask)

    return Tower(embed, m.encoder.layers, m.post_layernorm, lambda pv: m(pv).last_hidden_state)


@pytest.fixture(params=["siglip", "idefics3"])
def tower(request: pytest.FixtureRequest) -> Tower:
    return _siglip(0) if request.param == "siglip" else _idefics3(0)


def _video(n: int = 4, seed: int = 1) -> torch.Tensor:
    """``[n, 3, S, S]``: a still frame with small noise, one 14x14 patch replaced per later frame."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, IMAGE, IMAGE, generator=g) * 2 - 1
    frames = []
    for i in range(n):
        f = base + 0.02 * torch.randn(base.shape, generator=g)
        r, c = divmod(i % 16, 4)
        f[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = torch.rand(3, PATCH, PATCH, generator=g)
        frames.append(f)
    return torch.stack(frames)


def _masked_oracle(layer: nn.Module, x: torch.Tensor, ref: stc.LayerStates, mask: torch.Tensor) -> torch.Tensor:
    """Brute force: compute every token with the reference's values where ``mask [N, P]`` is False, then give
    those tokens ``x + the reference's residual update`` instead."""
    a, m = layer.self_attn, mask.unsqueeze(-1)
    h = layer.layer_norm1(x)
    q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
    v = torch.where(m, v, ref.values)
    n, p, d = x.shape
    heads = lambda t: t.view(n, p, a.num_heads, a.head_dim).transpose(1, 2)  # noqa: E731
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * a.scale, dim=-1)  # [N, H, P, P]
    mid = x + a.out_proj((w @ heads(v)).transpose(1, 2).reshape(n, p, d))
    out = mid + layer.mlp(layer.layer_norm2(mid))
    return torch.where(m, out, x + ref.update)


def _ref_layer_states(refs: stc.ReferenceStates, i: int) -> stc.LayerStates:
    return refs.layer(i, torch.float32)


@torch.inference_mode()
def test_full_path_matches_hf_forward(tower: Tower) -> None:
    pv = _video()
    hidden = tower.embed(pv)
    for layer in tower.layers:
        mine, _ = stc.full_layer(layer, hidden)
        theirs = layer(hidden, attention_mask=None)
        torch.testing.assert_close(mine, theirs[0] if isinstance(theirs, tuple) else theirs, atol=1e-5, rtol=1e-5)
        hidden = mine
    out, refs = stc.encode_full(tower.embed(pv), tower.layers, keep=[2])
    torch.testing.assert_close(tower.finish(out), tower.reference(pv), atol=1e-5, rtol=1e-5)
    alone, refs_alone = stc.encode_full(tower.embed(pv[2:3]), tower.layers, keep=[0])
    torch.testing.assert_close(refs[0].update, refs_alone[0].update, atol=1e-5, rtol=1e-5)
    layer0 = tower.layers[0]
    h2 = tower.embed(pv)[2:3]
    torch.testing.assert_close(refs[0].keys[0], layer0.self_attn.k_proj(layer0.layer_norm1(h2))[0])
    torch.testing.assert_close(refs[0].update[0], layer0(h2, attention_mask=None)[0] - h2[0], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_ratio_one_equals_full_encoder(tower: Tower) -> None:
    pv = _video(5)
    hidden = tower.embed(pv)
    full, refs = stc.encode_full(hidden, tower.layers, keep=[0])
    out, counts = stc.encode_selective(hidden[1:], tower.layers, refs[0], ratio=1.0)
    torch.testing.assert_close(out, full[1:], atol=1e-5, rtol=1e-5)
    assert counts == [4 * hidden.shape[1]] * len(tower.layers)


@pytest.mark.parametrize("ratio,threshold", [(0.25, None), (0.5, None), (0.1, 0.999), (0.0, 0.99)])
@torch.inference_mode()
def test_selective_layer_matches_masked_oracle(tower: Tower, ratio: float, threshold: float | None) -> None:
    pv = _video(4)
    hidden = tower.embed(pv)
    _, refs = stc.encode_full(hidden[:1], tower.layers, keep=[0])
    x, x_oracle = hidden[1:], hidden[1:]
    for i, layer in enumerate(tower.layers):
        ref = _ref_layer_states(refs[0], i)
        x, idx = stc.selective_layer(layer, x, ref, ratio, threshold)
        keys = layer.self_attn.k_proj(layer.layer_norm1(x_oracle))
        sim = F.cosine_similarity(keys, ref.keys, dim=-1)  # [N, P]
        order = sim.argsort(dim=-1)  # least similar first
        k = idx.shape[1]
        below = int((sim < threshold).sum(-1).max()) if threshold is not None else 0
        want = max(math.ceil(ratio * sim.shape[1]), below)
        assert k == want
        assert torch.equal(idx.sort(dim=-1).values, order[:, :k].sort(dim=-1).values)
        mask = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, order[:, :k], True)
        x_oracle = _masked_oracle(layer, x_oracle, ref, mask)
        torch.testing.assert_close(x, x_oracle, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_frame_identical_to_reference_is_exact_at_any_ratio(tower: Tower) -> None:
    hidden = tower.embed(_video(2))
    full, refs = stc.encode_full(hidden[:1], tower.layers, keep=[0])
    same = hidden[:1].repeat(3, 1, 1)
    for ratio, threshold in [(0.1, None), (0.0, -1.0)]:  # the second recomputes no token at all
        out, counts = stc.encode_selective(same, tower.layers, refs[0], ratio, threshold)
        torch.testing.assert_close(out, full.expand(3, -1, -1), atol=1e-5, rtol=1e-5)
    assert counts == [0] * len(tower.layers)


def test_count_to_recompute_takes_ratio_or_threshold_whichever_is_more() -> None:
    sim = torch.tensor([[0.1, 0.5, 0.9, 0.99], [0.95, 0.96, 0.97, 0.2]])
    assert stc.count_to_recompute(sim, 0.25, None) == 1
    assert stc.count_to_recompute(sim, 0.3, None) == 2  # ceil
    assert stc.count_to_recompute(sim, 0.25, 0.96) == 3  # frame 0 has 3 tokens below 0.96
    assert stc.count_to_recompute(sim, 0.0, -1.0) == 0
    assert stc.count_to_recompute(sim, 1.0, None) == 4
    idx = stc.select_tokens(sim, 0.5, None)
    assert [sorted(r) for r in idx.tolist()] == [[0, 1], [0, 3]]


def test_check_layers_names_the_unsupported_layer() -> None:
    with pytest.raises(TypeError, match=r"vision layer 0 \(Linear\) lacks .*layer_norm1.*disable the cache"):
        stc.check_layers(nn.ModuleList([nn.Linear(4, 4)]))
    with pytest.raises(TypeError, match="no layers"):
        stc.check_layers(nn.ModuleList())
    stc.check_layers(_siglip(0).layers)


@torch.inference_mode()
def test_reference_states_size_and_dtype(tower: Tower) -> None:
    hidden = tower.embed(_video(2))
    _, p, d = hidden.shape
    for dtype in (torch.float32, torch.float16):
        _, refs = stc.encode_full(hidden, tower.layers, keep=[0, 1], store_dtype=dtype)
        assert len(refs) == 2 and refs[1].keys.dtype == dtype
        elem = 4 if dtype == torch.float32 else 2
        want = 3 * len(tower.layers) * p * d * elem  # keys, values, residual update per layer
        assert refs[0].nbytes == stc.reference_nbytes(len(tower.layers), p, d, dtype) == want
    with pytest.raises(ValueError, match="does not match this encoder"):
        stc.encode_selective(hidden[:, :8], tower.layers, refs[0], 0.5)


def test_frame_signature_is_unit_centered_and_pooled() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 49, 8, generator=g)  # 7 x 7 grid
    sig = stc.frame_signature(h, grid=4)
    assert sig.shape == (3, stc.signature_dim(49, 8, 4)) == (3, 16 * 8)
    torch.testing.assert_close(sig.norm(dim=-1), torch.ones(3))
    shifted = stc.frame_signature(h + torch.randn(1, 1, 8, generator=g) * 5, grid=4)  # brightness/bias shift
    torch.testing.assert_close(shifted, sig, atol=1e-5, rtol=1e-5)
    assert float(sig[0] @ sig[1]) < 0.8  # unrelated frames
    near = stc.frame_signature(h[:1] + 0.05 * torch.randn(1, 49, 8, generator=g), grid=4)
    assert float(near[0] @ sig[0]) > 0.99
    odd = stc.frame_signature(torch.randn(2, 10, 8, generator=g), grid=2)  # not a square grid: token order
    assert odd.shape == (2, stc.signature_dim(10, 8, 2)) == (2, 4 * 8)
    assert stc.frame_signature(h, grid=64).shape == (3, 49 * 8)  # grid capped at the token grid
