"""One stream's bounded KV session: prefill chunks on arrival, evict to a hard budget, answer questions.

Layout of the resident buffer (:class:`~cache.kv.kvcache.BoundedCache`)::

    [ sinks (stream prefix) | window: recent blocks, oldest first | scratch: chunk, or retrieved + question + answer ]

* **Blocks.** One block = the tokens of one :meth:`KVSession.append` call (a chunk; a frame if chunks are single
  frames). Eviction and retrieval work on whole blocks.
* **Eviction.** After a chunk is prefilled (it attends to the full window), the oldest window blocks are evicted until
  the window fits ``window_tokens``: dropped (``sink_window``) or offloaded to CPU (``offload``).
* **Questions** do not change the stream: retrieved blocks, the question and the answer are written to the scratch
  area and rolled back afterwards, so answers never pollute later context.
* **Positions.** Tokens in the window keep the rotary position they were prefilled at. ``position_mode="original"``:
  sinks and retrieved blocks also sit at their stream positions (ReKV keeps this order too; positions grow without
  bound). ``"compact"`` (default): sinks and retrieved blocks are re-rotated from un-rotated copies to sit right
  before the window, so the model sees ``sinks, retrieved, window, question`` at consecutive positions (StreamingLLM);
  with nothing evicted this is exactly the plain layout. RoPE is relative, so when positions reach
  ``rebase_position`` the whole window is rotated back once ("re-base") and positions stay small.
* **Pieces** are :class:`~stream.models.inputs.LLMInput`: positions relative to the piece's start (``[R, L]``, M-RoPE
  has ``R = 3``) and an ``extent`` that advances the stream position. Each block keeps its base position and its
  relative positions; keys only ever move by *uniform* shifts (all rows by the same ``delta``, an ordinary rotation,
  so also exact for M-RoPE). Un-rotated copies (sinks, offloaded blocks) go through ``TextLM.rotate_keys``.
* **Coroutines.** The model work of :meth:`KVSession.prefill_prefix`, :meth:`KVSession.append` and
  :meth:`KVSession.answer` is written as generators that *yield* a :class:`Forward` (the tokens to run through the
  model into this session's cache) and are *sent* the logits of its last token; ``answer`` also yields each
  generated token id (an ``int``). The scheduler (:mod:`cache.kv.scheduler`) batches the forwards of many sessions
  into one model call; :func:`cache.kv.forward.drive` runs one coroutine alone. Buffer edits between forwards stay per stream.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from transformers import DynamicCache

from cache.kv import policies
from cache.kv.config import KVConfig, Sampling
from cache.kv.forward import Forward, Work
from cache.kv.history import BlockHistory
from cache.kv.kvcache import BoundedCache
from cache.kv.offload import BlockStore, StoredBlock, pack_block, unpack_block
from cache.kv.pieces import split_piece
from cache.kv.quant import QTensor, dequantize, quantize_tokens
from cache.kv.sampling import next_token
from cache.kv.stats import PromptUsage, RetrievedBlock, SessionStats
from cache.memory import MemoryReport, session_bytes, tensor_bytes
from stream.models.inputs import LLMInput
from stream.models.llm import TextLM

# (stream_id, block, vector, stream_cap) -> stored?
StoreBlockFn = Callable[[str, StoredBlock, torch.Tensor, int], bool]


@dataclass(eq=False)
class WindowBlock:
    """A resident block: ``pos`` is the rotary position of its first token, ``stream_pos`` its stream position,
    ``rel`` its relative positions ``[R, tokens]``, ``extent`` how many positions it covers."""

    block_id: int
    tokens: int
    pos: int
    stream_pos: int
    meta: dict[str, Any] = field(default_factory=dict)
    rel: torch.Tensor | None = None
    extent: int = 0


class KVSession(BlockHistory):
    """The bounded KV state of one stream. Its coroutines must be driven by one thread at a time (the engine's
    step loop drives all of them).

    Args:
        stream_id: the stream's id (for the replica budget and messages).
        llm: the shared language model.
        config: the KV settings.
        summary_layers: decoder layers that form retrieval vectors (validated by the engine).
        store_block: admits an offloaded block under the replica budget (``offload`` only).
        next_seq: engine-wide arrival counter for offloaded blocks.
    """

    def __init__(
        self,
        stream_id: str,
        llm: TextLM,
        config: KVConfig,
        summary_layers: list[int],
        store_block: StoreBlockFn | None = None,
        next_seq: Callable[[], int] | None = None,
    ) -> None:
        self.stream_id, self.llm, self.cfg = stream_id, llm, config
        self.summary_layers = summary_layers
        self._store_block, self._next_seq = store_block, next_seq
        self.rows = llm.position_rows
        shape = (llm.num_layers, config.budget_tokens, llm.num_kv_heads, llm.head_dim)
        self.cache = BoundedCache(*shape, llm.dtype, llm.device, config.window_quant)
        offload = config.policy == "offload"
        self.store = BlockStore(len(summary_layers) * llm.num_kv_heads * llm.head_dim) if offload else None
        self.closed = False
        self.window: deque[WindowBlock] = deque()
        self.sink_keys: torch.Tensor | QTensor | None = None  # [layers, kv_heads, sinks, hd] without RoPE
        self.sink_rel: torch.Tensor | None = None  # [R, sinks] relative positions of the prefix
        self.sink_len = self.sink_extent = self.sink_pos = 0
        self.next_pos = self.pos_offset = self.stream_tokens = 0
        self.blocks = self.evicted = self.rebases = 0
        self.min_block_tokens = config.budget_tokens
        self.last_retrieval: tuple[RetrievedBlock, ...] = ()

    def _rel(self, piece: LLMInput) -> torch.Tensor:
        return piece.position_rows(self.rows).to("cpu", torch.long)  # [R, L]

    def _shifted(self, rel: torch.Tensor, base: int) -> torch.Tensor:
        return rel + int(base)

    # ------------------------------------------------------------------ ingest
    @torch.inference_mode()
    def prefill_prefix(self, piece: LLMInput) -> Work:
        """Prefill the stream prefix at relative positions from 0; it stays resident as the attention sink."""
        n = piece.tokens
        if n:
            rel = self._rel(piece)
            yield Forward(self, piece.embeds, rel, piece.extras)
            keys, _ = self.cache.read(0, n)  # [layers, kv_heads, n, hd]
            canonical = self.llm.rotate_keys(keys, -rel)
            quantized = self.cfg.window_quant == "int8"
            self.sink_keys, self.sink_rel = quantize_tokens(canonical) if quantized else canonical, rel
        self.sink_len, self.sink_extent, self.next_pos, self.stream_tokens = n, piece.extent, piece.extent, n

    @torch.inference_mode()
    def append(self, piece: LLMInput, meta: dict[str, Any]) -> Work:
        """Prefill one chunk as a new block (as several consecutive blocks when it is longer than a block may be,
        :func:`cache.kv.pieces.split_piece`), evicting the oldest blocks beyond the window after each."""
        if piece.extras:  # opaque family inputs cannot be cut: the piece goes whole, after making room for it
            yield from self._append_block(piece, piece.extent, meta, make_room=True)
            return
        parts = split_piece(piece, self.block_limit)
        for k, (part, extent) in enumerate(parts):
            part_meta = meta if len(parts) == 1 else {**meta, "part": k, "parts": len(parts)}
            yield from self._append_block(part, extent, part_meta)

    @property
    def block_limit(self) -> int:
        """Most tokens of one block: it is prefilled in the reserve and must fit the window afterwards."""
        return min(self.cfg.window_tokens, self.cfg.reserve_tokens)

    def _append_block(self, piece: LLMInput, extent: int, meta: dict[str, Any], make_room: bool = False) -> Work:
        """Prefill ``piece`` as one block advancing the stream by ``extent``, then evict what no longer fits."""
        # 1. keep positions bounded and sinks right before the window (a block larger than the reserve first
        #    evicts the oldest window blocks it would not fit beside)
        self._rebase()
        if make_room:
            self._evict(room=piece.tokens)
        self._place_sinks(retrieved_extent=0)
        # 2. prefill at the next positions (attends to sinks + the whole window)
        n, rel = piece.tokens, self._rel(piece)
        yield Forward(self, piece.embeds, self._shifted(rel, self.next_pos), piece.extras)
        stream_pos = self.next_pos + self.pos_offset
        block_meta = {**piece.meta, **meta}
        self.window.append(WindowBlock(self.blocks, n, self.next_pos, stream_pos, block_meta, rel, extent))
        self.blocks += 1
        self.next_pos += extent
        self.stream_tokens += n
        self.min_block_tokens = min(self.min_block_tokens, n)
        # 3. evict what no longer fits
        self._evict()

    @property
    def window_start(self) -> int:
        """Rotary position of the first window token (``next_pos`` when the window is empty)."""
        return self.window[0].pos if self.window else self.next_pos

    def _place_sinks(self, retrieved_extent: int) -> None:
        """compact: rotate the sinks (from their un-rotated copy) to sit before retrieved blocks and window."""
        if self.cfg.position_mode != "compact" or not self.sink_len:
            return
        start = policies.compact_sink_start(self.window_start, retrieved_extent, self.sink_extent)
        if start != self.sink_pos:
            self.cache.write_keys(0, self.llm.rotate_keys(self.sink_canonical(), self._shifted(self.sink_rel, start)))
            self.sink_pos = start

    def sink_canonical(self) -> torch.Tensor:
        """The sinks' keys without RoPE ``[layers, kv_heads, sinks, hd]`` in the model dtype (dequantized when int8)."""
        keys = self.sink_keys
        return dequantize(keys, self.llm.dtype) if isinstance(keys, QTensor) else keys

    def _evict(self, room: int = 0) -> None:
        """Evict the oldest blocks until the window fits ``window_tokens`` -- or, with ``room``, until a new block of
        that many tokens fits beside it in the buffer."""
        limit = self.cfg.window_tokens if not room else self.cfg.budget_tokens - self.sink_len - room
        count = policies.blocks_to_evict([b.tokens for b in self.window], limit)
        if not count:
            return
        gone = [self.window.popleft() for _ in range(count)]
        start = self.sink_len
        end = start + sum(b.tokens for b in gone)
        if self.store is not None:
            keys, values = self.cache.read(start, end)  # [layers, kv_heads, tokens, hd]
            self._offload(gone, keys, values)
        self.cache.delete(start, end)
        self.evicted += count

    def _offload(self, gone: list[WindowBlock], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Un-rotate, summarise, pack and store evicted blocks (under the replica budget)."""
        offset = 0
        for b in gone:
            k = keys[:, :, offset : offset + b.tokens]
            v = values[:, :, offset : offset + b.tokens]
            offset += b.tokens
            canonical = self.llm.rotate_keys(k, -self._shifted(b.rel, b.pos))
            vector = policies.block_summary(canonical[self.summary_layers])
            packed_k, packed_v = pack_block(canonical, v, self.cfg.quant)
            block = StoredBlock(b.block_id, self._next_seq(), b.tokens, b.stream_pos, packed_k, packed_v, b.meta,
                                b.rel, b.extent)
            self._store_block(self.stream_id, block, vector, self.cfg.offload_bytes)

    def _rebase(self) -> None:
        """compact: shift the window back uniformly so the largest position stays below ``rebase_position``."""
        if self.cfg.position_mode != "compact":
            return
        if self.next_pos + self.cfg.reserve_tokens <= self.cfg.rebase_position:
            return
        room = self.cfg.retrieve_tokens if self.store is not None else 0
        shift = self.window_start - (self.sink_extent + room)  # afterwards retrieved blocks fit between sinks & window
        if shift <= 0:
            return
        if self.window:
            keys, _ = self.cache.read(self.sink_len, self.cache.length)
            self.cache.write_keys(self.sink_len, self.llm.shift_keys(keys, -shift))
        for b in self.window:
            b.pos -= shift
        self.next_pos -= shift
        self.pos_offset += shift
        self.rebases += 1

    # ------------------------------------------------------------------ questions
    @torch.inference_mode()
    def next_logits(self, question: LLMInput) -> Work:
        """Yields the question's forward, then the ``[vocab]`` float32 logits of the first answer token (the same
        placement as :meth:`answer`); the resident state is restored afterwards."""
        saved = self.cache.length
        try:
            logits = yield self._question_forward(question, max_new_tokens=1)
            yield logits.float()
        finally:
            self.cache.truncate(saved)

    @torch.inference_mode()
    def answer(self, question: LLMInput, max_new_tokens: int, eos_ids: Iterable[int], sampling: Sampling,
               usage: PromptUsage | None = None) -> Work:
        """Answer ``question`` against the stream so far; yields forwards and generated token ids (not EOS).

        ``usage`` (if given) receives the exact prompt counts when the question is placed. The stream's resident
        state is restored when the coroutine finishes or is closed (cancellation).
        """
        saved, eos = self.cache.length, set(eos_ids)
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        try:
            logits = yield self._question_forward(question, max_new_tokens, usage)
            pos = self.next_pos + question.extent
            for step in range(max_new_tokens):
                token = next_token(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
                if token in eos:
                    return
                yield token
                if step + 1 == max_new_tokens or self.closed:
                    return
                embed = self.llm.embed(torch.tensor([token], device=self.llm.device))  # [1, d]
                logits = yield Forward(self, embed, torch.full((self.rows, 1), pos, dtype=torch.long))
                pos += 1
        finally:
            self.cache.truncate(saved)

    def _question_forward(self, question: LLMInput, max_new_tokens: int,
                          usage: PromptUsage | None = None) -> Forward:
        """Place retrieved blocks and sinks for a question; the forward that prefills it after the window."""
        # 1. bounded positions; 2. bring back relevant offloaded blocks; 3. sinks before them
        self._rebase()
        allowance = self.cfg.reserve_tokens - question.tokens - max_new_tokens
        retrieved = self._place_retrieved(self._retrieve(question, min(self.cfg.retrieve_tokens, allowance)))
        self._place_sinks(retrieved_extent=retrieved)
        if usage is not None:  # the question attends to everything resident now, then to itself
            usage.context_tokens, usage.question_tokens = int(self.cache.length), int(question.tokens)
        # 4. the question right after the window
        rel = self._rel(question)
        return Forward(self, question.embeds, self._shifted(rel, self.next_pos), question.extras)

    def _retrieve(self, question: LLMInput, allowance: int) -> list[tuple[StoredBlock, float]]:
        """Offloaded blocks most relevant to ``question`` that fit ``allowance`` tokens, in stream order."""
        self.last_retrieval = ()
        if self.store is None or allowance <= 0 or not len(self.store):
            return []
        hits = self.store.search(self._question_vector(question), allowance // self.min_block_tokens + 1)
        found = [(self.store.get(i), s) for i, s in hits]
        found = [(b, s) for b, s in found if b is not None]  # the replica budget may have dropped some
        chosen = set(policies.select_blocks([b.block_id for b, _ in found], [s for _, s in found],
                                            [b.tokens for b, _ in found], allowance))
        picked = sorted(((b, s) for b, s in found if b.block_id in chosen), key=lambda bs: bs[0].stream_pos)
        self.last_retrieval = tuple(RetrievedBlock(b.block_id, s, b.tokens, dict(b.meta)) for b, s in picked)
        return picked

    def _place_retrieved(self, picked: list[tuple[StoredBlock, float]]) -> int:
        """Rotate retrieved blocks to their positions and write them after the window; returns their extent."""
        total = sum(b.span for b, _ in picked)
        pos = self.window_start - total  # compact: contiguous, right before the window
        for block, _ in picked:
            keys, values = unpack_block(block, self.llm.dtype, self.llm.device)
            start = pos if self.cfg.position_mode == "compact" else block.stream_pos - self.pos_offset
            rel = block.positions if block.positions is not None else torch.arange(block.tokens)[None]
            keys = self.llm.rotate_keys(keys, self._shifted(rel, start))
            self.cache.write(self.cache.length, keys, values)
            pos += block.span
        return total

    def _question_vector(self, question: LLMInput) -> torch.Tensor:
        """Probe: run the question alone and summarise its un-rotated queries (or keys) of the summary layers.

        Runs unbatched, on the step loop's thread (the hooks see no other forward)."""
        n, rel = question.tokens, self._rel(question)
        probe, captured, hooks = DynamicCache(), {}, []
        if self.cfg.retrieval_score == "query_key":
            for i in self.summary_layers:
                proj = self.llm.decoder.layers[i].self_attn.q_proj
                hooks.append(proj.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)))
        try:
            positions = rel.to(self.llm.device)[:, None]  # [R, 1, n]
            self.llm.forward(question.embeds[None], cache=probe, position_ids=positions, **question.extras)
        finally:
            for h in hooks:
                h.remove()
        if captured:  # [1, n, heads * hd] -> [layers, heads, n, hd]
            x = torch.stack([captured[i][0].view(n, -1, self.llm.head_dim).transpose(0, 1)
                             for i in self.summary_layers])
        else:
            keys = torch.stack([probe.layers[i].keys[0] for i in self.summary_layers])  # [layers, kv_heads, n, hd]
            x = self.llm.rotate_keys(keys, -rel)
        return policies.query_summary(x, self.llm.num_kv_heads)

    # ------------------------------------------------------------------ reports
    def stats(self, dropped_blocks: int, queued_bytes: int = 0) -> SessionStats:
        """A snapshot (read without the session lock; counts may be one call stale); ``queued_bytes``: this stream's
        chunk embeddings the engine holds, not prefilled yet."""
        bpt = self.cache.slot_bytes
        store, window = self.store, list(self.window)  # list(deque) is atomic under the GIL
        return SessionStats(
            stream_id=self.stream_id, policy=self.cfg.policy, stream_tokens=self.stream_tokens, blocks=self.blocks,
            resident_tokens=self.cache.length, peak_resident_tokens=self.cache.peak,
            budget_tokens=self.cfg.budget_tokens, sink_tokens=self.sink_len, window_blocks=len(window),
            window_used_tokens=sum(b.tokens for b in window), evicted_blocks=self.evicted,
            offloaded_blocks=len(store) if store else 0, offloaded_tokens=store.tokens if store else 0,
            offloaded_bytes=store.nbytes if store else 0, dropped_blocks=dropped_blocks,
            reserved_bytes=self.reserved_bytes(), resident_used_bytes=self.cache.length * bpt,
            next_position=self.next_pos, position_offset=self.pos_offset, rebases=self.rebases,
            last_retrieval=self.last_retrieval, memory=self.memory(queued_bytes, window),
        )

    def memory(self, queued_bytes: int = 0, window: list[WindowBlock] | None = None) -> MemoryReport:
        """This session's bytes by component, measured on the tensors it holds (:mod:`cache.memory`): the buffer's
        slots split by what they hold now, the canonical sink keys with the sinks, offloaded blocks on the host."""
        if not self.cache.layers:  # freed
            return MemoryReport(queued_chunks=queued_bytes)
        window = list(self.window) if window is None else window
        slot, length = self.cache.slot_bytes, self.cache.length
        held = sum(b.tokens for b in window)
        keys = self.sink_keys
        sink_keys = [keys.data, keys.scale, keys.minimum] if isinstance(keys, QTensor) else [keys]
        scratch = max(0, length - self.sink_len - held)
        return MemoryReport(
            kv_window=held * slot, kv_sinks=self.sink_len * slot + tensor_bytes(sink_keys),
            kv_reserve=(self.cache.capacity - self.sink_len - held - scratch) * slot, kv_retrieved=scratch * slot,
            queued_chunks=queued_bytes, host_offloaded=self.store.nbytes if self.store is not None else 0,
        )

    def reserved_bytes(self) -> int:
        """Fixed bytes of this session: attention buffer + canonical sink keys (room for ``sink_tokens``)."""
        return reserved_bytes(self.llm, self.cfg)

    def free(self) -> None:
        """Release the buffers (after close)."""
        self.cache.layers.clear()
        self.sink_keys = None
        self.window.clear()


def reserved_bytes(llm: TextLM, config: KVConfig) -> int:
    """Bytes one session reserves at open: its buffer (``budget_tokens`` slots of :func:`cache.memory.kv_slot_bytes`
    in ``kv.window_quant``) + canonical keys for ``sink_tokens`` sinks (:func:`cache.memory.session_bytes`)."""
    return session_memory(llm, config).kv_bytes


def session_memory(llm: TextLM, config: KVConfig) -> MemoryReport:
    """A session of ``config`` on ``llm`` in its steady state on paper: sinks and window full, scratch empty."""
    element = torch.empty((), dtype=llm.dtype).element_size()
    return session_bytes(llm.num_layers, llm.num_kv_heads, llm.head_dim, element, config.budget_tokens,
                         config.sink_tokens, config.window_tokens, config.window_quant)
