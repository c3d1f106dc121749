"""Device and host bytes per stream, by construction (``cache.memory``): the reports of KV sessions and reference
stores equal the tensors they really hold, per stream and summed per replica, equal the on-paper formulas the
benchmarks use, and stay bounded over 10,000 frames."""
from __future__ import annotations

import pytest
import torch

from cache.cacher import StreamCacher
from cache.config import CacherConfig, GateConfig
from cache.kv import LLMEngine
from cache.kv.config import KVConfig, Sampling
from cache.kv.quant import QTensor
from cache.kv.session import reserved_bytes, session_memory
from cache.memory import MemoryReport, kv_slot_bytes, reference_bytes, session_bytes, stream_bytes
from cache.stc import signature_dim
from kv_support import embeds, kv_config, one_torch_thread, stream, tiny_lm  # noqa: F401
from stream.models.inputs import LLMInput
from stream.models.llm import TextLM

# budget 104 = 8 sinks + a 64-token window + a 32-token reserve; 16-token chunks fill the window exactly
CFG = dict(budget_tokens=104, sink_tokens=8, reserve_tokens=32, retrieve_tokens=16, policy="offload", quant="int8")
PREFIX, QUESTION = embeds(8, 1), embeds(5, 2)


def _storages(tensors) -> int:
    """Independent count: each distinct storage's bytes, read from torch."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _sink_tensors(session) -> list[torch.Tensor]:
    keys = session.sink_keys
    return [keys.data, keys.scale, keys.minimum] if isinstance(keys, QTensor) else [keys]


def _open(llm: TextLM, cfg: KVConfig, streams: dict[str, int]) -> LLMEngine:
    engine = LLMEngine(llm, cfg, 1 << 30)
    for sid, n in streams.items():
        engine.open(sid, PREFIX)
        for i, chunk in enumerate(stream(n, 16, seed=10 * len(sid) + n)):
            engine.append(sid, chunk, {"chunk": i})
    return engine


@pytest.mark.parametrize("wq", ["none", "int8"])
def test_kv_report_equals_the_tensors_held_and_the_formula(wq: str) -> None:
    llm = tiny_lm()
    cfg = kv_config(window_quant=wq, **CFG)
    engine = _open(llm, cfg, {"a": 12, "bb": 3})
    session = engine._sessions["a"]
    rep = engine.memory_report("a")
    held = session.cache.tensors() + _sink_tensors(session)
    # 1. the KV parts sum to the storages really held, and each part is whole slots of what it holds
    assert rep.kv_bytes == _storages(held) == sum(t.numel() * t.element_size() for t in held)
    slot = 2 * llm.num_layers * llm.num_kv_heads * (llm.head_dim * 4 if wq == "none" else llm.head_dim + 4)
    assert session.cache.slot_bytes == slot == kv_slot_bytes(llm.num_layers, llm.num_kv_heads, llm.head_dim, 4, wq)
    stats = engine.stats("a")
    assert rep.kv_window == stats.window_used_tokens * slot == 64 * slot
    assert rep.kv_sinks == 8 * slot + _storages(_sink_tensors(session))
    assert rep.kv_retrieved == 0 and rep.kv_reserve == 32 * slot and rep.queued_chunks == 0
    # 2. host: offloaded blocks (int8 codes + statistics) and their index entries, from the blocks themselves
    blocks = session.store.blocks()
    block_tensors = [t for b in blocks for q in (b.keys, b.values) for t in (q.data, q.scale, q.minimum)]
    assert rep.host_offloaded == _storages(block_tensors) + len(blocks) * (session.store.dim * 4 + 8) > 0
    # 3. the steady state equals the on-paper formula the benchmarks use, and the replica budget's reservation
    paper = session_memory(llm, cfg)
    assert (rep.kv_window, rep.kv_sinks, rep.kv_reserve) == (paper.kv_window, paper.kv_sinks, paper.kv_reserve)
    assert rep.kv_bytes == reserved_bytes(llm, cfg) == engine.bytes_per_stream() == engine.budget.reserved_bytes() // 2
    # 4. the stats carry it; the replica's report is the sum of its streams'
    assert stats.memory == rep
    assert engine.memory_report() == rep + engine.memory_report("bb")
    assert engine.memory_report("bb").kv_window == 48 * slot  # 3 chunks, window not full
    assert engine.memory_report().device_bytes == 2 * rep.kv_bytes


def test_retrieved_blocks_and_a_question_fill_the_reserve_then_leave() -> None:
    llm = tiny_lm()
    engine = _open(llm, kv_config(window_quant="int8", **CFG), {"a": 12})
    session = engine._sessions["a"]
    slot = session.cache.slot_bytes
    work = session.answer(LLMInput(QUESTION), 4, [], Sampling())
    forward = next(work)  # placed: retrieved blocks written after the window, the question's forward not run yet
    rep = session.memory()
    retrieved = session.cache.length - 8 - 64
    assert retrieved == sum(b.tokens for b in session.last_retrieval) == 16 and forward.embeds.shape[0] == 5
    assert rep.kv_retrieved == retrieved * slot and rep.kv_reserve == (32 - retrieved) * slot
    assert rep.kv_bytes == engine.bytes_per_stream()  # the split moves, the total does not
    work.close()
    assert session.memory().kv_retrieved == 0


class _ProbeLM(TextLM):
    """Calls ``probe()`` at every forward (on the engine's step loop, while the appending thread waits)."""

    def __init__(self, llm: TextLM) -> None:
        super().__init__(llm.decoder, llm.lm_head)
        self.probe, self.seen = None, []

    def forward(self, *args, **kw):
        if self.probe is not None:
            self.seen.append(self.probe())
        return super().forward(*args, **kw)


def test_a_chunk_counts_as_queued_until_it_is_prefilled() -> None:
    llm = _ProbeLM(tiny_lm())
    engine = LLMEngine(llm, kv_config(window_quant="int8", **CFG), 1 << 30)
    engine.open("a", PREFIX)
    chunk = embeds(16, 3)
    llm.probe = lambda: engine.memory_report("a").queued_chunks
    engine.append("a", chunk)
    assert llm.seen == [chunk.numel() * chunk.element_size()]
    assert engine.memory_report("a").queued_chunks == 0


def test_kv_bytes_stay_bounded_over_10000_frames() -> None:
    """10,000 frames (3 tokens each, 4 frames per chunk) on one int8 stream with an offload cap: device bytes never
    move from the reservation, host bytes stay under kv.offload_bytes, the report equals the tensors throughout."""
    llm = tiny_lm(layers=1)
    cfg = kv_config(window_quant="int8", **{**CFG, "offload_bytes": 60_000})
    engine = LLMEngine(llm, cfg, 1 << 30)
    engine.open("a", PREFIX)
    session, chunk = engine._sessions["a"], embeds(4 * 3, 7)  # [4 frames x 3 tokens, d]
    reserved = engine.bytes_per_stream()
    for i in range(10_000 // 4):
        engine.append("a", chunk + 0.01 * (i % 17), {"frames": [4 * i + k for k in range(4)]})
        if i % 250 == 249:
            rep = engine.memory_report("a")
            assert rep.device_bytes == reserved == _storages(session.cache.tensors() + _sink_tensors(session))
            assert 0 < rep.host_offloaded <= cfg.offload_bytes
    assert engine.stats("a").evicted_blocks > 2_400


# -- the reference store --------------------------------------------------------------------------------------------
def _tower(layers: int = 2):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             image_size=56, patch_size=14)
    return SiglipVisionModel(cfg).eval().encoder.layers


def _frames(n: int, scenes: int = 3, seed: int = 0) -> torch.Tensor:
    """``[n, 16, 32]`` patch embeddings: ``scenes`` views cut between every 5 frames, small noise per frame."""
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(scenes, 16, 32, generator=g)
    which = (torch.arange(n) // 5) % scenes
    return views[which] + 0.05 * torch.randn(n, 16, 32, generator=g)


def _cacher(placement: str, **kw) -> StreamCacher:
    return StreamCacher(CacherConfig(reference_placement=placement, gate=GateConfig(enabled=False), key_sketch=None,
                                     max_refs=2, **kw))


def _payload_tensors(cacher: StreamCacher) -> list[torch.Tensor]:
    store = cacher._store
    return [t for i in store.ids() for t in store.get(i).payload.tensors()]


@pytest.mark.parametrize("rolling", [True, False])
def test_host_and_device_references_give_identical_features_and_honest_bytes(rolling: bool) -> None:
    layers, frames = _tower(), _frames(40)
    device, host = _cacher("device", rolling=rolling), _cacher("host", rolling=rolling)
    for start in range(0, 40, 8):
        a = device.encode(frames[start : start + 8], layers)
        b = host.encode(frames[start : start + 8], layers)
        assert torch.equal(a, b)
    sd, sh = device.stats(), host.stats()
    assert sd["frames_reused"] == sh["frames_reused"] > 0 and sd["evictions"] == sh["evictions"] > 0
    for name in ("keys", "values", "update"):  # the host copies hold what the device store holds (rolling rows too)
        for i, j in zip(device._store.ids(), host._store.ids()):
            assert torch.equal(getattr(device._store.get(i).payload, name), getattr(host._store.get(j).payload, name))
    index = len(device._store) * (2 * signature_dim(16, 32, 4) * 4 + 8)
    dev, hst = device.memory(), host.memory()
    assert dev == MemoryReport(references=_storages(_payload_tensors(device)), host_references=index)
    assert hst == MemoryReport(host_references=_storages(_payload_tensors(host)) + index)
    assert dev.references == hst.host_references - index > 0
    assert dev.device_bytes + dev.host_bytes == device.memory_bytes() == host.memory_bytes()
    assert sh["reference_device_bytes"] == 0 and sh["reference_host_bytes"] == hst.host_references
    assert all(t.device.type == "cpu" for t in _payload_tensors(host))
    per_ref, entry = reference_bytes(2, 16, 32, 4, None, signature_dim(16, 32, 4))
    assert dev.references == len(device._store) * per_ref and index == len(device._store) * entry


def test_reference_bytes_stay_bounded_over_10000_frames() -> None:
    layers, frames = _tower(layers=1), _frames(10_000, scenes=7)
    cacher = _cacher("host")
    per_ref, entry = reference_bytes(1, 16, 32, 4, None, signature_dim(16, 32, 4))
    for start in range(0, 10_000, 8):
        cacher.encode(frames[start : start + 8], layers)
        if start % 2000 == 0:
            rep = cacher.memory()
            assert rep.device_bytes == 0 and rep.host_references == len(cacher._store) * (per_ref + entry)
            assert rep.host_references <= cacher.memory_bound(1, 16, 32)
    assert cacher.stats()["frames"] == 10_000 and len(cacher._store) == 2 and cacher.stats()["evictions"] > 100


# -- on paper: the 7B / SigLIP-so400m shape -------------------------------------------------------------------------
QWEN2_7B = dict(layers=28, kv_heads=4, head_dim=128)
SO400M_REF = dict(num_layers=27, tokens=729, dim=1152)


def _paper_stream(cfg: KVConfig, cacher: CacherConfig, refs: int, queued: int = 0) -> MemoryReport:
    session = session_bytes(QWEN2_7B["layers"], QWEN2_7B["kv_heads"], QWEN2_7B["head_dim"], 2, cfg.budget_tokens,
                            cfg.sink_tokens, cfg.window_tokens, cfg.window_quant)
    ref = reference_bytes(**SO400M_REF, element_size=2, sketch_dim=cacher.sketch_width(1152),
                          signature_dim=signature_dim(729, 1152, cacher.signature_grid))
    # host: the pruner's memory [d] float32 + previous frame [196, d] bf16 (stc_context at novelty horizon 1 holds
    # its background once), the gate's float16 thumbnail of 4:3 video (64 x 48 cells x 4 x 4 blocks, 3 channels)
    pruner, gate = 3584 * 4 + 196 * 3584 * 2, 3 * 256 * 192 * 2
    return stream_bytes(session, refs, ref, cacher.reference_placement, queued, 3584, 2, pruner_bytes=pruner,
                        gate_bytes=gate)


def test_the_default_config_holds_at_most_250_mb_per_7b_stream_on_the_device() -> None:
    chunk = 8 * 49  # one default chunk (8 frames x 49 kept tokens) in flight
    default = _paper_stream(KVConfig(), CacherConfig(), refs=CacherConfig().max_refs, queued=chunk)
    assert default.device_bytes <= 250e6 and default.references == 0  # every reference the store may hold: host
    assert default.queued_chunks == chunk * 3584 * 2
    assert default.kv_window == 6400 * 28 * 4 * 2 * (128 + 4)
    before = _paper_stream(KVConfig(window_quant="none"), CacherConfig(reference_placement="device"), refs=1)
    assert before.device_bytes > 2.3 * default.device_bytes  # the old layout: bf16 window + one reference on device
    assert before.kv_bytes == 8192 * 57_344 + 256 * 28_672


def test_bench_designs_reports_the_accounting_formulas() -> None:
    from benchmarks.bench_designs import component_bytes_7b

    for refs, queued in ((1, 0), (8, 392)):
        parts = component_bytes_7b(KVConfig(), CacherConfig(), refs, queued_tokens=queued)
        assert parts == _paper_stream(KVConfig(), CacherConfig(), refs=refs, queued=queued)
