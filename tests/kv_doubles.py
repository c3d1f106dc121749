"""A test double of the language model for long-stream simulations (the bound tests, bench_engine, bench_kv).

:class:`FastForwardLM` is a :class:`~stream.models.llm.TextLM` around the same decoder. With ``fast_forward`` on,
``forward`` skips the network and writes random keys/values of the model's exact KV shape through the cache's
normal ``update`` path, so sessions evict, offload, quantize, index and account for them exactly as for real
chunks -- only the numbers inside are random. With it off, it is the real model.
"""
from __future__ import annotations

import torch
from transformers import Cache

from stream.models.llm import TextLM


class FastForwardLM(TextLM):
    """``TextLM`` whose prefill can be switched to random KV (``fast_forward = True``)."""

    def __init__(self, llm: TextLM, seed: int = 0) -> None:
        super().__init__(llm.decoder, llm.lm_head)
        self.fast_forward = False
        self._gen = torch.Generator(device="cpu").manual_seed(seed)

    def forward(
        self,
        embeds: torch.Tensor,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 1,
        logits_at: torch.Tensor | None = None,
        **extra,
    ) -> torch.Tensor:
        """Real forward, or (fast-forward) random KV appended to ``cache`` and zero logits ``[B, keep, vocab]``."""
        if not self.fast_forward or cache is None:
            return super().forward(embeds, cache, position_ids, attention_mask, logits_to_keep, logits_at, **extra)
        if logits_at is not None:
            logits_to_keep = 1
        batch, length = embeds.shape[:2]
        shape = (batch, self.num_kv_heads, length, self.head_dim)
        for layer in range(self.num_layers):
            k = torch.randn(shape, generator=self._gen).to(self.device, self.dtype)
            v = torch.randn(shape, generator=self._gen).to(self.device, self.dtype)
            cache.update(k, v, layer)
        return torch.zeros(batch, logits_to_keep or length, self.vocab_size, device=self.device)
