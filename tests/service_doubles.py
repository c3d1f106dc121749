"""Test doubles of the vision/LLM stages (same methods as serve.core.stages), and frame helpers for the service tests.

The doubles are deterministic and observable: the fake LLM answers with what it has seen ("frames=N last=T"), so a
test can check that a question sees exactly the frames that reached the LLM, per stream.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import numpy as np
import torch

from serve.core.messages import AnswerItem, AnswerStats, EncodedChunk
from serve.core.stats import AppendStats, CacheCounters, ChunkStats, KVStats, VisionStats
from stream.errors import RequestError
from stream.frames import FrameBatch


class UnknownStream(RequestError):
    status = 404


class FakeVisionStage:
    """One token per frame (the frame's mean RGB); ``delay_s`` per chunk simulates a slow encoder."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.streams: dict[str, dict[str, int]] = {}
        self.lock = threading.Lock()

    def open(self, stream_id: str, options: Any = None) -> None:
        with self.lock:
            self.streams[stream_id] = {"frames": 0, "tokens_in": 0, "tokens_kept": 0}

    def encode(self, stream_id: str, batch: FrameBatch) -> EncodedChunk:
        if stream_id not in self.streams:
            raise UnknownStream(f"stream {stream_id!r} not open")
        time.sleep(self.delay_s)
        embeds = torch.from_numpy(batch.rgb.reshape(len(batch), -1, 3).mean(axis=1)).float()  # [F, 3]
        st = self.streams[stream_id]
        st["frames"] += len(batch)
        st["tokens_in"] += 4 * len(batch)
        st["tokens_kept"] += len(batch)
        return EncodedChunk(stream_id, embeds, [1] * len(batch), batch.pts.tolist(),
                            ChunkStats(tokens_in=4 * len(batch), tokens_kept=len(batch)))

    def close(self, stream_id: str) -> None:
        if self.streams.pop(stream_id, None) is None:
            raise UnknownStream(f"stream {stream_id!r} not open")

    def stats(self, stream_id: str) -> VisionStats:
        if stream_id not in self.streams:
            raise UnknownStream(f"stream {stream_id!r} not open")
        return VisionStats(**self.streams[stream_id], cache=CacheCounters(reuse_rate=0.5))


class FakeLLMStage:
    """Keeps each stream's received pts; answers 'frames=<n> last=<pts>' in a few pieces."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def open(self, stream_id: str, options: Any = None) -> None:
        self.seen[stream_id] = []

    def append(self, stream_id: str, chunk: EncodedChunk) -> AppendStats:
        if stream_id not in self.seen:
            raise UnknownStream(f"stream {stream_id!r} not open")
        self.seen[stream_id].extend(chunk.pts)
        return AppendStats(llm_tokens=int(chunk.embeds.shape[0]))

    def ask(self, stream_id: str, question: str, max_new_tokens: int = 64, sampling: Any = None
            ) -> Iterator[AnswerItem]:
        if stream_id not in self.seen:
            raise UnknownStream(f"stream {stream_id!r} not open")
        self.last_sampling = sampling  # what the transport passed on (tests read it)
        pts = list(self.seen[stream_id])
        last = f"{pts[-1]:.2f}" if pts else "none"
        # the double's "prompt": one token per frame seen + one per question word
        stats = AnswerStats(attended_tokens=len(pts), question_tokens=len(question.split()), prompted=True)
        yield AnswerStats(**{**stats.__dict__})
        pieces = (f"frames={len(pts)}", " ", f"last={last}")
        for piece in pieces:
            yield piece
        yield AnswerStats(**{**stats.__dict__, "new_tokens": len(pieces), "done": True})

    def close(self, stream_id: str) -> None:
        if self.seen.pop(stream_id, None) is None:
            raise UnknownStream(f"stream {stream_id!r} not open")

    def stats(self, stream_id: str) -> KVStats:
        if stream_id not in self.seen:
            raise UnknownStream(f"stream {stream_id!r} not open")
        n = len(self.seen[stream_id])
        return fake_kv_stats(stream_id, n)


def fake_kv_stats(stream_id: str, tokens: int) -> KVStats:
    """A KV session's stats with ``tokens`` resident (64 bytes each) and nothing else happened."""
    counts = {name: 0 for name, f in KVStats.model_fields.items() if f.annotation in (int, "int")}
    counts.update(stream_tokens=tokens, resident_tokens=tokens, peak_resident_tokens=tokens, budget_tokens=1 << 20,
                  resident_used_bytes=64 * tokens, next_position=tokens, held_bytes=64 * tokens,
                  used_bytes=64 * tokens, kv_tokens=tokens, kv_bytes=64 * tokens)
    return KVStats(**counts, stream_id=stream_id, policy="fake")


def frames(n: int, height: int = 32, width: int = 48, fps: float = 10.0, start: int = 0) -> tuple[np.ndarray, list[float]]:
    """``n`` distinct RGB frames ``[n, H, W, 3]`` (frame i has value (start+i) % 256) and pts at ``fps``."""
    idx = np.arange(start, start + n)
    rgb = np.broadcast_to((idx % 256).astype(np.uint8)[:, None, None, None], (n, height, width, 3)).copy()
    return rgb, [float(i) / fps for i in idx]


def fake_stage_factory(kind: str, config: Any) -> Any:
    """``serve.deploy.app.build_app`` stage factory building the doubles (runs inside Ray replicas)."""
    return FakeVisionStage() if kind == "vision" else FakeLLMStage()


def tiny_stages_with_context(stream_id: str = "s") -> tuple[Any, Any, Any]:
    """The real built-in tiny model's (adapter, VisionStage, LLMStage) with ``stream_id`` open and 4 random frames
    in its context (random weights)."""
    from serve.core.options import StreamOptions
    from serve.core.stages import LLMStage, VisionStage
    from stream.models import load_adapter

    adapter = load_adapter(None)
    vision, llm = VisionStage(adapter, StreamOptions()), LLMStage(adapter, StreamOptions(), 1 << 28)
    vision.open(stream_id)
    llm.open(stream_id)
    rgb = np.random.default_rng(0).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)  # [frames, H, W, 3]
    llm.append(stream_id, vision.encode(stream_id, FrameBatch(rgb, np.arange(4) / 1.0, np.arange(4))))
    return adapter, vision, llm
