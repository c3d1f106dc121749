"""One stream's bounded KV session against plain full-cache oracles (Qwen2 and Llama decoders).

Stream used throughout: prefix of 5 tokens, chunks of 8 tokens, question of 6 tokens, greedy decoding.
With ``window=24`` (3 chunks), chunk 0 is evicted right after chunk 3 is prefilled (chunk 3 still saw it).
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from cache.kv import LLMEngine
from stream.models.rope import move_rope, rope_inv_freq
from tests.kv_support import RecordingLM, embeds, kv_config, reference, run_engine, stream, tiny_lm
from tests.kv_support import one_torch_thread  # noqa: F401  (autouse fixture)

PREFIX, QUESTION = embeds(5, 1), embeds(6, 2)
CHUNKS = stream(4, 8)
EVICTING = dict(budget_tokens=8 + 24 + 40, sink_tokens=8, reserve_tokens=40, retrieve_tokens=16)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def llm(request):
    """Both decoder families (LLaVA-OneVision's LLM is Qwen2, SmolVLM's is Llama) for the oracle tests."""
    return tiny_lm(request.param)


@pytest.fixture(scope="module")
def qwen():
    return tiny_lm("qwen2")


@pytest.mark.parametrize("policy", ["sink_window", "offload"])
@pytest.mark.parametrize("mode", ["compact", "original"])
def test_under_budget_equals_full_cache(llm, policy, mode):
    rec = RecordingLM(llm)
    tokens, engine = run_engine(rec, kv_config(policy=policy, position_mode=mode), PREFIX, CHUNKS, QUESTION)
    ref_tokens, ref_logits = reference(llm, [PREFIX, *CHUNKS], QUESTION)
    assert tokens == ref_tokens
    torch.testing.assert_close(rec.logits_at(37, 6), ref_logits, rtol=1e-4, atol=1e-4)
    assert engine.stats("s").evicted_blocks == 0


def test_sink_window_original_equals_full_cache_without_the_evicted_block(llm):
    tokens, engine = run_engine(llm, kv_config(policy="sink_window", position_mode="original", **EVICTING),
                                PREFIX, CHUNKS, QUESTION)
    dropped, _ = reference(llm, [PREFIX, *CHUNKS], QUESTION, drop=(5, 13))
    full, _ = reference(llm, [PREFIX, *CHUNKS], QUESTION)
    assert tokens == dropped
    assert dropped != full  # the oracle is sensitive to the eviction
    stats = engine.stats("s")
    assert (stats.evicted_blocks, stats.window_blocks, stats.resident_tokens) == (1, 3, 5 + 24)


@torch.inference_mode()
def test_sink_window_compact_moves_sinks_next_to_the_window(llm):
    """Oracle without our RoPE code: the model itself prefills the prefix at positions 8..12 (RoPE is relative, so
    its keys are the sink keys moved there), chunks 1-3 come from the full run, the question goes at 37."""
    rec = RecordingLM(llm)
    tokens, _ = run_engine(rec, kv_config(policy="sink_window", **EVICTING), PREFIX, CHUNKS, QUESTION)
    full, moved = DynamicCache(), DynamicCache()
    pos = 0
    for piece in [PREFIX, *CHUNKS]:
        llm.forward(piece[None], cache=full, position_ids=torch.arange(pos, pos + len(piece))[None])
        pos += len(piece)
    llm.forward(PREFIX[None], cache=moved, position_ids=torch.arange(8, 13)[None])
    for m, f in zip(moved.layers, full.layers):
        m.keys, m.values = torch.cat([m.keys, f.keys[:, :, 13:]], 2), torch.cat([m.values, f.values[:, :, 13:]], 2)
    logits = llm.forward(QUESTION[None], cache=moved, position_ids=torch.arange(37, 43)[None])
    torch.testing.assert_close(rec.logits_at(37, 6), logits[0, -1], rtol=1e-4, atol=1e-4)
    assert tokens[0] == int(logits[0, -1].argmax())


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_offload_retrieving_all_evicted_history_equals_full_cache(llm, mode):
    rec = RecordingLM(llm)
    cfg = kv_config(policy="offload", position_mode=mode, **EVICTING)
    tokens, engine = run_engine(rec, cfg, PREFIX, CHUNKS, QUESTION)
    full, full_logits = reference(llm, [PREFIX, *CHUNKS], QUESTION)
    assert tokens == full
    torch.testing.assert_close(rec.logits_at(37, 6), full_logits, rtol=1e-4, atol=1e-4)
    stats = engine.stats("s")
    assert stats.evicted_blocks == 1 and stats.offloaded_blocks == 1
    assert [b.meta for b in stats.last_retrieval] == [{"chunk": 0}]


@pytest.mark.parametrize("quant, tolerance", [("int8", 0.05), ("int4", 0.35)])
def test_quantized_offload_is_close_to_full_cache(llm, quant, tolerance):
    """Retrieved quantized history moves the answer's logits far less than not retrieving it at all."""
    rec = RecordingLM(llm)
    run_engine(rec, kv_config(policy="offload", quant=quant, **EVICTING), PREFIX, CHUNKS, QUESTION)
    _, full = reference(llm, [PREFIX, *CHUNKS], QUESTION)
    _, dropped = reference(llm, [PREFIX, *CHUNKS], QUESTION, drop=(5, 13))
    error = (rec.logits_at(37, 6) - full).abs().max()
    assert error < tolerance * (dropped - full).abs().max()


