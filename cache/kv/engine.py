"""One shared LLM serving many live streams, each with a bounded KV session, under one replica memory budget.

Typical use (the pipeline feeds it from the model adapter)::

    engine = LLMEngine(adapter.llm, KVConfig(budget_tokens=8192), memory_budget_bytes=8 << 30)
    engine.open("cam1", adapter.llm.embed(adapter.stream_prefix_ids()))
    engine.append("cam1", adapter.chunk_embeds(frames, pts), meta={"pts": pts})   # per chunk, on arrival
    for token in engine.ask("cam1", adapter.question_embeds(q), 64, adapter.eos_token_ids):
        ...                                                                        # decode / stream out
    engine.close("cam1")

Pieces (prefix, chunk, question) are :class:`~stream.models.inputs.LLMInput` or a bare ``[L, d]`` tensor (1-D
positions).

Concurrency: every public method may be called from any thread. All model work goes through one step loop
(:mod:`cache.kv.scheduler`): each step batches one decode token of every answer in flight, then question and chunk
prefills up to a token budget, across streams. Per stream, work is FIFO: an answer sees exactly the chunks appended
before it was asked, and a chunk appended during that stream's answer waits for it; other streams never wait for
an answer. ``append`` and ``open`` return when their piece is prefilled; ``ask`` returns an iterator fed by the loop
(closing it cancels the answer at the next step boundary). Lock order: registry -> scheduler -> budget -> block
store.
"""
from __future__ import annotations

import itertools
import threading
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, Union

import torch

from cache.kv.budget import ReplicaBudget
from cache.kv.config import KVConfig, Sampling
from cache.kv.errors import KVCapacityError, StreamExistsError, UnknownStreamError
from cache.kv.scheduler import Scheduler, SchedulerStats, token_stream
from cache.kv.session import KVSession, reserved_bytes
from cache.kv.stats import BlockInfo, BlockScore, PromptUsage, SessionStats
from cache.memory import MemoryReport, tensor_bytes, total
from stream.errors import ConfigError, RequestError
from stream.models.inputs import LLMInput
from stream.models.llm import TextLM

Piece = Union[LLMInput, torch.Tensor]


