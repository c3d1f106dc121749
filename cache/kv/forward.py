"""The model work a KV session asks for, and the one function that runs it: a batched forward over sessions' caches.

Sessions (:mod:`cache.kv.session`) are written as coroutines (:data:`Work`) that *yield* a :class:`Forward` and are
sent the logits back; the scheduler (:mod:`cache.kv.scheduler`) gathers the forwards of many sessions into one
:func:`run_batch` call per step, and :func:`drive` runs one coroutine alone (batch of one). Both depend on this
module, never on each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

import torch

from cache.kv.kvcache import RowsCache, ragged_mask
from stream.models.llm import TextLM


@dataclass(eq=False)
class Forward:
    """Model work a session coroutine asks for: ``embeds`` ``[L, d]`` at absolute ``positions`` ``[R, L]`` into the
    session's cache; ``extra`` = the piece's family decoder inputs (:attr:`LLMInput.extras`, opaque here)."""

    session: Any  # the KVSession whose cache the tokens go into
    embeds: torch.Tensor
    positions: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.embeds.shape[0])


# a session coroutine: yields Forward (is sent [vocab] logits of its last token) or an int token (is sent None)
Work = Generator["Forward | int", "torch.Tensor | None", None]



@torch.inference_mode()
def run_batch(llm: TextLM, rows: list[tuple[Forward, int, int]]) -> list[torch.Tensor]:
    """One model call: row ``b`` runs tokens ``[start, end)`` of ``rows[b]``'s forward into its session's cache.

    Returns the ``[vocab]`` logits of each row's last token of the slice.
    """
    fwd0 = rows[0][0]
    new = [end - start for _, start, end in rows]
    width, dim, r = max(new), fwd0.embeds.shape[1], fwd0.positions.shape[0]
    device = llm.device
    embeds = torch.zeros(len(rows), width, dim, dtype=llm.dtype, device=device)  # [B, L, d]
    positions = torch.zeros(r, len(rows), width, dtype=torch.long)  # [R, B, L]
    for b, (fwd, start, end) in enumerate(rows):
        n = end - start
        embeds[b, :n] = fwd.embeds[start:end]
        positions[:, b, :n] = fwd.positions[:, start:end]
        positions[:, b, n:] = fwd.positions[:, end - 1 : end]  # padding: any valid position
    cache = RowsCache([fwd.session.cache for fwd, _, _ in rows], new)
    mask = ragged_mask(cache.past, new, cache.kv_len, device)  # [B, 1, L, kv]
    extra = fwd0.extra if len(rows) == 1 else {}
    logits = llm.forward(embeds, cache=cache, position_ids=positions.to(device), attention_mask=mask,
                         logits_at=torch.tensor(new) - 1, **extra)
    cache.finish()
    return [logits[b, 0] for b in range(len(rows))]



def drive(work: Work, llm: TextLM) -> list[int]:
    """Run one session coroutine alone (batch of one); returns the token ids it yielded."""
    tokens, value = [], None
    try:
        while True:
            item = work.send(value)
            if isinstance(item, int):
                tokens.append(item)
                value = None
            else:
                value = run_batch(llm, [(item, 0, item.tokens)])[0]
    except StopIteration:
        return tokens