@pytest.mark.parametrize("policy", ["sink_window", "offload"])
def test_rebasing_positions_does_not_change_answers(llm, policy):
    """RoPE is relative: rotating the window back gives the answers of never rotating it -- asked after every
    chunk, so also right after a re-base (when retrieved blocks must still fit between sinks and window)."""
    chunks = stream(22, 48, seed=300)  # 1061 positions: passes rebase_position=1024 once the reserve is counted
    common = dict(policy=policy, budget_tokens=8 + 96 + 64, sink_tokens=8, reserve_tokens=64, retrieve_tokens=48)
    runs = []
    for rebase in (1024, 1 << 20):
        rec = RecordingLM(llm)
        engine = LLMEngine(rec, kv_config(rebase_position=rebase, **common), 1 << 30)
        engine.open("s", PREFIX)
        answers = []
        for chunk in chunks:
            engine.append("s", chunk)
            tokens = list(engine.ask("s", QUESTION, 2))
            answers.append((tokens, rec.logits_at(engine.stats("s").next_position, 6)))
        stats = engine.stats("s")
        assert (stats.rebases > 0) == (rebase == 1024)
        assert max(int(p.max()) for p, _ in rec.calls) < rebase
        runs.append(answers)
    for (tokens_a, logits_a), (tokens_b, logits_b) in zip(*runs):
        assert tokens_a == tokens_b
        torch.testing.assert_close(logits_a, logits_b, rtol=1e-3, atol=1e-3)


