"""A chunk longer than one KV block may be is appended as several consecutive blocks, exactly: under the budget the
answer equals a full cache's (1-D RoPE, both policies and position modes), split positions equal the whole piece's
(M-RoPE included), and the real tiny Qwen families answer the same whether their chunks are split or not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.kv.config import KVConfig
from stream.models.inputs import LLMInput
from tests.kv_support import embeds, kv_config, reference, run_engine, tiny_lm
from tests.kv_support import one_torch_thread  # noqa: F401  (autouse fixture)

PREFIX, QUESTION = embeds(5, 1), embeds(6, 2)
LONG = [embeds(150, 10), embeds(30, 11), embeds(200, 12)]  # 150 and 200 > the 64-token block limit below


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def llm(request):
    return tiny_lm(request.param)


@pytest.mark.parametrize("policy", ["sink_window", "offload"])
@pytest.mark.parametrize("mode", ["compact", "original"])
def test_a_chunk_longer_than_a_block_is_split_and_equals_a_full_cache(llm, policy, mode):
    cfg = kv_config(policy=policy, position_mode=mode, budget_tokens=512, reserve_tokens=64, retrieve_tokens=32)
    tokens, engine = run_engine(llm, cfg, PREFIX, LONG, QUESTION)
    assert tokens == reference(llm, [PREFIX, *LONG], QUESTION)[0]
    stats = engine.stats("s")
    assert stats.blocks == 3 + 1 + 4 and stats.evicted_blocks == 0  # 150 -> 3 blocks, 200 -> 4 blocks
    assert stats.stream_tokens == 5 + 380 and stats.next_position == 5 + 380


def test_split_blocks_evict_and_stay_within_the_budget(llm):
    cfg = kv_config(policy="offload", budget_tokens=8 + 96 + 64, sink_tokens=8, reserve_tokens=64,
                    retrieve_tokens=32)
    tokens, engine = run_engine(llm, cfg, PREFIX, [embeds(300, 20 + i) for i in range(4)], QUESTION)
    stats = engine.stats("s")
    assert len(tokens) == 8 and stats.peak_resident_tokens <= cfg.budget_tokens
    assert stats.window_used_tokens <= cfg.window_tokens and stats.offloaded_blocks > 0


def test_split_positions_equal_the_whole_piece():
    """M-RoPE-like positions (a text run, then 2-D visual groups): every part's tokens land where the whole
    piece puts them, parts respect the limit, and the extents add up."""
    from cache.kv.pieces import split_piece

    groups = [torch.tensor([[0] * 3, [0, 1, 2], [0, 1, 2]])]  # 3 text tokens (rows equal)
    base = 3
    for _ in range(3):  # three visual groups of 4x5 tokens at (t, t+row, t+col)
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
        groups.append(torch.stack([torch.full((20,), base), base + rows.flatten(), base + cols.flatten()]))
        base += 5
    rel = torch.cat(groups, dim=1)  # [3, 63]
    piece = LLMInput(torch.randn(63, 8), rel, meta={"pts": [0.0]})
    for limit in (7, 16, 20, 33, 62):
        parts = split_piece(piece, limit)
        assert all(p.tokens <= limit for p, _ in parts) and sum(p.tokens for p, _ in parts) == 63
        assert sum(extent for _, extent in parts) == piece.extent
        placed, offset = [], 0
        for part, extent in parts:
            assert int(part.positions.min()) >= 0
            placed.append(part.positions + offset)
            offset += extent
        assert torch.equal(torch.cat(placed, dim=1), rel)
        assert torch.equal(torch.cat([p.embeds for p, _ in parts]), piece.embeds)
    plain = split_piece(LLMInput(torch.randn(10, 8)), 4)
    assert [(p.tokens, e) for p, e in plain] == [(3, 3), (4, 4), (3, 3)]
    with pytest.raises(ValueError, match="extras"):
        split_piece(LLMInput(torch.randn(10, 8), extras={"deep": torch.zeros(1)}), 4)


@pytest.mark.parametrize("qwen", ["qwen2_5_vl", "qwen3_vl"], indirect=True)
def test_qwen_answers_are_the_same_with_chunks_split_or_whole(qwen):
    """Qwen2.5-VL chunks (3-row M-RoPE) are split at a small reserve; Qwen3-VL's carry DeepStack extras and go whole
    after making room. Either way the greedy answer equals the one with a reserve holding every chunk."""
    from pruner.config import PrunerConfig
    from serve.core.options import StreamOptions
    from serve.core.pipeline import StreamPipeline
    from stream.frames import Frame

    rgb = np.random.default_rng(3).integers(0, 255, (8, 320, 420, 3), dtype=np.uint8)  # [frames, H, W, 3]

    def answer(reserve: int) -> tuple[str, int]:
        kv = KVConfig(budget_tokens=4096, reserve_tokens=reserve, retrieve_tokens=16, quant="none", window_quant="none")
        pipe = StreamPipeline(qwen, StreamOptions(kv=kv, pruner=PrunerConfig(enabled=False)), 1 << 30)
        sid = pipe.open("s")
        pipe.ingest(sid, [Frame(rgb[i], i / 2, i) for i in range(8)])
        text = "".join(pipe.ask(sid, "What?", max_new_tokens=6))
        blocks = pipe.llm.engine.stats(sid).blocks
        pipe.shutdown()
        return text, blocks

    small, big = answer(48), answer(2048)
    assert small[0] == big[0]
    if qwen.family == "qwen2_5_vl":
        assert small[1] > big[1]  # the chunks really were split
