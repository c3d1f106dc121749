"""The int8 KV window (``kv.window_quant: int8``) against the float window: the buffer's round trip and edits, the
batched attention path, and whole sessions (logits within a stated tolerance, greedy answers equal)."""
from __future__ import annotations

import pytest
import torch

from cache.kv import LLMEngine
from cache.kv.kvcache import BoundedCache, RowsCache, ragged_mask
from cache.memory import kv_slot_bytes
from kv_support import embeds, kv_config, one_torch_thread, stream, tiny_lm  # noqa: F401

PREFIX, QUESTION = embeds(6, 1), embeds(5, 2)
SMALL = dict(budget_tokens=8 + 64 + 32, sink_tokens=8, reserve_tokens=32, retrieve_tokens=16)
# int8 per token and head: the first-token logits move by at most this share of their range on the tiny model
# (measured 0.4-0.8 %; the half-step quantization error of every key and value, through two layers)
LOGIT_TOLERANCE = 0.02


def _half_step(x: torch.Tensor) -> torch.Tensor:
    """Worst-case int8 error per token and head of ``x [..., tokens, hd]``: half a quantization step."""
    return (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255 / 2


def test_int8_buffer_round_trip_edits_and_size() -> None:
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 20, 16, generator=g) * 3, torch.randn(2, 3, 20, 16, generator=g)  # [L, H, T, hd]
    q = BoundedCache(2, 32, 3, 16, torch.float32, torch.device("cpu"), "int8")
    f = BoundedCache(2, 32, 3, 16, torch.float32, torch.device("cpu"), "none")
    for cache in (q, f):
        cache.write(0, keys, values)
    k8, v8 = q.read(0, 20)
    assert ((k8 - keys).abs() <= _half_step(keys) * 1.01 + 1e-6).all()
    assert ((v8 - values).abs() <= _half_step(values) * 1.01 + 1e-6).all()
    assert torch.equal(f.read(0, 20)[0], keys)
    # delete moves codes and statistics as they are: the survivors read back bit for bit
    before_k, before_v = q.read(12, 20)
    q.delete(4, 12)
    after_k, after_v = q.read(4, 12)
    assert q.length == 12 and torch.equal(after_k, before_k) and torch.equal(after_v, before_v)
    q.truncate(6)
    assert q.length == 6
    # size: codes + float16 scale and minimum per token and head, about 1/4 of float32 here
    assert q.nbytes == 32 * kv_slot_bytes(2, 3, 16, 4, "int8") == 32 * 2 * 2 * 3 * (16 + 4)
    assert f.nbytes == 32 * kv_slot_bytes(2, 3, 16, 4, "none")


def test_int8_values_out_of_float16_range_are_refused_with_the_fix() -> None:
    cache = BoundedCache(1, 8, 1, 4, torch.float32, torch.device("cpu"), "int8")
    with pytest.raises(ValueError, match="window_quant: none"):
        cache.write(0, torch.full((1, 1, 2, 4), 1e6), torch.zeros(1, 1, 2, 4))


def test_batched_rows_attend_to_dequantized_past_and_exact_new_tokens() -> None:
    """RowsCache over int8 rows returns, per row, the held tokens as BoundedLayer reads them and the new tokens as
    given; a single BoundedLayer.update returns the same."""
    g = torch.Generator().manual_seed(1)
    caches = [BoundedCache(1, 16, 2, 8, torch.float32, torch.device("cpu"), "int8") for _ in range(2)]
    for c, n in zip(caches, (5, 3)):
        c.write(0, torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g))
    past = [c.read(0, c.length) for c in caches]
    new = [2, 4]
    k_new, v_new = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 4, 8, generator=g)  # [B, H, L, hd]
    rows = RowsCache(caches, new)
    keys, values = rows.layers[0].update(k_new, v_new)
    assert keys.shape == (2, 2, 7, 8) and rows.kv_len == 7
    for b, (c, n) in enumerate(zip(caches, new)):
        held = c.length - n
        assert torch.equal(keys[b, :, :held], past[b][0][0]) and torch.equal(values[b, :, :held], past[b][1][0])
        assert torch.equal(keys[b, :, held : held + n], k_new[b, :, :n])
    mask = ragged_mask(rows.past, new, rows.kv_len, torch.device("cpu"))
    assert mask.shape == (2, 1, 4, 7)
    one = BoundedCache(1, 16, 2, 8, torch.float32, torch.device("cpu"), "int8")
    one.write(0, *[t[:, :, :5] for t in (caches[0].read(0, 5))])
    k1, _ = one.layers[0].update(k_new[:1, :, :2], v_new[:1, :, :2])
    assert torch.equal(k1[0, :, 5:], k_new[0, :, :2]) and torch.equal(k1[0, :, :5], one.read(0, 5)[0][0])