@torch.inference_mode()
def _streaming_oracle(llm, inv_freq, retrieved: int, mode: str) -> torch.Tensor:
    """Window of 2 chunks: replay the session's prefill/evict sequence with DynamicCache, then lay out
    [sinks, retrieved chunk, chunks 2-3] at the positions ``mode`` prescribes; first logits of the question.
    Our ``move_rope`` is checked against the model's rotary embedding in test_kv_units."""
    cache, kept = DynamicCache(), {}
    spans = {"prefix": (0, 5), 0: (5, 13), 1: (13, 21), 2: (21, 29), 3: (29, 37)}

    def cut(a: int, b: int, name) -> None:  # move cache tokens [a, b) out into ``kept``
        kept[name] = [(l.keys[:, :, a:b], l.values[:, :, a:b]) for l in cache.layers]
        for l in cache.layers:
            l.keys, l.values = torch.cat([l.keys[:, :, :a], l.keys[:, :, b:]], 2), torch.cat(
                [l.values[:, :, :a], l.values[:, :, b:]], 2)

    for name in ["prefix", 0, 1, 2, 3]:
        a, b = spans[name]
        if mode == "compact" and name == 3:  # compact streaming: sinks sit right before the window [c1, c2]
            for l in cache.layers:
                l.keys[:, :, :5] = move_rope(l.keys[:, :, :5], torch.arange(0, 5), torch.arange(8, 13), inv_freq)
        llm.forward((PREFIX if name == "prefix" else CHUNKS[name])[None], cache=cache,
                    position_ids=torch.arange(a, b)[None])
        if name in (2, 3):
            cut(5, 13, name - 2)  # the oldest window chunk leaves after the new one is prefilled
    cut(0, 5, "prefix")
    sink_src = torch.arange(8, 13) if mode == "compact" else torch.arange(0, 5)
    a, b = spans[retrieved]
    sink_at, block_at = (torch.arange(8, 13), torch.arange(13, 21)) if mode == "compact" else (
        torch.arange(0, 5), torch.arange(a, b))
    layout = DynamicCache()
    for i, layer in enumerate(cache.layers):
        (sk, sv), (bk, bv) = kept["prefix"][i], kept[retrieved][i]
        sk = move_rope(sk, sink_src, sink_at, inv_freq)
        bk = move_rope(bk, torch.arange(a, b), block_at, inv_freq)
        layout.update(torch.cat([sk, bk, layer.keys], 2), torch.cat([sv, bv, layer.values], 2), i)
    return llm.forward(QUESTION[None], cache=layout, position_ids=torch.arange(37, 43)[None])[0, -1]


@pytest.mark.parametrize("mode", ["compact", "original"])
def test_offload_places_a_retrieved_block_where_the_position_mode_says(llm, mode):
    """Two evictions, one block (of two) retrieved: compact puts it (and the sinks) right before the window."""
    rec = RecordingLM(llm)
    cfg = kv_config(policy="offload", position_mode=mode, budget_tokens=8 + 16 + 40, sink_tokens=8,
                    reserve_tokens=40, retrieve_tokens=8)
    _, engine = run_engine(rec, cfg, PREFIX, CHUNKS, QUESTION, n=1)
    (block,) = engine.stats("s").last_retrieval
    inv_freq = rope_inv_freq(llm.decoder, llm.head_dim)
    expected = _streaming_oracle(llm, inv_freq, block.meta["chunk"], mode)
    torch.testing.assert_close(rec.logits_at(37, 6), expected, rtol=1e-4, atol=1e-4)
    other = _streaming_oracle(llm, inv_freq, block.meta["chunk"], "original" if mode == "compact" else "compact")
    assert (other - expected).abs().max() > 1e-2  # the two layouts are distinguishable


def test_original_positions_follow_the_stream(qwen):
    rec = RecordingLM(qwen)
    chunks = stream(20, 8)
    _, engine = run_engine(rec, kv_config(policy="offload", position_mode="original", **EVICTING), PREFIX, chunks,
                           QUESTION, n=2)
    stats = engine.stats("s")
    assert stats.next_position == stats.stream_tokens == 5 + 20 * 8 and stats.rebases == 0
    rec.logits_at(165, 6)  # the question sat right after the last stream token


def _needle_stream(question: torch.Tensor, n: int = 30, at: int = 7) -> list[torch.Tensor]:
    chunks = stream(n, 8, seed=500)
    chunks[at] = question[torch.arange(8) % len(question)] + 0.05 * embeds(8, 999)
    return chunks


