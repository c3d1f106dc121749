"""The two halves of the model side as plain classes (no Ray): the Ray deployments in ``serve.deploy.replicas`` wrap
them, :class:`serve.core.flow.DirectTransport` calls them in-process.

* :class:`VisionStage` -- one per vision replica: ViT (+ STC cacher) + projector + pruner, per-stream state inside.
* :class:`LLMStage`    -- one per LLM replica: the shared LLM and every stream's bounded KV session.

Every stream call is ``method(stream_id, ...)``; numbers come back as :mod:`serve.core.stats` models and answers as
:data:`serve.core.messages.AnswerItem` items. Both are thread-safe per stream: different streams may be served
concurrently, calls on one stream are serialized.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from cache.kv.config import Sampling
from cache.kv.stats import PromptUsage
from serve.core.messages import AnswerItem, AnswerStats, EncodedChunk
from serve.core.moments import BlockQuery, BlockScan, choice_token_ids, score_blocks
from serve.core.options import StreamOptions
from serve.core.stats import (AppendStats, CacheCounters, ChunkStats, GateCounters, KVStats, PrunerCounters,
                              VisionStats)
from stream.errors import RequestError, StreamExistsError, StreamNotFoundError
from stream.frames import FrameBatch
from stream.models.base import VLMAdapter


def _faiss_single_thread() -> None:
    """Our FAISS indexes are small (references of one stream, KV blocks of one stream) and searched once per chunk or
    question: OpenMP's thread start-up costs more than the search (measured ~15x on a busy 2-core CPU)."""
    import faiss

    faiss.omp_set_num_threads(1)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class _Registry:
    """stream id -> per-stream state, with one lock per stream and one for the table."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._lock = threading.Lock()

    def add(self, stream_id: str, state: Any) -> None:
        with self._lock:
            if stream_id in self._items:
                raise StreamExistsError(f"stream {stream_id!r} is already open on this {self.kind} replica")
            self._items[stream_id] = state

    def get(self, stream_id: str) -> Any:
        with self._lock:
            state = self._items.get(stream_id)
        if state is None:
            raise StreamNotFoundError(
                f"stream {stream_id!r} is not open on this {self.kind} replica; open it first (known: "
                f"{sorted(self._items)[:10]})"
            )
        return state

    def pop(self, stream_id: str) -> Any:
        with self._lock:
            state = self._items.pop(stream_id, None)
        if state is None:
            raise StreamNotFoundError(f"stream {stream_id!r} is not open on this {self.kind} replica")
        return state

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._items)


# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _VisionState:
    options: StreamOptions
    cacher: Any | None
    pruner: Any | None
    gate: Any | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    frames: int = 0
    tokens_in: int = 0
    tokens_kept: int = 0
    vit_ms: float = 0.0
    prune_ms: float = 0.0


class VisionStage:
    """ViT + cacher + pruner for many streams.

    Args:
        adapter: the loaded VLM adapter (its vision tower and projector are used).
        defaults: stream options used when ``open`` gets none.
    """

    def __init__(self, adapter: VLMAdapter, defaults: StreamOptions | None = None) -> None:
        self.adapter = adapter
        self.defaults = defaults or StreamOptions()
        _faiss_single_thread()
        self._streams = _Registry("vision")
        self._model_lock = threading.Lock()

    def open(self, stream_id: str, options: StreamOptions | None = None) -> None:
        opts = options or self.defaults
        cacher = opts.make_cacher(self.adapter.cell_refresh)
        if cacher is not None:
            try:
                self.adapter.check_cacher()
            except TypeError as exc:
                raise RequestError(f"{exc} (model family {self.adapter.family}: set cacher.enabled=false, "
                                   "e.g. --no-cache)") from None
        if opts.pruner.enabled and opts.pruner.policy == "attention":
            try:
                self.adapter.check_attention()
            except TypeError as exc:
                raise RequestError(f"pruner.policy='attention': {exc} (model family {self.adapter.family}: choose "
                                   "another pruning policy, e.g. stc_context or uniform)") from None
        self._streams.add(stream_id, _VisionState(opts, cacher, opts.make_pruner(), opts.make_gate()))

    def close(self, stream_id: str) -> None:
        self._streams.pop(stream_id)

    def streams(self) -> list[str]:
        return self._streams.ids()

    @torch.inference_mode()
    def encode(self, stream_id: str, batch: FrameBatch) -> EncodedChunk:
        """Frames -> kept visual tokens: 0. frame gate, 1. preprocess, 2. ViT (cached layers), 3. project, 4. prune.

        A frame the gate skips (``cacher.gate``: it barely differs from the last encoded frame) is dropped as
        redundant: the chunk holds only the passing frames, exactly as if the sampler had not taken the others, so
        the LLM stage, the pruner and the cacher see a stream of fewer frames. A chunk with no passing frame is
        empty (no tokens; the LLM stage appends nothing). With the gate off, or when every frame passes, the chunk is
        what it was without a gate.
        """
        st: _VisionState = self._streams.get(stream_id)
        with st.lock:
            t0 = time.perf_counter()
            received = len(batch)
            if st.gate is not None:
                keep = st.gate.admit(batch.rgb, batch.pts)  # [F] bool
                if not keep.all():
                    batch = FrameBatch(batch.rgb[keep], batch.pts[keep], batch.indices[keep])
            if len(batch) == 0:
                return self._empty_chunk(stream_id, st, received, _ms(t0))
            pv = self.adapter.preprocess(batch.rgb)  # [F, 3, S, S]
            needs_attention = st.pruner is not None and st.options.pruner.policy == "attention"
            with self._model_lock:
                runner = st.cacher.runner if st.cacher is not None else None
                attention = None
                if needs_attention:  # VisionZip-style: attention each patch receives in the last used layer
                    feats, scores = self.adapter.encode_vision_attention(pv)  # [F, P, D], [F, P]
                else:
                    feats = self.adapter.encode_vision(pv, layer_runner=runner)  # [F, P, D]
                vt = self.adapter.project(feats)  # [F, T, d]
                if needs_attention:
                    attention = self.adapter.attention_tokens(scores, vt.grid)  # [F, T]
            vit_ms = _ms(t0)
            t1 = time.perf_counter()
            pts = self.adapter.frame_pts(batch.pts.tolist())  # one per adapter frame (Qwen: per 2 frames)
            frames, counts, positions, extras = _select(vt, st.pruner.select(vt.embeds, vt.positions, pts=pts,
                                                                            attention=attention)
                                                        if st.pruner is not None else None)
            prune_ms = _ms(t1)
            tokens_in, kept = int(vt.embeds.shape[:2].numel()), int(sum(counts))
            st.frames += received
            st.tokens_in += tokens_in
            st.tokens_kept += kept
            st.vit_ms += vit_ms
            st.prune_ms += prune_ms
            cache = CacheCounters.from_counters(st.cacher.last_chunk_stats()) if st.cacher is not None else None
            stats = ChunkStats(vit_ms=vit_ms, prune_ms=prune_ms, tokens_in=tokens_in, tokens_kept=kept, cache=cache,
                               frames_skipped=received - len(batch))
            return EncodedChunk(stream_id, torch.cat(frames, 0), counts, pts, stats, positions, vt.grid, extras)

    def _empty_chunk(self, stream_id: str, st: _VisionState, received: int, gate_ms: float) -> EncodedChunk:
        """The chunk of a batch the gate skipped whole: no frames, no tokens (``embeds`` ``[0, d]``)."""
        st.frames += received
        st.vit_ms += gate_ms
        d = self.adapter.llm.hidden_size
        return EncodedChunk(stream_id, torch.zeros(0, d), [], [], ChunkStats(vit_ms=gate_ms, frames_skipped=received),
                            torch.zeros(0, 2, dtype=torch.long))

    def stats(self, stream_id: str) -> VisionStats:
        st: _VisionState = self._streams.get(stream_id)
        return VisionStats(
            frames=st.frames, tokens_in=st.tokens_in, tokens_kept=st.tokens_kept, vit_ms=round(st.vit_ms, 2),
            prune_ms=round(st.prune_ms, 2),
            cache=CacheCounters.from_counters(st.cacher.stats()) if st.cacher is not None else None,
            pruner=PrunerCounters.from_counters(st.pruner.stats()) if st.pruner is not None else None,
            gate=GateCounters.from_counters(st.gate.stats()) if st.gate is not None else None,
        )


def _select(vt: Any, result: Any | None) -> tuple[list[torch.Tensor], list[int], torch.Tensor, dict[str, torch.Tensor]]:
    """The kept tokens of a chunk: per-frame embeddings ``[t_i, d]``, counts, positions ``[K, 2]`` and every family
    extra ``[K, ...]`` (a dropped token leaves them all); ``result`` is the pruner's keep decision (None: keep all)."""
    n, t = vt.embeds.shape[:2]
    if result is None:
        frames, counts = list(vt.embeds), [t] * n
        positions = vt.positions.expand(n, -1, -1).reshape(n * t, -1)  # [F*T, 2]
        extras = {k: x.flatten(0, 1) for k, x in vt.extras.items()}  # [F*T, ...]
    else:
        frames, counts = result.kept(vt.embeds), result.counts.tolist()
        positions = torch.cat(result.kept_positions(vt.positions), 0)  # [K, 2]
        extras = {k: torch.cat(result.kept(x), 0) for k, x in vt.extras.items()}  # [K, ...]
    return frames, counts, positions, extras