class LLMEngine:
    """Shared language model + bounded KV sessions keyed by stream id.

    Args:
        llm: the decoder-only language model (see :class:`stream.models.llm.TextLM`), in eval mode.
        config: per-stream KV settings (the same for every stream of this engine).
        memory_budget_bytes: cap on all sessions' KV bytes together (attention buffers + offloaded CPU storage).
            Each stream reserves :meth:`bytes_per_stream` at open; offloaded history fills the rest and is dropped
            oldest-first (across streams) when full; a stream that cannot fit is refused with
            :class:`~cache.kv.errors.KVCapacityError`.
    """

    def __init__(self, llm: TextLM, config: KVConfig, memory_budget_bytes: int) -> None:
        self.llm, self.config = llm, config
        self.inv_freq = llm.inv_freq  # validates the rope type up front
        self.summary_layers = _resolve_layers(config.summary_layers, llm.num_layers)
        if config.policy == "offload" and config.retrieval_score == "query_key":
            _check_q_proj(llm, self.summary_layers)
        per_stream = reserved_bytes(llm, config)
        if memory_budget_bytes < per_stream:
            raise ConfigError(
                f"memory_budget_bytes={memory_budget_bytes} cannot hold one stream: a stream reserves {per_stream} "
                f"bytes (budget_tokens {config.budget_tokens} KV slots in window_quant={config.window_quant!r} + "
                f"canonical keys of sink_tokens {config.sink_tokens}). Fix: raise it, lower kv.budget_tokens, or "
                "set kv.window_quant: int8."
            )
        self.budget = ReplicaBudget(memory_budget_bytes)
        self.scheduler = Scheduler(llm, config.scheduler)
        self._registry_lock = threading.Lock()
        self._sessions: dict[str, KVSession] = {}
        self._seq = itertools.count()
        self._lanes = itertools.count()  # scheduler queues of block-scoring batches
        self._queued, self._queued_lock = Counter(), threading.Lock()  # chunk bytes handed over, not prefilled yet

    # ------------------------------------------------------------------ streams
    def open(self, stream_id: str, prefix_embeds: Piece) -> SessionStats:
        """Open a stream: reserve its memory and prefill its prefix (kept as attention sink).

        Raises:
            StreamExistsError: ``stream_id`` is already open (409).
            KVCapacityError: the replica budget cannot hold another stream (503).
            RequestError: bad id or prefix shape / length (400).
        """
        if not isinstance(stream_id, str) or not stream_id:
            raise RequestError(f"stream_id must be a non-empty string, got {stream_id!r}")
        prefix = self._check_piece(prefix_embeds, "prefix_embeds", allow_empty=True)
        if prefix.tokens > self.config.sink_tokens:
            raise RequestError(
                f"prefix_embeds has {prefix.tokens} tokens but kv.sink_tokens={self.config.sink_tokens}; "
                "raise kv.sink_tokens or shorten the stream prompt"
            )
        session = self._register(stream_id)
        try:
            self.scheduler.wait(self.scheduler.submit(stream_id, "prefix", session.prefill_prefix(prefix)))
        except BaseException:
            self._unregister(stream_id, session)
            raise
        return self.stats(stream_id)

    def _register(self, stream_id: str) -> KVSession:
        """Reserve, allocate and register a session."""
        with self._registry_lock:
            if stream_id in self._sessions:
                raise StreamExistsError(f"stream {stream_id!r} is already open; close it first or use another id")
            session = self._new_session(stream_id)
            self._sessions[stream_id] = session
            return session

    def _new_session(self, stream_id: str) -> KVSession:
        offload = self.config.policy == "offload"
        # reserve first (a store handle is needed for offload), so nothing is allocated beyond the budget
        session_args = (stream_id, self.llm, self.config, self.summary_layers)
        self.budget.reserve(stream_id, reserved_bytes(self.llm, self.config))
        try:
            session = KVSession(*session_args, self.budget.store_block if offload else None, self._seq.__next__)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            self.budget.release(stream_id)
            if isinstance(exc, RuntimeError) and "memory" not in str(exc).lower():
                raise
            raise KVCapacityError(f"cannot allocate the KV buffer of stream {stream_id!r}: {exc}") from exc
        if session.store is not None:
            self.budget.attach_store(stream_id, session.store)
        return session

    def _unregister(self, stream_id: str, session: KVSession) -> int:
        with self._registry_lock:
            if self._sessions.get(stream_id) is session:
                del self._sessions[stream_id]
        session.closed = True
        freed = self.budget.release(stream_id)
        session.free()
        return freed

    def close(self, stream_id: str) -> int:
        """Close a stream and free its memory; its queued work fails with ``UnknownStreamError``, an answer in
        flight stops at the next step boundary. Returns the bytes freed."""
        session = self._get(stream_id)
        with self._registry_lock:
            if self._sessions.get(stream_id) is session:
                del self._sessions[stream_id]  # no new work is accepted from now on
        session.closed = True
        freed: list[int] = []
        done = threading.Event()

        def release() -> None:  # on the loop thread, after the stream's tasks were closed
            freed.append(self._unregister(stream_id, session))
            done.set()

        self.scheduler.cancel_stream(stream_id, UnknownStreamError(f"stream {stream_id!r} was closed"), release)
        done.wait()
        return freed[0]

    def append(self, stream_id: str, embeds: Piece, meta: Mapping[str, Any] | None = None) -> None:
        """Prefill one chunk (visual tokens + interleaved text) as one block of ``stream_id``; returns when done. A
        chunk longer than a block may be (``min(window_tokens, reserve_tokens)``) is appended as several consecutive
        blocks (exact: :mod:`cache.kv.pieces`); one carrying family extras goes whole, evicting old blocks first.

        ``meta`` (e.g. ``{"pts": [...], "frames": [...]}``) is kept with the block and reported when the block is
        retrieved for a question.
        """
        session = self._get(stream_id)
        piece = self._check_piece(embeds, "embeds")
        limit = self.config.window_tokens + self.config.reserve_tokens  # a piece longer than a block is split ...
        if piece.extras and piece.tokens > limit:  # ... unless its family extras make it one piece
            raise RequestError(
                f"chunk of {piece.tokens} tokens carries family extras (cannot be split into blocks) and exceeds the "
                f"{limit} tokens the KV budget holds beside the sinks (kv.budget_tokens={self.config.budget_tokens} "
                f"- kv.sink_tokens={self.config.sink_tokens}). Fix: send fewer frames per chunk (sampler."
                "frames_per_chunk), keep fewer tokens per frame, or raise kv.budget_tokens"
            )
        self._check_open(session, stream_id)
        nbytes = tensor_bytes([piece.embeds, *(v for v in piece.extras.values() if isinstance(v, torch.Tensor))])
        self._count_queued(stream_id, nbytes)
        try:
            self.scheduler.wait(self.scheduler.submit(stream_id, "chunk", session.append(piece, dict(meta or {}))))
        finally:
            self._count_queued(stream_id, -nbytes)

    def ask(
        self,
        stream_id: str,
        question_embeds: Piece,
        max_new_tokens: int,
        eos_ids: Iterable[int] = (),
        sampling: Sampling | None = None,
        usage: PromptUsage | None = None,
    ) -> Iterator[int]:
        """Answer a question against the stream so far; an iterator of generated token ids.

        Arguments are checked now; the question is queued at the first ``next()`` and sees every chunk appended
        before that. The stream's context is restored when the answer ends or the iterator is closed (the
        question and answer are not kept). EOS is not yielded. ``usage`` (if given) holds the exact prompt counts
        (context attended + question tokens) once the question is prefilled, i.e. before the first token.
        """
        session = self._get(stream_id)
        question = self._check_piece(question_embeds, "question_embeds")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if question.tokens + max_new_tokens > self.config.reserve_tokens:
            raise RequestError(
                f"question ({question.tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"kv.reserve_tokens={self.config.reserve_tokens}; shorten the question, lower max_new_tokens or "
                "raise kv.reserve_tokens"
            )
        return self._answer(session, stream_id, question, max_new_tokens, list(eos_ids), sampling or Sampling(),
                            usage)

    def next_logits(self, stream_id: str, question_embeds: Piece) -> torch.Tensor:
        """Logits ``[vocab]`` (float32) of the first answer token to a question; the context is restored.

        Runs through the step loop like :meth:`ask` (same placement: retrieval, sinks, question prefill) and sees
        the same chunks an answer asked now would see.
        """
        session, question = self._question_of(stream_id, question_embeds)
        task = self.scheduler.submit(stream_id, "question", session.next_logits(question), answer=True)
        out = list(token_stream(self.scheduler, task))
        if len(out) != 1:
            raise UnknownStreamError(f"stream {stream_id!r} was closed while scoring")
        return out[0]

    # ------------------------------------------------------------------ the history, block by block
    def blocks(self, stream_id: str, since: float | None = None, until: float | None = None) -> list[BlockInfo]:
        """The stream's retained blocks (offloaded, then the window) whose frame times meet ``[since, until]``."""
        return [b for b in self._get(stream_id).block_infos() if b.overlaps(since, until)]

    def block_relevance(self, stream_id: str, question_embeds: Piece, blocks: list[BlockInfo]) -> list[BlockScore]:
        """Each block's retrieval score for a question (``None``: the block left the history meanwhile).

        Cost: one unbatched forward of the question alone (its probe vector) plus one inner product per block;
        runs in the stream's own queue of the step loop, so it sees the blocks appended before it.
        """
        session, question = self._question_of(stream_id, question_embeds)
        work = session.block_relevance(question, [b.block_id for b in blocks])
        scores = self._one(self.scheduler.submit(stream_id, "question", work, answer=True), stream_id)
        return [BlockScore(b, scores.get(b.block_id)) for b in blocks]

    def block_choices(self, stream_id: str, question_embeds: Piece, blocks: list[BlockInfo],
                      choice_ids: list[list[int]]) -> list[BlockScore]:
        """Each block's choice probabilities with only the sinks and that block as context; ``score`` is the first
        choice's share of all choices (e.g. P(yes) / (P(yes) + P(no))); ``None``: the block left meanwhile.

        Cost: one question prefill per block, batched: blocks go in batches of at most ``max_batch_rows`` rows and
        one session budget of scratch tokens, one batch per step on a queue of their own, so the stream's ingest
        and other streams' work run between the batches.
        """
        session, question = self._question_of(stream_id, question_embeds)
        lane = f"{stream_id}\x00blocks{next(self._lanes)}"
        tasks = [self.scheduler.submit(lane, "question", session.block_choices(question, ids, choice_ids), answer=True)
                 for ids in self._probe_batches(session, blocks, question.tokens)]
        probs: dict[int, list[float]] = {}
        for task in tasks:
            probs.update(self._one(task, stream_id))
        out = []
        for b in blocks:
            p = probs.get(b.block_id)
            out.append(BlockScore(b, p[0] / max(sum(p), 1e-12), tuple(p)) if p else BlockScore(b, None))
        return out

    def _probe_batches(self, session: KVSession, blocks: list[BlockInfo], question: int) -> list[list[int]]:
        """Block ids in batches of at most ``max_batch_rows`` rows and ``budget_tokens`` scratch tokens."""
        batches: list[list[int]] = [[]]
        used, rows = 0, self.config.scheduler.max_batch_rows
        for b in blocks:
            need = session.sink_len + b.tokens + question
            if batches[-1] and (len(batches[-1]) == rows or used + need > self.config.budget_tokens):
                batches.append([])
                used = 0
            batches[-1].append(b.block_id)
            used += need
        return [ids for ids in batches if ids]

    def _question_of(self, stream_id: str, question_embeds: Piece) -> tuple[KVSession, LLMInput]:
        session = self._get(stream_id)
        question = self._check_piece(question_embeds, "question_embeds")
        if question.tokens + 1 > self.config.reserve_tokens:
            raise RequestError(f"question ({question.tokens} tokens) exceeds kv.reserve_tokens="
                               f"{self.config.reserve_tokens}; shorten the question or raise kv.reserve_tokens")
        self._check_open(session, stream_id)
        return session, question

    def _one(self, task: Any, stream_id: str) -> Any:
        """The single item a scoring task yields."""
        out = list(token_stream(self.scheduler, task))
        if len(out) != 1:
            raise UnknownStreamError(f"stream {stream_id!r} was closed while scoring")
        return out[0]

    def _answer(self, session: KVSession, stream_id: str, question: LLMInput, max_new: int,
                eos_ids: list[int], sampling: Sampling, usage: PromptUsage | None = None) -> Iterator[int]:
        self._check_open(session, stream_id)
        work = session.answer(question, max_new, eos_ids, sampling, usage)
        task = self.scheduler.submit(stream_id, "question", work, answer=True)
        yield from token_stream(self.scheduler, task)

    # ------------------------------------------------------------------ reports
    def stats(self, stream_id: str) -> SessionStats:
        """Snapshot of one stream's KV state (``memory``: its bytes by component, measured)."""
        return self._get(stream_id).stats(self.budget.dropped[stream_id], self._queued_bytes(stream_id))

    def memory_report(self, stream_id: str | None = None) -> MemoryReport:
        """Bytes by component (:class:`cache.memory.MemoryReport`) of one stream, or summed over this replica's open
        streams (``None``), measured on the tensors the sessions and the step loop's queue hold."""
        if stream_id is not None:
            return self._get(stream_id).memory(self._queued_bytes(stream_id))
        with self._registry_lock:
            sessions = list(self._sessions.items())
        return total(session.memory(self._queued_bytes(sid)) for sid, session in sessions)

    def _queued_bytes(self, stream_id: str) -> int:
        with self._queued_lock:
            return self._queued.get(stream_id, 0)

    def _count_queued(self, stream_id: str, nbytes: int) -> None:
        with self._queued_lock:
            self._queued[stream_id] += nbytes
            if self._queued[stream_id] <= 0:
                del self._queued[stream_id]

    def memory_bytes(self) -> int:
        """KV bytes held by all open streams (reservations + offloaded storage); always <= the budget."""
        return self.budget.used_bytes()

    def bytes_per_stream(self) -> int:
        """Bytes each open stream reserves."""
        return reserved_bytes(self.llm, self.config)

    def scheduler_stats(self) -> SchedulerStats:
        """Counters of the step loop (steps, batched rows, prefill tokens, queued tasks)."""
        return self.scheduler.snapshot()

    def stream_ids(self) -> list[str]:
        with self._registry_lock:
            return list(self._sessions)

    # ------------------------------------------------------------------ helpers
    def _get(self, stream_id: str) -> KVSession:
        with self._registry_lock:
            session = self._sessions.get(stream_id)
        if session is None:
            raise UnknownStreamError(f"no open stream {stream_id!r}; open it first (open streams: {self.stream_ids()})")
        return session

    @staticmethod
    def _check_open(session: KVSession, stream_id: str) -> None:
        if session.closed:
            raise UnknownStreamError(f"stream {stream_id!r} was closed")

    def _check_piece(self, piece: Piece, name: str, allow_empty: bool = False) -> LLMInput:
        """A bare ``[L, d]`` tensor or an :class:`LLMInput` -> a validated ``LLMInput`` on the model's device."""
        if isinstance(piece, LLMInput):
            embeds = piece.embeds
        else:
            embeds = piece
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[1] != self.llm.hidden_size:
            got = list(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise RequestError(f"{name} must be a [tokens, {self.llm.hidden_size}] tensor, got {got}")
        if not allow_empty and embeds.shape[0] == 0:
            raise RequestError(f"{name} is empty; give at least one token")
        if not embeds.is_floating_point():
            raise RequestError(f"{name} must be floating point embeddings, got {embeds.dtype}")
        embeds = embeds.to(self.llm.device, self.llm.dtype)
        if not isinstance(piece, LLMInput):
            return LLMInput(embeds)
        rows = self.llm.position_rows
        if piece.positions is not None and piece.positions.shape[0] not in (1, rows):
            raise RequestError(
                f"{name}.positions has {piece.positions.shape[0]} rows but {type(self.llm.decoder).__name__} takes "
                f"{rows}; build the input with the model's adapter"
            )
        return LLMInput(embeds, piece.positions, dict(piece.extras), dict(piece.meta))


def _resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Summary layer indices (negative from the end); empty = all."""
    if not layers:
        return list(range(num_layers))
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise ConfigError(
            f"kv.summary_layers has {bad} but the model has {num_layers} layers; use indices in "
            f"[{-num_layers}, {num_layers - 1}] or [] for all"
        )
    return sorted({i % num_layers for i in layers})


def _check_q_proj(llm: TextLM, layers: list[int]) -> None:
    for i in layers:
        if not hasattr(getattr(llm.decoder.layers[i], "self_attn", None), "q_proj"):
            raise ConfigError(
                f"kv.retrieval_score='query_key' needs layer {i}.self_attn.q_proj, which "
                f"{type(llm.decoder).__name__} lacks. Fix: set kv.retrieval_score='key_key'."
            )
