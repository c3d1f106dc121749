"""The shared engine: stream isolation, concurrency, closing, the replica memory budget, long-stream bounds."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from cache.kv import KVCapacityError, LLMEngine, StreamExistsError, UnknownStreamError
from tests.kv_doubles import FastForwardLM
from stream.errors import ConfigError, RequestError
from stream.models.inputs import LLMInput
from tests.kv_support import embeds, kv_config, run_engine, stream, tiny_lm
from tests.kv_support import one_torch_thread  # noqa: F401  (autouse fixture)

PREFIX, QUESTION = embeds(5, 1), embeds(6, 2)
SMALL = dict(budget_tokens=8 + 24 + 40, sink_tokens=8, reserve_tokens=40, retrieve_tokens=16)


@pytest.fixture(scope="module")
def llm():
    return tiny_lm("qwen2")


def _streams():
    return {name: stream(6, 8, seed=1000 * (i + 1)) for i, name in enumerate(["a", "b", "c"])}


def test_sessions_are_isolated(llm):
    """Interleaved streams answer exactly as each would alone."""
    cfg = kv_config(policy="offload", **SMALL)
    chunks = _streams()
    alone = {name: run_engine(llm, cfg, PREFIX, c, QUESTION)[0] for name, c in chunks.items()}
    assert len({tuple(t) for t in alone.values()}) == 3  # the streams really differ
    engine = LLMEngine(llm, cfg, 1 << 30)
    for name in chunks:
        engine.open(name, PREFIX)
    for i in range(6):
        for name, c in chunks.items():
            engine.append(name, c[i], {"chunk": i})
            if i == 3:
                list(engine.ask(name, QUESTION, 3))  # questions in between change nothing
    assert {name: list(engine.ask(name, QUESTION, 8)) for name in chunks} == alone


def test_concurrent_calls_on_different_streams(llm):
    """Threads append and ask on their own streams at the same time; answers equal the serial ones."""
    cfg = kv_config(policy="offload", **SMALL)
    chunks = _streams()
    alone = {name: run_engine(llm, cfg, PREFIX, c, QUESTION)[0] for name, c in chunks.items()}
    engine = LLMEngine(llm, cfg, 1 << 30)
    results, errors = {}, []

    def worker(name: str) -> None:
        try:
            engine.open(name, PREFIX)
            for i, chunk in enumerate(chunks[name]):
                engine.append(name, chunk, {"chunk": i})
                list(engine.ask(name, QUESTION, 2))
            results[name] = list(engine.ask(name, QUESTION, 8))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == alone


def test_two_answers_in_flight_interleave(llm):
    engine = LLMEngine(llm, kv_config(policy="sink_window", **SMALL), 1 << 30)
    expected = {}
    for name, c in _streams().items():
        engine.open(name, PREFIX)
        for chunk in c:
            engine.append(name, chunk)
        expected[name] = list(engine.ask(name, QUESTION, 8))
    a, b = engine.ask("a", QUESTION, 8), engine.ask("b", QUESTION, 8)
    got = {"a": [], "b": []}
    for _ in range(8):  # token by token, alternating between the two open answers
        got["a"].append(next(a))
        got["b"].append(next(b))
    assert got == {"a": expected["a"], "b": expected["b"]}


def test_closing_a_stream_frees_its_memory(llm):
    engine = LLMEngine(llm, kv_config(policy="offload", quant="int8", **SMALL), 1 << 30)
    assert engine.memory_bytes() == 0
    engine.open("a", PREFIX)
    for chunk in stream(10, 8):
        engine.append("a", chunk)
    stats = engine.stats("a")
    assert stats.offloaded_blocks == 7 and engine.memory_bytes() == stats.held_bytes > stats.reserved_bytes
    buffer = weakref.ref(engine._sessions["a"].cache.layers[0].k_buf)
    assert engine.close("a") == stats.held_bytes
    gc.collect()
    assert engine.memory_bytes() == 0 and buffer() is None
    with pytest.raises(UnknownStreamError) as err:
        engine.stats("a")
    assert err.value.status == 404
    engine.open("a", PREFIX)  # the id can be reused


def test_close_stops_an_answer_in_flight_at_the_next_step(llm):
    engine = LLMEngine(llm, kv_config(policy="sink_window", **SMALL), 1 << 30)
    engine.open("a", PREFIX)
    engine.append("a", embeds(8, 5))
    answer = engine.ask("a", QUESTION, 30)
    next(answer)  # the answer is in flight and its client reads no further
    closer = threading.Thread(target=engine.close, args=("a",))
    closer.start()
    closer.join(10)
    assert not closer.is_alive() and engine.memory_bytes() == 0  # close did not wait for the answer to end
    steps = engine.scheduler_stats().steps
    rest = list(answer)  # the tokens generated before the close, then a quiet end
    assert len(rest) < 29 and engine.scheduler_stats().steps == steps
    with pytest.raises(UnknownStreamError):
        engine.append("a", embeds(8, 6))


def test_replica_budget_refuses_new_streams_when_full(llm):
    cfg = kv_config(policy="sink_window", **SMALL)
    per_stream = LLMEngine(llm, cfg, 1 << 30).bytes_per_stream()
    engine = LLMEngine(llm, cfg, int(2.5 * per_stream))
    engine.open("a", PREFIX)
    engine.open("b", PREFIX)
    with pytest.raises(KVCapacityError, match="close a stream") as err:
        engine.open("c", PREFIX)
    assert err.value.status == 503 and engine.stream_ids() == ["a", "b"]
    engine.close("a")
    engine.open("c", PREFIX)
    with pytest.raises(ConfigError, match="cannot hold one stream"):
        LLMEngine(llm, cfg, per_stream - 1)


def test_replica_budget_drops_the_oldest_offloaded_history_first(llm):
    cfg = kv_config(policy="offload", quant="none", **SMALL)
    per_stream = LLMEngine(llm, cfg, 1 << 30).bytes_per_stream()
    probe = LLMEngine(llm, cfg, 1 << 30)
    probe.open("x", PREFIX)
    for chunk in stream(4, 8):
        probe.append("x", chunk)
    block = probe.stats("x").offloaded_bytes  # one offloaded 8-token block, with its index entry
    limit = 2 * per_stream + 6 * block
    engine = LLMEngine(llm, cfg, limit)
    engine.open("a", PREFIX)
    for chunk in stream(15, 8, seed=10):  # a offloads 12 blocks into the room b's reservation will need
        engine.append("a", chunk)
    assert (engine.stats("a").offloaded_blocks, engine.stats("a").dropped_blocks) == (12, 0)
    engine.open("b", PREFIX)  # fits only by dropping a's oldest history
    a = engine.stats("a")
    assert a.offloaded_blocks + a.dropped_blocks == 12 and a.offloaded_blocks <= 6
    kept = a.offloaded_blocks
    for chunk in stream(5, 8, seed=20):  # b offloads 2 blocks -> a's 2 oldest go
        engine.append("b", chunk)
    a = engine.stats("a")
    assert (a.offloaded_blocks, engine.stats("b").offloaded_blocks) == (kept - 2, 2)
    survivors = list(engine._sessions["a"].store._blocks)
    assert survivors == list(range(15 - 3 - len(survivors), 12))  # the newest of a's evicted blocks survive
    with pytest.raises(KVCapacityError, match="close a stream"):
        engine.open("c", PREFIX)
    assert engine.stats("a").offloaded_blocks == kept - 2  # a refused stream destroys no history
    assert engine.memory_bytes() <= limit


def test_memory_stays_within_budget_over_10000_frames(llm):
    """10,000 one-frame chunks (KV written by the fast-forward stub) into an offload stream, plus a second
    stream competing for the replica budget; every bound holds after every call."""
    fast = FastForwardLM(llm)
    fast.fast_forward = True
    cfg = kv_config(policy="offload", quant="int4", budget_tokens=8 + 64 + 32, sink_tokens=8, reserve_tokens=32,
                    retrieve_tokens=16, offload_bytes=150_000, rebase_position=1024)
    per_stream = LLMEngine(fast, cfg, 1 << 30).bytes_per_stream()
    limit = 2 * per_stream + 200_000
    engine = LLMEngine(fast, cfg, limit)
    engine.open("a", PREFIX)
    engine.open("b", PREFIX)
    frame = embeds(4, 3)
    peak_memory = 0
    for i in range(10_000):
        engine.append("a", frame, {"frame": i})
        if i % 10 == 0:
            engine.append("b", frame)
        if i % 1000 == 999:
            assert len(list(engine.ask("a", QUESTION, 4))) == 4
        peak_memory = max(peak_memory, engine.memory_bytes())
        if i % 100 == 0:
            _check_bounds(engine.stats("a"), cfg)
    a = engine.stats("a")
    _check_bounds(a, cfg)
    assert peak_memory <= limit
    assert a.blocks == 10_000 and a.dropped_blocks > 9_000 and a.rebases > 0
    assert a.offloaded_blocks == engine._sessions["a"].store._index.ntotal  # index and blocks agree
    assert engine.stats("b").offloaded_blocks > 0


def _check_bounds(stats, cfg) -> None:
    assert stats.peak_resident_tokens <= cfg.budget_tokens
    assert stats.resident_tokens <= cfg.budget_tokens - cfg.reserve_tokens
    assert stats.offloaded_bytes <= cfg.offload_bytes
    assert stats.next_position < cfg.rebase_position


@pytest.mark.parametrize(
    "call, error, needle",
    [
        (lambda e: e.open("a", PREFIX), StreamExistsError, "already open"),
        (lambda e: e.append("zz", embeds(8, 1)), UnknownStreamError, "no open stream 'zz'"),
        (lambda e: e.append("a", LLMInput(embeds(65, 1), extras={"deep": torch.zeros(1)})), RequestError,
         "chunk of 65 tokens carries family extras"),  # a plain long chunk is split instead (test_kv_split.py)
        (lambda e: e.append("a", torch.randn(8, 7)), RequestError, r"\[tokens, 64\]"),
        (lambda e: e.append("a", embeds(0, 1)), RequestError, "is empty"),
        (lambda e: e.ask("a", embeds(30, 1), 11), RequestError, "exceeds kv.reserve_tokens=40"),
        (lambda e: e.ask("a", QUESTION, 0), RequestError, "max_new_tokens"),
        (lambda e: e.open("", PREFIX), RequestError, "non-empty string"),
        (lambda e: e.open("b", embeds(9, 1)), RequestError, "kv.sink_tokens=8"),
    ],
)
def test_bad_calls_raise_clear_request_errors(llm, call, error, needle):
    engine = LLMEngine(llm, kv_config(policy="offload", **SMALL), 1 << 30)
    engine.open("a", PREFIX)
    with pytest.raises(error, match=needle):
        call(engine)
    assert engine.stream_ids() == ["a"]  # nothing half-opened


def test_engine_config_errors(llm):
    with pytest.raises(ConfigError, match="summary_layers"):
        LLMEngine(llm, kv_config(summary_layers=[5]), 1 << 30)
    engine = LLMEngine(llm, kv_config(summary_layers=[-1]), 1 << 30)
    assert engine.summary_layers == [1]
