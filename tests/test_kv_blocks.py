"""Scoring a stream's retained history block by block (the moments search's LLM side), against oracles.

* yes/no per block: with a one-layer model a block's keys and values do not depend on what came before it, so the
  probabilities with "sinks + that block" as context must equal a plain full-cache forward of the prefix, that chunk
  and the question -- for window blocks and offloaded ones alike; with two layers the first block still must.
* retrieval per block: an offloaded block scores exactly what the FAISS search of the question's probe vector gives,
  and a window block scores the same before and after it is offloaded.
* Scoring never changes the stream (the greedy answer afterwards is unchanged), batches stay within their bounds, and
  the listing stays bounded over 10,000 frames.
"""
from __future__ import annotations

import pytest
import torch

from cache.kv import LLMEngine
from cache.kv.forward import drive
from cache.kv.stats import BlockInfo
from tests.kv_doubles import FastForwardLM
from tests.kv_support import embeds, kv_config, reference, stream, tiny_lm
from tests.kv_support import one_torch_thread  # noqa: F401  (autouse fixture)

PREFIX, QUESTION = embeds(5, 1), embeds(6, 2)
ALL = [[i] for i in range(128)]  # every token as its own "choice": the whole next-token distribution


@pytest.fixture(scope="module")
def one_layer():
    return tiny_lm("qwen2", layers=1)


@pytest.fixture(scope="module")
def two_layers():
    return tiny_lm("qwen2")


def _engine(llm, chunks, **cfg) -> LLMEngine:
    engine = LLMEngine(llm, kv_config(**cfg), 1 << 30)
    engine.open("s", PREFIX)
    for i, chunk in enumerate(chunks):
        engine.append("s", chunk, {"pts": [2.0 * i, 2.0 * i + 1.0]})
    return engine


def _oracle(llm, chunk) -> torch.Tensor:
    return torch.softmax(reference(llm, [PREFIX, chunk], QUESTION, n=1)[1].float(), -1)


@pytest.mark.parametrize("policy", ["sink_window", "offload"])
def test_yes_no_per_block_equals_a_fresh_context_of_that_block(one_layer, policy):
    chunks = stream(6, 8)
    engine = _engine(one_layer, chunks, policy=policy, budget_tokens=8 + 24 + 40, reserve_tokens=40)
    blocks = engine.blocks("s")
    if policy == "offload":
        assert {b.offloaded for b in blocks} == {True, False}  # both kinds are scored
    assert [b.block_id for b in blocks] == sorted(b.block_id for b in blocks)
    scored = engine.block_choices("s", QUESTION, blocks, ALL)
    for s in scored:
        got = torch.tensor(s.choices)
        assert torch.allclose(got, _oracle(one_layer, chunks[s.block.block_id]), atol=1e-5)
        assert s.block.pts_start == 2.0 * s.block.block_id and s.block.pts_end == s.block.pts_start + 1


def test_first_block_exact_with_two_layers_and_the_stream_is_unchanged(two_layers):
    chunks = stream(4, 8)
    engine = _engine(two_layers, chunks, policy="offload", budget_tokens=8 + 24 + 40, reserve_tokens=40)
    before = list(engine.ask("s", QUESTION, 6))
    blocks = engine.blocks("s")
    first = next(s for s in engine.block_choices("s", QUESTION, blocks, ALL) if s.block.block_id == 0)
    assert torch.allclose(torch.tensor(first.choices), _oracle(two_layers, chunks[0]), atol=1e-5)
    yes_no = engine.block_choices("s", QUESTION, blocks, [[3, 4], [7]])
    for s in yes_no:
        assert s.score == pytest.approx(s.choices[0] / sum(s.choices))
    engine.block_relevance("s", QUESTION, blocks)
    assert list(engine.ask("s", QUESTION, 6)) == before  # nothing of the scoring stays in the stream


def test_retrieval_score_is_the_retrieval_search_score(two_layers):
    chunks = stream(3, 8)
    cfg = dict(policy="offload", budget_tokens=8 + 24 + 40, reserve_tokens=40)
    engine = _engine(two_layers, chunks, **cfg)
    window_scores = {s.block.block_id: s.score for s in engine.block_relevance("s", QUESTION, engine.blocks("s"))}
    assert all(v is not None for v in window_scores.values())
    for i, chunk in enumerate(stream(4, 8, seed=900)):  # push the first blocks out to the offloaded store
        engine.append("s", chunk, {"pts": [100.0 + i]})
    session = engine._sessions["s"]
    blocks = engine.blocks("s")
    later = {s.block.block_id: s.score for s in engine.block_relevance("s", QUESTION, blocks)}
    vector = session._question_vector(engine._check_piece(QUESTION, "q"))  # the loop is idle: safe here
    searched = dict(session.store.search(vector, len(session.store)))
    for b in blocks:
        if b.offloaded:
            assert later[b.block_id] == pytest.approx(searched[b.block_id], abs=1e-6)
    moved = [i for i in window_scores if any(b.block_id == i and b.offloaded for b in blocks)]
    assert moved, "some window blocks were offloaded"
    for i in moved:  # a block scores the same in the window and after offload
        assert later[i] == pytest.approx(window_scores[i], abs=1e-4)


def test_time_filter_and_probe_batches(two_layers):
    engine = _engine(two_layers, stream(6, 8), policy="sink_window", budget_tokens=256)
    assert [b.block_id for b in engine.blocks("s", since=2.5, until=6.0)] == [1, 2, 3]
    session = engine._sessions["s"]
    blocks = [BlockInfo(i, 40, None, None, False) for i in range(40)]
    batches = engine._probe_batches(session, blocks, question=6)
    per = 5 + 40 + 6
    assert all(len(b) <= engine.config.scheduler.max_batch_rows and len(b) * per <= 256 for b in batches)
    assert sum(batches, []) == list(range(40))


def test_block_listing_and_scoring_stay_bounded_over_10000_frames(two_layers):
    fast = FastForwardLM(two_layers)
    fast.fast_forward = True
    cfg = kv_config(policy="offload", quant="int4", budget_tokens=8 + 64 + 32, sink_tokens=8, reserve_tokens=32,
                    retrieve_tokens=16, offload_bytes=150_000, rebase_position=1024)
    engine = LLMEngine(fast, cfg, 1 << 30)
    engine.open("a", PREFIX)
    session, frame = engine._sessions["a"], engine._check_piece(embeds(4, 3), "frame")
    longest = 0
    for i in range(10_000):  # the session's own append, driven here (the step loop is idle): no thread hand-off
        drive(session.append(frame, {"pts": [float(i)]}), fast)
        if i % 500 == 499:
            st = engine.stats("a")
            blocks = engine.blocks("a")
            assert len(blocks) == st.window_blocks + st.offloaded_blocks
            longest = max(longest, len(blocks))
    assert longest < 2_000 and engine.stats("a").dropped_blocks > 8_000
    recent = engine.blocks("a", since=9_990.0)
    assert [b.pts_start for b in recent] == [float(t) for t in range(9_990, 10_000)]
    fast.fast_forward = False  # real forwards for the scoring itself
    scored = engine.block_choices("a", QUESTION, recent, [[1], [2]])
    assert len(scored) == 10 and all(s.score is not None for s in scored)
