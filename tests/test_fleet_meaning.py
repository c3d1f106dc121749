"""Meaning, not plumbing: with the reference model (trained on planted shapes, ``stream/models/reference``) a fleet
yes/no question must rank first the one stream where a shape was planted, and that stream's moments must rank every
block that shows it above every block from before its onset (the moments' per-block yes/no scores).

Three pushed streams show real footage (the test split of vtest.avi and box.mp4, rendered by the synthetic
benchmark's scene helpers); a large red square appears in one of them at ``ONSET_S`` and stays. The question is the
benchmark's own yes/no form (``CRR``: the form the reference model was trained to answer). Everything runs through
the in-process LocalBackend -- the IngestHost the Ray service runs -- with the real stages.

The other fleet and moments tests check the plumbing with the tiny random-weight model and stage doubles.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from serve.core.api import CreateStreamRequest
from serve.core.config import ServiceConfig
from serve.core.fleet import FleetQuestion
from serve.core.local import LocalBackend
from serve.core.moments import MomentsRequest
from stream.frames import FrameBatch

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
STREAMS = {"cam-a": ("vtest.avi", "fixed"), "cam-b": ("box.mp4", "fixed"), "cam-c": ("vtest.avi", "handheld")}
PLANTED, ONSET_S, SECONDS = "cam-b", 14, 30
BLOCK_S = 4  # one KV block = one chunk of 4 frames at 1 fps

def _clips() -> dict[str, np.ndarray]:
    """Each stream's ``[SECONDS * CLIP_FPS, 192, 256, 3]`` frames; the red square in PLANTED from ONSET_S on."""
    from serve.eval.synth_scene import CLIP_FPS, Camera, PlantedObject, load_footage, render_frame

    if not (MEDIA / "vtest.avi").is_file():
        pytest.skip(f"real test videos not found at {MEDIA}")
    footage = {name: load_footage(MEDIA / name, "test") for name in {v[0] for v in STREAMS.values()}}
    square = PlantedObject(0, "square", "red", "large", ONSET_S, SECONDS + 1, (0.35, 0.5), (0.6, 0.45))
    out = {}
    for i, (sid, (video, mode)) in enumerate(STREAMS.items()):
        n = SECONDS * CLIP_FPS
        cam = Camera.random(mode, n, len(footage[video].frames), np.random.default_rng(100 + i))
        out[sid] = np.stack([render_frame(footage[video], cam, [square] if sid == PLANTED else [], k)
                             for k in range(n)])
    return out


def test_the_fleet_ranks_the_planted_stream_first_and_its_moment_holds_the_onset():
    from serve.core.stages import LLMStage, VisionStage
    from serve.eval.bench import CRR_PROMPT
    from serve.eval.synth_scene import CLIP_FPS
    from stream.models.loading import load_adapter

    adapter = load_adapter("reference")
    cfg = ServiceConfig.parse({"sampler": {"fps": 1.0, "frames_per_chunk": 4}})  # the fps it was trained at
    opts = cfg.stream_options()
    backend = LocalBackend(cfg.serve, cfg.source, opts, VisionStage(adapter, opts), LLMStage(adapter, opts, 1 << 30))
    question = CRR_PROMPT.format(question="Where is the red square on the screen?")
    clips = _clips()

    async def run() -> None:
        for sid, rgb in clips.items():
            await backend.create(CreateStreamRequest(stream_id=sid))
            for k in range(0, len(rgb), 8):  # within the pushed source's queue
                part = rgb[k:k + 8]
                await backend.push(sid, FrameBatch(part, np.arange(k, k + len(part)) / CLIP_FPS,
                                                   np.arange(len(part))), True)
                assert backend.host._runner(sid).wait_idle(120)
        fleet = FleetQuestion(question=question, streams=list(STREAMS), mode="yes_no")
        answers = {a.stream_id: a for a in [x async for x in backend.fleet(list(STREAMS), fleet)]}
        ranked = sorted(answers.values(), key=lambda a: -(a.score or 0))
        assert ranked[0].stream_id == PLANTED, {a.stream_id: a.score for a in ranked}
        found = await backend.moments(PLANTED, MomentsRequest(query=question, top_k=SECONDS // BLOCK_S + 1))
        ranked_blocks = [(m.pts_start, m.pts_end) for m in found.moments]  # best first, one block each
        # measured (2026-12-07 weights): 24-27, 28-29, 16-19, 20-23 s (the square on every frame), then 12-15 s (the
        # onset's block: the square in 2 of its 4 frames), then the three blocks before the onset
        after = [i for i, (start, _) in enumerate(ranked_blocks) if start >= ONSET_S]
        before = [i for i, (_, end) in enumerate(ranked_blocks) if end < ONSET_S]
        assert len(after) >= 3 and len(before) >= 3 and max(after) < min(before), ranked_blocks
        assert ranked_blocks[0][0] >= ONSET_S, ranked_blocks

    try:
        asyncio.run(run())
    finally:
        backend.shutdown()