# ---------------------------------------------------------------------------------------------------------------------
class LLMStage:
    """The shared LLM: each stream's context lives in a bounded KV session; questions never re-encode the stream.

    Args:
        adapter: the loaded VLM adapter (its LLM, tokenizer and prompt pieces are used).
        defaults: stream options; their ``kv`` section configures every session of this replica.
        memory_budget_bytes: KV memory across all sessions of this replica.
    """

    def __init__(self, adapter: VLMAdapter, defaults: StreamOptions | None = None,
                 memory_budget_bytes: int = 4 << 30) -> None:
        self.adapter = adapter
        self.defaults = defaults or StreamOptions()
        _faiss_single_thread()
        self.engine = self.defaults.make_engine(adapter.llm, memory_budget_bytes)

    def open(self, stream_id: str, options: StreamOptions | None = None) -> None:
        """Open a session and prefill the prompt prefix (the KV settings are the replica's, see ``defaults.kv``)."""
        if options is not None and options.kv != self.defaults.kv:
            raise RequestError(
                f"per-stream KV settings are not supported: this LLM replica runs kv={self.defaults.kv.model_dump()}; "
                "got a different kv section. Fix: drop `kv` from the stream options (set it in the service config)."
            )
        prefix = self.adapter.llm.embed(self.adapter.stream_prefix_ids())  # [L, d]
        self.engine.open(stream_id, prefix)

    def close(self, stream_id: str) -> None:
        self.engine.close(stream_id)

    def streams(self) -> list[str]:
        return self.engine.stream_ids()

    def append(self, stream_id: str, chunk: EncodedChunk) -> AppendStats:
        """Prefill one chunk (visual tokens with the family's per-frame text) into the stream's KV session."""
        if chunk.stream_id != stream_id:
            raise ValueError(f"chunk of stream {chunk.stream_id!r} appended to stream {stream_id!r}")
        if not chunk.pts:  # every frame of the chunk was skipped by the frame gate: nothing to prefill
            self.engine.stats(stream_id)  # an unknown stream still raises, as an append would
            return AppendStats()
        t0 = time.perf_counter()
        embeds = self.adapter.chunk_embeds(chunk.frames(), chunk.pts, **chunk.llm_extras())  # [L, d] or LLMInput
        self.engine.append(stream_id, embeds, {"pts": chunk.pts, "frame_tokens": chunk.tokens_per_frame})
        tokens = embeds.tokens if hasattr(embeds, "tokens") else int(embeds.shape[0])  # LLMInput or [L, d]
        return AppendStats(prefill_ms=_ms(t0), llm_tokens=tokens)

    def ask(self, stream_id: str, question: str, max_new_tokens: int = 64,
            sampling: Sampling | None = None) -> Iterator[AnswerItem]:
        """Answer over the stream's current context; the context is restored afterwards.

        Yields the answer's text pieces, an :class:`AnswerStats` once the question is placed (exact prompt counts,
        before the first piece) and a last one when the answer is done (time to first token, decode time, tokens).
        """
        stats = AnswerStats()
        try:
            q = self.adapter.question_embeds(question)  # [Lq, d]
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        usage = PromptUsage()
        tokens = self.engine.ask(stream_id, q, max_new_tokens, self.adapter.eos_token_ids, sampling, usage)
        ids: list[int] = []
        emitted = ""
        t0 = time.perf_counter()
        for tid in tokens:
            if not ids:
                stats.ttft_ms = stats.prefill_ms = _ms(t0)
                _prompt(stats, usage)
                yield dataclasses.replace(stats)
            ids.append(tid)
            stats.new_tokens = len(ids)
            text = self.adapter.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        stats.decode_ms = _ms(t0) - stats.ttft_ms
        stats.total_ms = _ms(t0)
        _prompt(stats, usage)
        kv = self.engine.stats(stream_id)
        stats.kv_tokens, stats.kv_bytes, stats.context_tokens = kv.resident_tokens, kv.used_bytes, kv.stream_tokens
        stats.done = True
        yield stats

    def score_choices(self, stream_id: str, question: str, choices: list[str]) -> list[float]:
        """Next-token probability of each choice as the answer's first token (summed over the spellings
        ``c``, ``" c"``, ``C``, ``" C"``), over the stream's current context; the context is restored."""
        try:
            q = self.adapter.question_embeds(question)  # [Lq, d]
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        probs = torch.softmax(self.engine.next_logits(stream_id, q), dim=-1)  # [vocab]
        return [float(probs[choice_token_ids(self.adapter.tokenizer, c)].sum()) for c in choices]

    def score_blocks(self, stream_id: str, query: BlockQuery) -> BlockScan:
        """The stream's retained history scored block by block (moment searches); the context is restored."""
        return score_blocks(self, stream_id, query)

    def stats(self, stream_id: str) -> KVStats:
        """The stream's KV session numbers (tokens resident, evicted, offloaded, bytes)."""
        return KVStats.of(self.engine.stats(stream_id))


def _prompt(stats: AnswerStats, usage: PromptUsage) -> None:
    """Copy the session's exact prompt counts into the answer's stats."""
    stats.attended_tokens, stats.question_tokens = usage.context_tokens, usage.question_tokens
    stats.prompted = True
