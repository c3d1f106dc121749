"""A KV session's retained history read block by block: what :mod:`serve.core.moments` and the fleet's yes/no
scorer ask of a stream (which blocks are held, each block's retrieval score, each block's answer probabilities).

Mixed into :class:`cache.kv.session.KVSession`; it reads the session's ``window`` (window blocks in stream order),
``store`` (offloaded blocks or ``None``), ``cache`` (the resident keys and values), the sinks (``sink_len``,
``sink_canonical()``, ``sink_rel``, ``sink_extent``), ``llm``, ``closed``, ``summary_layers`` and the helpers ``_rel``,
``_shifted`` and ``_question_vector``; it never writes them.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterator

import torch

from cache.kv import policies
from cache.kv.forward import Forward, Work, run_batch
from cache.kv.kvcache import BoundedCache
from cache.kv.offload import unpack_block
from cache.kv.stats import BlockInfo
from stream.models.inputs import LLMInput


class BlockHistory:
    """Block-level reads of a session's history (see the module docstring for what it uses)."""

    def block_infos(self) -> list[BlockInfo]:
        """Every retained block in stream order: offloaded ones, then the window (callable from any thread)."""
        stored = self.store.blocks() if self.store is not None else []
        window = list(self.window)  # list(deque) is atomic under the GIL
        return ([_block_info(b.block_id, b.tokens, b.meta, True) for b in stored]
                + [_block_info(b.block_id, b.tokens, b.meta, False) for b in window])

    @torch.inference_mode()
    def block_relevance(self, question: LLMInput, block_ids: list[int]) -> Work:
        """Yields ``{block_id: score}`` for the blocks still held: the retrieval score :meth:`_retrieve` ranks
        offloaded blocks by (the question's probe vector . the block's key summary; a window block's summary is
        computed from its resident keys). One unbatched probe forward of the question, on the step loop."""
        vector = self._question_vector(question)
        wanted = set(block_ids)
        scores = dict(self.store.search(vector, len(self.store))) if self.store is not None else {}
        for b, keys, _ in self._window_kv(wanted):
            scores[b.block_id] = float(policies.block_summary(keys[self.summary_layers]) @ vector)
        yield {i: s for i, s in scores.items() if i in wanted}

    @torch.inference_mode()
    def block_choices(self, question: LLMInput, block_ids: list[int], choice_ids: list[list[int]]) -> Work:
        """Yields ``{block_id: [p(choice), ...]}``: each choice's probability (summed over its token ids) as the
        first answer token to ``question`` with only the sinks and that block as context (sinks from position 0,
        the block right after them, then the question). One batched forward over small scratch caches, run on the
        step loop; the stream's own KV is only read. Blocks no longer held are left out."""
        held = [] if self.closed else self._held_kv(set(block_ids))
        if not held:
            yield {}
            return
        llm, q_rel = self.llm, self._rel(question)
        cap = self.sink_len + max(keys.shape[2] for _, keys, _, _, _ in held) + question.tokens
        sinks = (llm.rotate_keys(self.sink_canonical(), self.sink_rel), self.cache.read(0, self.sink_len)[1]) \
            if self.sink_len else None
        rows = []
        for _, keys, values, rel, extent in held:
            # a transient float scratch per block (the stream's int8 window is read dequantized)
            scratch = BoundedCache(llm.num_layers, cap, llm.num_kv_heads, llm.head_dim, llm.dtype, llm.device)
            if sinks is not None:
                scratch.write(0, *sinks)
            scratch.write(self.sink_len, llm.rotate_keys(keys, self._shifted(rel, self.sink_extent)), values)
            positions = self._shifted(q_rel, self.sink_extent + extent)
            rows.append((Forward(SimpleNamespace(cache=scratch), question.embeds, positions, question.extras), 0,
                         question.tokens))
        out = {}
        for (block_id, *_), logits in zip(held, run_batch(llm, rows)):
            probs = torch.softmax(logits.float(), dim=-1)  # [vocab]
            out[block_id] = [float(probs[ids].sum()) for ids in choice_ids]
        yield out

    def _window_kv(self, wanted: set[int]) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
        """Window blocks (``WindowBlock``) in ``wanted``: keys without RoPE, values ``[layers, kv_heads, tokens, hd]``."""
        offset = self.sink_len
        for b in list(self.window):
            if b.block_id in wanted:
                keys, values = self.cache.read(offset, offset + b.tokens)
                yield b, self.llm.rotate_keys(keys, -self._shifted(b.rel, b.pos)), values
            offset += b.tokens

    def _held_kv(self, wanted: set[int]) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """``(block_id, keys without RoPE, values, relative positions [R, tokens], extent)`` of the blocks in
        ``wanted`` still held (window or offloaded storage), in stream order."""
        out = [(b.block_id, keys, values, b.rel, b.extent) for b, keys, values in self._window_kv(wanted)]
        for block_id in wanted - {o[0] for o in out}:
            block = self.store.get(block_id) if self.store is not None else None
            if block is not None:
                keys, values = unpack_block(block, self.llm.dtype, self.llm.device)
                rel = block.positions if block.positions is not None else torch.arange(block.tokens)[None]
                out.append((block_id, keys, values, rel, block.span))
        return sorted(out, key=lambda o: o[0])


def _block_info(block_id: int, tokens: int, meta: dict[str, Any], offloaded: bool) -> BlockInfo:
    times = [float(p) for p in meta.get("pts") or ()]
    return BlockInfo(block_id, tokens, min(times) if times else None, max(times) if times else None, offloaded)
