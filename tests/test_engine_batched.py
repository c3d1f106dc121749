"""Continuous batching: batched == serial (fp32), per-stream ordering, no cross-stream waiting, cancellation, bounds."""
from __future__ import annotations

import inspect
import threading
import time

import pytest
import torch
from transformers import DynamicCache

from cache.kv import LLMEngine
from cache.kv.config import SchedulerConfig
from cache.kv.forward import Forward, drive, run_batch
from cache.kv.session import KVSession
from tests.kv_doubles import FastForwardLM
from stream.models.inputs import LLMInput
from stream.models.llm import TextLM
from tests.kv_support import embeds, kv_config, stream, tiny_lm
from tests.kv_support import one_torch_thread  # noqa: F401  (autouse fixture)

PREFIX = embeds(5, 1)
SMALL = dict(budget_tokens=8 + 24 + 40, sink_tokens=8, reserve_tokens=40, retrieve_tokens=16)
N = 4


@pytest.fixture(scope="module")
def llm():
    return tiny_lm("qwen2", layers=2)


def _cfg(rows: int = 16, budget: int = 512, **kw):
    return kv_config(scheduler=SchedulerConfig(max_batch_rows=rows, token_budget=budget), **{**SMALL, **kw})


def _filled(llm, cfg, n=N, chunks=5, tokens=8) -> LLMEngine:
    """N streams with different contexts (different chunk counts, so different KV lengths)."""
    engine = LLMEngine(llm, cfg, 1 << 30)
    for i in range(n):
        engine.open(f"s{i}", PREFIX)
        for c in stream(chunks + i % 3, tokens, seed=1000 * (i + 1)):
            engine.append(f"s{i}", c)
    return engine


def _concurrent(engine: LLMEngine, jobs: dict[str, tuple]) -> dict[str, list[int]]:
    """Ask every (question, max_new) of ``jobs`` at once (one burst) and collect the answers."""
    out, errors = {}, []

    def run(name, question, k):
        try:
            out[name] = list(engine.ask(name, question, k))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n, *job)) for n, job in jobs.items()]
    with engine.scheduler.hold():
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.scheduler.queued() < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join(60)
    assert not errors
    return out


@pytest.mark.parametrize("policy", ["sink_window", "offload"])
def test_concurrent_greedy_answers_equal_one_at_a_time(llm, policy):
    questions = {f"s{i}": (embeds(3 + i, 50 + i), 10 + 3 * i) for i in range(N)}  # ragged lengths
    serial_engine = _filled(llm, _cfg(rows=1, policy=policy))
    serial = {name: list(serial_engine.ask(name, q, k)) for name, (q, k) in questions.items()}
    engine = _filled(llm, _cfg(policy=policy))
    batched = _concurrent(engine, questions)
    assert batched == serial
    assert len({tuple(v) for v in serial.values()}) == N  # the streams really differ
    assert engine.scheduler_stats().max_rows_in_step == N  # ... and really shared forwards


@torch.inference_mode()
def test_chunks_prefilled_in_one_batch_match_one_at_a_time(llm):
    """Same KV and next-token logits (fp32, atol 1e-5) for ragged past lengths and chunk lengths."""
    cfg = kv_config(**SMALL, policy="sink_window")

    def sessions():
        out = []
        for i in range(N):
            s = KVSession(f"s{i}", llm, cfg, [0, 1])
            drive(s.prefill_prefix(LLMInput(PREFIX)), llm)
            for c in stream(i, 8, 7 * i):
                drive(s.append(LLMInput(c), {}), llm)
            out.append(s)
        return out

    chunks = [embeds(4 + 3 * i, 300 + i) for i in range(N)]
    alone, batched = sessions(), sessions()
    assert len({s.cache.length for s in alone}) == N
    logits_alone = []
    for s, c in zip(alone, chunks):
        fwd = next(s.append(LLMInput(c), {}))  # oracle: HF's own causal mask over the stream's cache
        logits_alone.append(llm.forward(fwd.embeds[None], cache=s.cache, position_ids=fwd.positions[:, None])[0, -1])
    fwds = [next(s.append(LLMInput(c), {})) for s, c in zip(batched, chunks)]
    logits_batched = run_batch(llm, [(f, 0, f.tokens) for f in fwds])
    for a, b, la, lb in zip(alone, batched, logits_alone, logits_batched):
        assert a.cache.length == b.cache.length
        ka, va = a.cache.read(0, a.cache.length)
        kb, vb = b.cache.read(0, b.cache.length)
        torch.testing.assert_close(kb, ka, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vb, va, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)