def _session(llm, wq: str, chunks, **kw):
    engine = LLMEngine(llm, kv_config(window_quant=wq, **{**SMALL, **kw}), 1 << 30)
    engine.open("s", PREFIX)
    for i, c in enumerate(chunks):
        engine.append("s", c, {"chunk": i})
    return engine, engine.next_logits("s", QUESTION), list(engine.ask("s", QUESTION, 8))


@pytest.mark.parametrize("policy", ["sink_window", "offload"])
@pytest.mark.parametrize("mode", ["compact", "original"])
def test_int8_window_answers_like_the_float_window(policy: str, mode: str) -> None:
    """30 chunks through a 64-token window (25 evicted; offload: int8 blocks retrieved): first-token logits within
    LOGIT_TOLERANCE of the range; the greedy answer equal (the default compact layout), its first token equal in
    every layout (the tiny random model has near-ties later in 'original')."""
    llm, chunks = tiny_lm(), stream(30, 12)
    e_f, logits_f, tokens_f = _session(llm, "none", chunks, policy=policy, position_mode=mode)
    e_q, logits_q, tokens_q = _session(llm, "int8", chunks, policy=policy, position_mode=mode)
    assert e_q.stats("s").evicted_blocks == 25 and e_q.stats("s").window_used_tokens == 60
    spread = float(logits_f.max() - logits_f.min())
    diff = float((logits_f - logits_q).abs().max())
    assert 0 < diff <= LOGIT_TOLERANCE * spread, (diff, spread)
    assert tokens_q[0] == tokens_f[0]
    if mode == "compact":
        assert tokens_q == tokens_f
    assert e_q.bytes_per_stream() < 0.33 * e_f.bytes_per_stream()  # float32, head_dim 16: (16 + 4) / 64


def test_int8_window_survives_rebases_and_many_chunks() -> None:
    """Rebases rotate the int8 window's keys (dequantize, rotate, requantize once per rebase): after 260 chunks and
    several rebases the logits stay within tolerance of the float window under the same schedule."""
    llm, chunks = tiny_lm(), stream(260, 12)
    e_f, logits_f, tokens_f = _session(llm, "none", chunks, policy="sink_window", rebase_position=1024)
    e_q, logits_q, tokens_q = _session(llm, "int8", chunks, policy="sink_window", rebase_position=1024)
    assert e_q.stats("s").rebases == e_f.stats("s").rebases >= 2
    spread = float(logits_f.max() - logits_f.min())
    assert float((logits_f - logits_q).abs().max()) <= LOGIT_TOLERANCE * spread
    assert tokens_q == tokens_f


def test_int8_batched_answers_equal_one_at_a_time() -> None:
    """Three int8 streams answered together (one ragged batch per step) == each answered alone."""
    llm = tiny_lm()
    cfg = kv_config(window_quant="int8", **SMALL)
    together = LLMEngine(llm, cfg, 1 << 30)
    alone = {}
    for s in range(3):
        chunks = stream(6 + 3 * s, 10, seed=50 * s)
        together.open(f"s{s}", PREFIX)
        for c in chunks:
            together.append(f"s{s}", c)
        engine = LLMEngine(llm, cfg, 1 << 30)
        engine.open("x", PREFIX)
        for c in chunks:
            engine.append("x", c)
        alone[s] = list(engine.ask("x", QUESTION, 6))
    answers = [together.ask(f"s{s}", QUESTION, 6) for s in range(3)]
    assert [list(a) for a in answers] == [alone[s] for s in range(3)]
