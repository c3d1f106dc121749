"""A stage double that scores: yes/no answers and per-block scores read off the frames' brightness.

:class:`ScoringLLMStage` is :class:`tests.service_doubles.FakeLLMStage` plus ``score_choices`` (P(yes) = the mean
value of the newest frame / 255) and ``score_blocks`` (one "block" per appended chunk, scored by its mean value /
255), so plumbing tests know which stream must rank first and which moment must win without a model.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from serve.core.messages import EncodedChunk
from serve.core.moments import BlockQuery, BlockScan, ScoredBlock
from serve.core.stats import AppendStats
from tests.service_doubles import FakeLLMStage, UnknownStream


class ScoringLLMStage(FakeLLMStage):
    """Scores from brightness; ``delay_s`` per score call (a slow LLM); records how many calls overlapped."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.chunks: dict[str, list[tuple[list[float], float]]] = {}  # stream -> [(pts, mean value)]
        self.active = self.most_active = 0
        self._lock = threading.Lock()

    def open(self, stream_id: str, options: Any = None) -> None:
        super().open(stream_id, options)
        self.chunks[stream_id] = []

    def append(self, stream_id: str, chunk: EncodedChunk) -> AppendStats:
        out = super().append(stream_id, chunk)
        self.chunks[stream_id].append((list(chunk.pts), float(chunk.embeds.mean())))
        return out

    def _busy(self) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.delay_s)
        with self._lock:
            self.active -= 1

    def score_choices(self, stream_id: str, question: str, choices: list[str]) -> list[float]:
        if stream_id not in self.chunks:
            raise UnknownStream(f"stream {stream_id!r} not open")
        self._busy()
        value = self.chunks[stream_id][-1][1] / 255 if self.chunks[stream_id] else 0.0
        return [value, 1 - value]

    def score_blocks(self, stream_id: str, query: BlockQuery) -> BlockScan:
        if stream_id not in self.chunks:
            raise UnknownStream(f"stream {stream_id!r} not open")
        self._busy()
        blocks = []
        for i, (pts, value) in enumerate(self.chunks[stream_id]):
            if (query.since is None or pts[-1] >= query.since) and (query.until is None or pts[0] <= query.until):
                blocks.append(ScoredBlock(block_id=i, tokens=len(pts), pts_start=pts[0], pts_end=pts[-1],
                                          offloaded=False, score=value / 255))
        return BlockScan(method=query.method, blocks=blocks[-query.max_blocks:], candidates=len(blocks),
                         shortlisted=max(0, len(blocks) - query.max_blocks))