class SlowLM(TextLM):
    """Every forward takes at least ``delay`` seconds (makes step boundaries observable)."""

    def __init__(self, llm: TextLM, delay: float) -> None:
        super().__init__(llm.decoder, llm.lm_head)
        self.delay = delay

    def forward(self, *args, **kw):
        time.sleep(self.delay)
        return super().forward(*args, **kw)


class GatedLM(TextLM):
    """Forwards run only while permitted: after ``hold(n)`` the next ``n`` run and the rest wait for ``release()``
    (pins the engine between two steps, whatever the machine's load)."""

    def __init__(self, llm: TextLM) -> None:
        super().__init__(llm.decoder, llm.lm_head)
        self._cond = threading.Condition()
        self._left: int | None = None  # None: unlimited

    def hold(self, n: int) -> None:
        with self._cond:
            self._left = n

    def release(self) -> None:
        with self._cond:
            self._left = None
            self._cond.notify_all()

    def forward(self, *args, **kw):
        with self._cond:
            if not self._cond.wait_for(lambda: self._left is None or self._left > 0, timeout=30):
                raise TimeoutError("GatedLM was never released")
            if self._left is not None:
                self._left -= 1
        return super().forward(*args, **kw)


def test_a_long_answer_does_not_delay_another_streams_appends(llm):
    engine = _filled(SlowLM(llm, 0.01), _cfg(reserve_tokens=40), n=2)
    answer = engine.ask("s0", embeds(3, 9), 36)
    next(answer)  # a long answer is in flight on s0
    submit, chunks = engine.scheduler.submit, []
    engine.scheduler.submit = lambda *a, **k: chunks.append(submit(*a, **k)) or chunks[-1]  # see the chunk tasks
    for i in range(3):
        engine.append("s1", embeds(8, 700 + i))
    for task in chunks:  # measured by the loop itself, not by this (maybe descheduled) thread
        assert task.finish_step - task.arrival_step <= 2  # the step in progress + the one that runs the chunk
    assert len(chunks) == 3
    assert engine.stats("s1").blocks == 5 + 1 + 3
    rest = list(answer)
    assert len(rest) == 35  # the answer was in flight the whole time


def test_question_during_a_chunk_prefill_sees_that_chunk(llm):
    """Rule: an answer sees exactly the chunks appended before the question was asked (chunked prefill too)."""
    q, chunk, late = embeds(4, 77), embeds(24, 78), embeds(8, 79)
    ref = _filled(llm, _cfg(reserve_tokens=40), n=1)
    ref.append("s0", chunk)
    expected = list(ref.ask("s0", q, 8))
    ref.append("s0", late)
    expected_after = list(ref.ask("s0", q, 8))
    gated = GatedLM(llm)
    engine = _filled(gated, _cfg(reserve_tokens=40, budget=4), n=1)  # 24 tokens = 6 prefill steps
    gated.hold(1)  # the chunk's first prefill step runs, the second waits: the chunk stays mid-prefill
    appender = threading.Thread(target=engine.append, args=("s0", chunk))
    filled = engine.scheduler.stats.prefill_tokens  # the context fill's tokens
    appender.start()
    got = {}
    asker = threading.Thread(target=lambda: got.setdefault("a", list(engine.ask("s0", q, 8))))
    late_appender = threading.Thread(target=engine.append, args=("s0", late))  # asked after: not seen
    try:
        deadline = time.monotonic() + 30
        while engine.scheduler.stats.prefill_tokens == filled and time.monotonic() < deadline:  # chunk has begun
            time.sleep(0.001)
        mid = engine.stats("s0").blocks
        asker.start()
        while engine.scheduler.queued("s0") < 2 and time.monotonic() < deadline:  # the question is queued behind it
            time.sleep(0.001)
        late_appender.start()
        while engine.scheduler.queued("s0") < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        queued = engine.scheduler.queued("s0")
    finally:
        gated.release()
    for t in (appender, asker, late_appender):
        t.join(30)
    assert engine.scheduler.stats.prefill_tokens > filled
    assert mid == 5 + 0  # the question arrived while the chunk was mid-prefill
    assert queued == 3  # chunk (running), question, late chunk: in that order
    assert got["a"] == expected
    assert list(engine.ask("s0", q, 8)) == expected_after


