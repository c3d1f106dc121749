"""The in-process streaming pipeline: frames -> sample -> chunk -> VisionStage -> LLMStage, and questions.

Used by ``stc-serve ask``, the eval harness and tests; the Ray service runs the same stages in deployments and the
same :class:`serve.core.flow.StageFlow` per stream. Each chunk is prefilled into the stream's KV session when it
arrives (as a live stream would be), never all at the end, so a question only prefills the question.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from serve.core.flow import DirectTransport, StageFlow
from serve.core.messages import AnswerStats, EncodedChunk
from serve.core.options import StreamOptions
from serve.core.stages import LLMStage, VisionStage
from serve.core.stats import CacheCounters, KVStats
from stream.errors import StreamNotFoundError
from stream.frames import Frame, FrameBatch
from stream.models.base import VLMAdapter
from stream.sampler import FrameChunker

__all__ = ["PipelineStats", "StreamPipeline"]


@dataclass
class PipelineStats:
    """Totals over one stream's ingest and its last answer (what ``stc-serve ask`` prints)."""

    frames: int = 0
    chunks: int = 0
    visual_tokens: int = 0
    visual_tokens_in: int = 0
    vit_ms: float = 0.0
    prune_ms: float = 0.0
    prefill_ms: float = 0.0
    answer: AnswerStats = field(default_factory=AnswerStats)
    cache: CacheCounters | None = None
    kv: KVStats | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "chunks": self.chunks, "visual_tokens": self.visual_tokens,
            "visual_tokens_in": self.visual_tokens_in, "vit_ms": round(self.vit_ms, 2),
            "prune_ms": round(self.prune_ms, 2), "prefill_ms": round(self.prefill_ms, 2),
            "question_prefill_ms": round(self.answer.prefill_ms, 2), "ttft_ms": round(self.answer.ttft_ms, 2),
            "decode_ms": round(self.answer.decode_ms, 2), "new_tokens": self.answer.new_tokens,
            "kv_tokens": self.answer.kv_tokens or (self.kv.kv_tokens if self.kv else 0),
            "kv_bytes": self.answer.kv_bytes or (self.kv.kv_bytes if self.kv else 0),
            "cache": self.cache.model_dump() if self.cache else {}, "kv": self.kv.model_dump() if self.kv else {},
        }


class StreamPipeline:
    """Both stages in one process, for one or more streams.

    Args:
        adapter: the loaded VLM adapter.
        options: default stream options (sampler, cacher, pruner, KV).
        memory_budget_bytes: replica-wide KV budget for the LLM stage.
    """

    def __init__(self, adapter: VLMAdapter, options: StreamOptions | None = None,
                 memory_budget_bytes: int = 4 << 30) -> None:
        self.options = options or StreamOptions()
        self.vision = VisionStage(adapter, self.options)
        self.llm = LLMStage(adapter, self.options, memory_budget_bytes)
        self.transport = DirectTransport(self.vision, self.llm)
        self.flows: dict[str, StageFlow] = {}
        self.stats: dict[str, PipelineStats] = {}
        self._options: dict[str, StreamOptions] = {}

    def open(self, stream_id: str | None = None, options: StreamOptions | None = None) -> str:
        sid = stream_id or uuid.uuid4().hex[:12]
        flow = StageFlow(self.transport)
        flow.open(sid, options or self.options)  # the one stream flow the Ray service uses too
        self.flows[sid] = flow
        self.stats[sid] = PipelineStats()
        self._options[sid] = options or self.options
        return sid

    def close(self, stream_id: str) -> None:
        self._flow(stream_id).close(stream_id)
        del self.flows[stream_id]
        self.stats.pop(stream_id, None)
        self._options.pop(stream_id, None)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Close every stream and wait for the LLM's step loop to stop (before the process exits)."""
        for sid in list(self.flows):
            self.close(sid)
        self.llm.engine.scheduler.wait_stopped(timeout_s)

    def chunker(self, stream_id: str) -> FrameChunker:
        """A fresh sample -> chunk step with the stream's sampling settings (pass it to successive :meth:`ingest`
        calls to feed one stream in segments with one sampling decision across the segment boundaries)."""
        return FrameChunker.of(self._options[stream_id].sampler)

    def push_chunk(self, stream_id: str, batch: FrameBatch) -> EncodedChunk:
        """Encode one chunk and prefill it into the stream's context."""
        chunk, result = self._flow(stream_id).encode_append_chunk(stream_id, batch)
        st = self.stats[stream_id]
        st.frames += len(batch)
        st.chunks += 1
        st.visual_tokens += result.vision.tokens_kept
        st.visual_tokens_in += result.vision.tokens_in
        st.vit_ms += result.vision.vit_ms
        st.prune_ms += result.vision.prune_ms
        st.prefill_ms += result.llm.prefill_ms
        return chunk

    def ingest(self, stream_id: str, frames: Iterable[Frame],
               on_chunk: Callable[[EncodedChunk], None] | None = None,
               chunker: FrameChunker | None = None) -> PipelineStats:
        """Sample ``frames`` at the stream's fps, cut chunks, and push each chunk as soon as it is full (the last,
        partial chunk when ``frames`` ends)."""
        for batch in (chunker if chunker is not None else self.chunker(stream_id)).chunks(frames):
            chunk = self.push_chunk(stream_id, batch)
            if on_chunk:
                on_chunk(chunk)
        return self.stats[stream_id]

    def ask(self, stream_id: str, question: str, max_new_tokens: int = 64) -> Iterator[str]:
        """Stream the answer's text pieces; stats land in ``self.stats[stream_id].answer``."""
        st = self.stats[stream_id]
        st.answer = AnswerStats()
        for item in self._flow(stream_id).ask(stream_id, question, max_new_tokens):
            if isinstance(item, AnswerStats):
                st.answer = item
            else:
                yield item
        st.kv = self.llm.stats(stream_id)
        st.cache = self.vision.stats(stream_id).cache

    def _flow(self, stream_id: str) -> StageFlow:
        flow = self.flows.get(stream_id)
        if flow is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open in this pipeline; open it first")
        return flow
