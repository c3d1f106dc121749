"""Fleet questions and moments on the real tiny-model stages (random weights: plumbing and exactness only, the
scores mean nothing) in the in-process LocalBackend -- the same IngestHost the Ray service runs.

* A yes/no fleet question over 4 streams reaches the LLM engine as 4 questions queued at once and runs as one
  batched step (the step loop is held while they arrive, then released), and each score equals that stream's
  score asked alone.
* A text fleet question's answers equal the streams' own greedy answers.
* A moment search scores every block of the stream's history with the LLM, keeps its thumbnails, and leaves the
  stream's context unchanged.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serve.core.api import CreateStreamRequest, QuestionRequest
from serve.core.config import ServiceConfig
from serve.core.fleet import FleetQuestion
from serve.core.local import LocalBackend
from serve.core.messages import text_of
from serve.core.moments import MomentsRequest
from serve.core.stages import LLMStage, VisionStage
from stream.frames import FrameBatch

STREAMS = ["cam0", "cam1", "cam2", "cam3"]


@pytest.fixture(scope="module")
def backend(tiny_llava):
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": 2},
                               "cacher": {"gate": {"enabled": False}}})
    opts = cfg.stream_options()
    b = LocalBackend(cfg.serve, cfg.source, opts, VisionStage(tiny_llava, opts), LLMStage(tiny_llava, opts, 1 << 28))

    async def setup() -> None:
        for i, sid in enumerate(STREAMS):
            await b.create(CreateStreamRequest(stream_id=sid, labels={"n": str(i)}))
            rgb = np.random.default_rng(i).integers(0, 255, (6, 48, 64, 3), dtype=np.uint8)  # [frames, H, W, 3]
            await b.push(sid, FrameBatch(rgb, np.arange(6) * 1.0, np.arange(6)), True)
        for sid in STREAMS:
            assert b.host._runner(sid).wait_idle(60)

    asyncio.run(setup())
    yield b
    b.shutdown()


async def _collect(b: LocalBackend, request: FleetQuestion) -> list:
    return [a async for a in b.fleet(await b.targets(request), request)]


def test_yes_no_fleet_question_is_one_batched_step_equal_to_each_stream_alone(backend):
    engine = backend.llm.engine
    request = FleetQuestion(question="Is there a person?", selector={}, mode="yes_no")
    out: list = []
    with engine.scheduler.hold():  # the loop waits at a step boundary while the questions arrive
        worker = threading.Thread(target=lambda: out.extend(asyncio.run(_collect(backend, request))))
        worker.start()
        deadline = time.monotonic() + 30
        while engine.scheduler.queued() < len(STREAMS):
            assert time.monotonic() < deadline, "the fleet question's per-stream questions were not issued at once"
            time.sleep(0.01)
        before = engine.scheduler_stats()
    worker.join(60)
    after = engine.scheduler_stats()
    assert after.steps - before.steps == 1 and after.prefill_rows - before.prefill_rows == len(STREAMS)
    assert sorted(a.stream_id for a in out) == STREAMS and all(a.status == 200 for a in out)
    for a in out:
        yes, no = backend.llm.score_choices(a.stream_id, request.question, ["yes", "no"])
        assert a.score == pytest.approx(yes / (yes + no), abs=1e-5)
        assert a.pts == 5.0 and a.frame_index == 5


def test_text_fleet_answers_equal_each_stream_asked_alone(backend):
    request = FleetQuestion(question="What is happening?", streams=STREAMS[:3], max_new_tokens=6)
    got = {a.stream_id: a for a in asyncio.run(_collect(backend, request))}
    for sid in STREAMS[:3]:
        alone = text_of(backend.host.ask(sid, QuestionRequest(question=request.question, max_new_tokens=6)))
        assert got[sid].answer == alone and got[sid].completion_tokens == 6 and got[sid].prompt_tokens > 6


@pytest.mark.parametrize("method", ["yes_no", "retrieval"])
def test_moments_score_every_block_with_the_llm_and_leave_the_stream_unchanged(backend, method):
    ask = QuestionRequest(question="What is happening?", max_new_tokens=5)
    before = text_of(backend.host.ask("cam1", ask))
    result = asyncio.run(backend.moments("cam1", MomentsRequest(query="Is there a person?", top_k=3, method=method,
                                                                threshold=1.0)))
    assert result.candidates == result.scored_blocks == 3  # 6 frames, 2 per chunk: 3 blocks, all in the window
    assert len(result.moments) == 3 and result.moments[0].score >= result.moments[-1].score
    spans = sorted((m.pts_start, m.pts_end) for m in result.moments)
    assert spans == [(0.0, 1.0), (2.0, 3.0), (4.0, 5.0)]
    for m in result.moments:
        assert m.thumbnail is not None and m.thumbnail.pts_start == m.pts_start
        if method == "yes_no":
            assert 0.0 <= m.score <= 1.0
    assert text_of(backend.host.ask("cam1", ask)) == before