def test_cancelling_an_answer_frees_its_scratch_at_once(llm):
    engine = _filled(SlowLM(llm, 0.005), _cfg(), n=2)
    before = engine.stats("s0").resident_tokens
    answer = engine.ask("s0", embeds(3, 9), 30)
    next(answer)
    assert engine.stats("s0").resident_tokens > before
    answer.close()  # client disconnect
    assert engine.stats("s0").resident_tokens == before
    assert engine.scheduler.queued("s0") == 0
    engine.append("s0", embeds(8, 5))  # the stream goes on
    assert engine.stats("s0").blocks == 6


def test_bounds_hold_over_10000_frames_with_batched_questions(llm):
    ff = FastForwardLM(llm)
    cfg = _cfg(policy="offload", quant="int8", offload_bytes=40_000)
    budget = 4 * (cfg.budget_tokens + cfg.sink_tokens) * ff.kv_bytes_per_token() + 200_000
    engine = LLMEngine(ff, cfg, budget)
    names = [f"s{i}" for i in range(4)]
    for n in names:
        engine.open(n, PREFIX)
    errors, peaks = [], []
    frame = embeds(6, 3)

    def worker(name: str) -> None:
        try:
            for f in range(2500):  # 4 x 2,500 = 10,000 single-frame chunks
                ff.fast_forward = True
                engine.append(name, frame, {"frame": f})
                if f % 500 == 499:
                    assert len(list(engine.ask(name, embeds(3, f), 4))) <= 4
                    st = engine.stats(name)
                    peaks.append(st.peak_resident_tokens)
                    assert st.peak_resident_tokens <= cfg.budget_tokens and st.offloaded_bytes <= cfg.offload_bytes
                    assert engine.memory_bytes() <= budget
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sum(engine.stats(n).stream_tokens for n in names) == 4 * (5 + 2500 * 6)
    assert engine.scheduler_stats().max_rows_in_step > 1  # streams were batched
    assert max(peaks) <= cfg.budget_tokens and engine.memory_bytes() <= budget


def test_llm_input_pieces_with_relative_positions_and_extent(llm):
    """LLMInput == bare tensor; a piece whose positions skip (extent > tokens) lands where a plain cache puts it."""
    cfg = kv_config(budget_tokens=256, policy="sink_window")
    chunks = stream(3, 8, seed=40)
    bare, typed = LLMEngine(llm, cfg, 1 << 30), LLMEngine(llm, cfg, 1 << 30)
    q = embeds(4, 41)
    for e, wrap in ((bare, lambda x: x), (typed, LLMInput)):
        e.open("s", wrap(PREFIX))
        for c in chunks:
            e.append("s", wrap(c))
    assert list(typed.ask("s", LLMInput(q), 6)) == list(bare.ask("s", q, 6))
    gappy = LLMInput(embeds(6, 42), positions=torch.tensor([[0, 1, 2, 5, 6, 9]]))  # extent 10
    typed.append("s", gappy)
    assert typed.stats("s").next_position == 5 + 24 + 10
    # oracle: a plain DynamicCache fed the same pieces at the same absolute positions
    with torch.inference_mode():
        cache, pos = DynamicCache(), 0
        for piece in [PREFIX, *chunks]:
            llm.forward(piece[None], cache=cache, position_ids=torch.arange(pos, pos + len(piece))[None])
            pos += len(piece)
        llm.forward(gappy.embeds[None], cache=cache, position_ids=(gappy.positions + pos))
        pos += 10
        logits = llm.forward(q[None], cache=cache, position_ids=torch.arange(pos, pos + 4)[None])
    assert list(typed.ask("s", q, 1)) == [int(logits[0, -1].argmax())]


