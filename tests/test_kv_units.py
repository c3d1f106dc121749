"""Pure building blocks of the KV sessions: RoPE moves, quantization, selection policies, sampling, config."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cache.kv import KVConfig, Sampling
from cache.kv import policies
from cache.kv.quant import dequantize, quantize
from stream.models.rope import apply_rope, move_rope, rope_inv_freq
from cache.kv.sampling import next_token
from stream.errors import ConfigError
from tests.kv_support import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.kv_support import tiny_lm


# ---------------------------------------------------------------- rope
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_apply_rope_matches_the_model_rotary_embedding(family):
    llm = tiny_lm(family)
    inv_freq = rope_inv_freq(llm.decoder, llm.head_dim)
    keys = torch.randn(1, 2, 7, llm.head_dim)
    positions = torch.tensor([0, 1, 5, 999, 4096, 40000, 65000])
    cos, sin = llm.decoder.rotary_emb(keys, positions[None])
    _, expected = apply_rotary_pos_emb(keys, keys, cos, sin)
    torch.testing.assert_close(apply_rope(keys, positions, inv_freq), expected, rtol=1e-5, atol=1e-5)


def test_move_rope_equals_rotating_at_the_destination():
    llm = tiny_lm("llama")
    inv_freq = rope_inv_freq(llm.decoder, llm.head_dim)
    raw = torch.randn(3, 2, 5, llm.head_dim)
    src, dst = torch.tensor([10, 11, 12, 13, 14]), torch.tensor([60000, 60001, 3, 4, 5])
    moved = move_rope(apply_rope(raw, src, inv_freq), src, dst, inv_freq)
    torch.testing.assert_close(moved, apply_rope(raw, dst, inv_freq), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(apply_rope(apply_rope(raw, src, inv_freq), -src, inv_freq), raw, rtol=1e-5, atol=1e-5)


def test_rope_inv_freq_rejects_models_it_cannot_move():
    llm = tiny_lm("llama")
    with pytest.raises(ConfigError, match="rotary_emb"):
        rope_inv_freq(torch.nn.Linear(2, 2), llm.head_dim)
    llm.decoder.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ConfigError, match="dynamic"):
        rope_inv_freq(llm.decoder, llm.head_dim)
    llm.decoder.rotary_emb.rope_type = "default"
    with pytest.raises(ConfigError, match="partial rotary"):
        rope_inv_freq(llm.decoder, 2 * llm.head_dim)


# ---------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [-1, -2])
def test_quantization_error_is_at_most_half_a_step(bits, dim):
    x = torch.randn(3, 2, 37, 64, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    x[0, 0, :, 5] *= 40  # an outlier channel
    restored = dequantize(quantize(x, bits, dim))
    step = (x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)) / ((1 << bits) - 1)
    assert ((restored - x).abs() <= 0.5 * step * 1.01 + 1e-6).all()


def test_quantized_sizes():
    x = torch.randn(24, 2, 64, 64)  # one block of 64 tokens, float32
    fp32 = x.numel() * 4
    assert quantize(x, 8, -1).nbytes < 0.28 * fp32
    assert quantize(x, 4, -1).nbytes < 0.16 * fp32
    assert quantize(x, 4, -2).nbytes < quantize(x, 8, -2).nbytes < fp32


def test_int4_packing_round_trips_representable_values():
    codes = torch.randint(0, 16, (4, 9, 10), generator=torch.Generator().manual_seed(0)).float()
    codes[..., 0, :], codes[..., 1, :] = 0, 15  # every column spans 0..15 -> scale 1, minimum 0
    q = quantize(codes, 4, dim=-2)
    assert q.data.shape == (4, 9, 5) and q.data.dtype == torch.uint8
    assert torch.equal(dequantize(q), codes)


def test_quantization_of_constant_and_huge_values():
    const = torch.full((2, 8, 4), 3.25)
    assert torch.equal(dequantize(quantize(const, 8, -1)), const)
    huge = torch.randn(2, 8, 4) * 1e6  # float16 scales would overflow -> float32 scales
    q = quantize(huge, 8, -1)
    assert q.scale.dtype == torch.float32 and torch.isfinite(dequantize(q)).all()
    with pytest.raises(ValueError, match="even"):
        quantize(torch.randn(2, 3), 4, -2)


# ---------------------------------------------------------------- policies
def test_blocks_to_evict_is_the_fewest_that_fit():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        sizes = torch.randint(1, 20, (int(torch.randint(0, 8, (1,), generator=gen)),), generator=gen).tolist()
        cap = int(torch.randint(0, 60, (1,), generator=gen))
        n = policies.blocks_to_evict(sizes, cap)
        brute = next((k for k in range(len(sizes) + 1) if sum(sizes[k:]) <= cap), len(sizes))
        assert n == brute


def test_select_blocks_is_greedy_by_score_within_allowance():
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        n = int(torch.randint(0, 10, (1,), generator=gen))
        ids = list(range(100, 100 + n))
        scores = torch.rand(n, generator=gen).tolist()
        tokens = torch.randint(1, 12, (n,), generator=gen).tolist()
        allowance = int(torch.randint(0, 40, (1,), generator=gen))
        chosen = policies.select_blocks(ids, scores, tokens, allowance)
        size = dict(zip(ids, tokens))
        score = dict(zip(ids, scores))
        assert sum(size[i] for i in chosen) <= allowance
        assert [score[i] for i in chosen] == sorted((score[i] for i in chosen), reverse=True)
        for i in set(ids) - set(chosen):  # skipped only because better blocks filled the allowance
            better = sum(size[j] for j in chosen if score[j] > score[i])
            assert better + size[i] > allowance


def test_summaries_score_identical_content_highest_and_handle_gqa():
    keys = torch.randn(3, 2, 10, 16)  # [layers, kv_heads, tokens, hd]
    other = torch.randn(3, 2, 10, 16)
    block = policies.block_summary(keys)
    assert block.shape == (3 * 2 * 16,) and abs(float(block.norm()) - 1) < 1e-5
    queries = keys.repeat_interleave(2, dim=1)  # 4 query heads, 2 per kv head
    assert float(policies.query_summary(queries, kv_heads=2) @ block) == pytest.approx(1.0, abs=1e-5)
    assert float(policies.query_summary(queries, 2) @ policies.block_summary(other)) < 0.9


def test_compact_sink_start():
    assert policies.compact_sink_start(window_start=5, retrieved_tokens=0, sink_tokens=5) == 0
    assert policies.compact_sink_start(window_start=105, retrieved_tokens=30, sink_tokens=5) == 70


# ---------------------------------------------------------------- sampling
def test_sampling_greedy_topk_topp_and_seed():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert next_token(logits) == 1
    assert next_token(logits, temperature=5.0, top_k=1) == 1
    assert next_token(logits, temperature=5.0, top_p=1e-3) == 1
    draws = [next_token(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in range(1500)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert (freq - logits.softmax(-1)).abs().max() < 0.05
    top2 = {next_token(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)) for s in range(200)}
    assert top2 == {1, 2}


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "data, needle",
    [
        ({"budget_tokens": 300, "sink_tokens": 100, "reserve_tokens": 200}, "leaves no window"),
        ({"retrieve_tokens": 2000, "reserve_tokens": 1000}, "retrieve_tokens=2000 must be <"),
        ({"budget_tokens": 40000}, "rebase_position=65536 must be >="),
        ({"quant": "int3"}, "int8"),
        ({"budget": 5}, "unknown key"),
    ],
)
def test_config_errors_name_the_value_and_the_fix(data, needle):
    with pytest.raises(ConfigError, match=needle):
        KVConfig.parse(data, "kv")
    assert KVConfig.parse({}).window_tokens == 8192 - 256 - 1536
    with pytest.raises(ConfigError, match="top_p"):
        Sampling.parse({"top_p": 0})