@pytest.mark.parametrize("score", ["key_key", "query_key"])
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_retrieval_brings_back_the_planted_block(score, quant):
    """A chunk that repeats the question is found among 22 offloaded noise chunks.

    For ``query_key`` the random model's query projection is tied to its key projection, so that "attends to the
    question's content" is meaningful for untrained weights.
    """
    llm = tiny_lm("qwen2", seed=3)
    if score == "query_key":
        for layer in llm.decoder.layers:
            attn = layer.self_attn
            group = attn.q_proj.out_features // attn.k_proj.out_features
            with torch.no_grad():
                w = attn.k_proj.weight.view(2, -1, llm.hidden_size).repeat_interleave(group, 0)
                attn.q_proj.weight.copy_(w.reshape_as(attn.q_proj.weight))
                attn.q_proj.bias.copy_(attn.k_proj.bias.view(2, -1).repeat_interleave(group, 0).flatten())
    question = embeds(8, 77)
    cfg = kv_config(policy="offload", retrieval_score=score, quant=quant, **EVICTING)
    _, engine = run_engine(llm, cfg, PREFIX, _needle_stream(question), question, n=1)
    stats = engine.stats("s")
    assert stats.offloaded_blocks == 27
    assert len(stats.last_retrieval) == 2  # retrieve_tokens=16 -> the two best 8-token blocks, in stream order
    best = max(stats.last_retrieval, key=lambda b: b.score)
    assert best.meta == {"chunk": 7}
    others = sorted(b.score for b in stats.last_retrieval if b is not best)
    assert best.score > others[-1] + 0.1


def test_questions_leave_the_stream_unchanged(qwen):
    cfg = kv_config(policy="offload", **EVICTING)
    engine = LLMEngine(qwen, cfg, 1 << 30)
    engine.open("s", PREFIX)
    for chunk in CHUNKS[:3]:
        engine.append("s", chunk)
    before = engine.stats("s")
    first = list(engine.ask("s", QUESTION, 6))
    assert list(engine.ask("s", QUESTION, 6)) == first
    it = engine.ask("s", QUESTION, 6)
    next(it)
    it.close()  # abandoned after one token: rolled back, lock released
    after = engine.stats("s")
    assert (after.resident_tokens, after.next_position) == (before.resident_tokens, before.next_position)
    engine.append("s", CHUNKS[3])
    asked_between = list(engine.ask("s", QUESTION, 6))
    never_asked, _ = run_engine(qwen, cfg, PREFIX, CHUNKS, QUESTION, n=6)
    assert asked_between == never_asked


def test_adapter_contract_end_to_end(tiny_adapter):
    """The lead's adapter embeddings through the engine == plain full-cache greedy decoding."""
    llm = tiny_adapter.llm
    prefix = llm.embed(tiny_adapter.stream_prefix_ids())
    gen = torch.Generator().manual_seed(0)
    chunks = [
        tiny_adapter.chunk_embeds([torch.randn(tiny_adapter.tokens_per_frame, llm.hidden_size, generator=gen)], [t])
        for t in (0.0, 1.0, 2.0)
    ]
    question = tiny_adapter.question_embeds("What is moving?")
    reserve = max(c.shape[0] for c in chunks) + 64
    budget = prefix.shape[0] + sum(c.shape[0] for c in chunks) + reserve
    cfg = kv_config(budget_tokens=budget, sink_tokens=prefix.shape[0], reserve_tokens=reserve, retrieve_tokens=32,
                    rebase_position=max(4096, 2 * budget))
    engine = LLMEngine(llm, cfg, 1 << 30)
    engine.open("cam", prefix)
    for i, chunk in enumerate(chunks):
        engine.append("cam", chunk, {"pts": float(i)})
    tokens = list(engine.ask("cam", question, 6, tiny_adapter.eos_token_ids))
    expected, _ = reference(llm, [prefix, *chunks], question, n=6)
    cut = next((i for i, t in enumerate(expected) if t in tiny_adapter.eos_token_ids), len(expected))
    assert tokens == expected[:cut]
    assert isinstance(tiny_adapter.tokenizer.decode(tokens), str)