def test_rotate_keys_inverts_and_shifts_uniformly(llm):
    keys = torch.randn(2, 2, 7, llm.head_dim)
    pos = torch.arange(3, 10)[None]
    rotated = llm.rotate_keys(keys, pos)
    torch.testing.assert_close(llm.rotate_keys(rotated, -pos), keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(llm.shift_keys(rotated, 40), llm.rotate_keys(keys, pos + 40), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="1-D RoPE"):
        llm.rotate_keys(keys, torch.stack([pos[0], pos[0] + 1, pos[0]]))


def test_forward_uses_the_supported_cache_argument(llm, recwarn):
    params = inspect.signature(llm.decoder.forward).parameters
    assert llm.cache_argument == ("cache" if "cache" in params else "past_key_values")
    engine = _filled(llm, _cfg(), n=1)
    list(engine.ask("s0", embeds(3, 9), 3))
    assert not [w for w in recwarn if "past_key_values" in str(w.message)]


def test_prefill_policy_questions_first_ageing_and_token_budget():
    from cache.kv.scheduler import Task, pick_prefills

    def task(kind, seq, arrival, tokens, extra=None):
        t = Task("s%d" % seq, kind, iter(()), seq, arrival)
        t.pending = Forward(None, torch.zeros(tokens, 4), torch.zeros(1, tokens, dtype=torch.long), extra or {})
        return t

    cfg = SchedulerConfig(max_batch_rows=8, token_budget=10, max_ingest_wait_steps=3)
    chunk, question = task("chunk", 0, arrival=5, tokens=8), task("question", 1, arrival=6, tokens=4)
    rows = pick_prefills([chunk, question], step=6, cfg=cfg)
    assert [(r[0].kind, r[1], r[2]) for r in rows] == [("question", 0, 4), ("chunk", 0, 6)]  # chunk sliced
    rows = pick_prefills([chunk, question], step=8, cfg=cfg)  # the chunk has waited 3 steps: it goes first
    assert [(r[0].kind, r[1], r[2]) for r in rows] == [("chunk", 0, 8), ("question", 0, 2)]
    fifo = SchedulerConfig(max_batch_rows=8, token_budget=10, questions_first=False, max_ingest_wait_steps=99)
    assert [r[0].kind for r in pick_prefills([question, chunk], step=6, cfg=fifo)] == ["chunk", "question"]
    special = task("chunk", 2, arrival=0, tokens=30, extra={"family_input": 1})
    assert [(r[1], r[2]) for r in pick_prefills([special, question], step=99, cfg=cfg)] == [(0, 30)]  # alone, whole
    assert len(pick_prefills([task("chunk", i, 0, 1) for i in range(20)], 0, cfg)) == 8  # row cap



def test_wait_stopped_joins_the_step_loop_once_it_runs_out_of_work(llm):
    """Before a process exits, the daemon step-loop thread can be waited for (it must not be inside a torch op when
    the interpreter finalizes)."""
    from cache.kv.scheduler import LOOP_THREAD

    engine = _filled(llm, _cfg(), n=1, chunks=2)
    list(engine.ask("s0", embeds(3, 7), 3))
    assert engine.scheduler.wait_stopped(10.0)
    assert not [t for t in threading.enumerate() if t.name == LOOP_THREAD and t.is_alive()]
