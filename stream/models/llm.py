"""A thin handle on the decoder-only LLM inside a VLM: embed ids, run embeddings through it with a KV cache.

Everything LLM-side (``cache.kv`` sessions, the pipeline, benchmarks) talks to this class instead of a family's
model class, so a stream session works the same for LLaVA-OneVision (Qwen2), SmolVLM (Llama) or a bare
``*ForCausalLM``.
"""
from __future__ import annotations

import inspect
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import Cache, PreTrainedModel

from stream.models.rope import apply_rope, rope_inv_freq


class TextLM:
    """Decoder + LM head of a (vision-)language model.

    Args:
        decoder: the base decoder (``Qwen2Model``, ``LlamaModel``...) taking ``inputs_embeds``.
        lm_head: the output projection ``[d] -> [vocab]``.
    """

    def __init__(self, decoder: PreTrainedModel, lm_head: nn.Module) -> None:
        self.decoder = decoder
        self.lm_head = lm_head
        cfg = decoder.config
        self.config = cfg
        self.num_layers: int = cfg.num_hidden_layers
        self.hidden_size: int = cfg.hidden_size
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size: int = cfg.vocab_size

    @classmethod
    def from_causal_lm(cls, model: PreTrainedModel) -> "TextLM":
        """Wrap a ``*ForCausalLM`` (``model.model`` is the decoder, ``model.lm_head`` the head)."""
        return cls(model.model, model.lm_head)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def kv_bytes_per_token(self) -> int:
        """Bytes one token occupies in a full KV cache (keys + values, all layers)."""
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[L]`` or ``[B, L]`` int64 -> ``[L, d]`` / ``[B, L, d]`` input embeddings."""
        return self.decoder.get_input_embeddings()(ids.to(self.device))

    @cached_property
    def cache_argument(self) -> str:
        """The decoder's keyword for the KV cache: ``cache`` (transformers >= 5.24, where ``past_key_values`` is
        deprecated until its removal in 5.40) or ``past_key_values`` (earlier 5.x releases)."""
        params = inspect.signature(self.decoder.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 1,
        logits_at: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        """Run ``embeds`` ``[B, L, d]`` through the decoder, appending to ``cache`` in place.

        Args:
            position_ids: ``[R, B, L]`` int64 rotary positions (``R`` = 1 plain RoPE, 3 M-RoPE); ``R = 1`` may be
                given squeezed as ``[B, L]``. Default: continue from ``cache``'s length.
            attention_mask: optional ``[B, past + L]`` 0/1 padding mask, or an exact 4-D ``[B, 1, L, kv]`` bool mask
                (True = attend) that the decoder uses as is; ``None`` = causal over everything.
            logits_to_keep: how many final positions get logits (0 = all); ignored with ``logits_at``.
            logits_at: ``[B]`` int64, the one position of each row that gets logits (ragged batches: each row's
                last real token).
            extra: family-specific per-token inputs passed through to the decoder unchanged (e.g. DeepStack
                features and the visual mask of Qwen3-VL).

        Returns:
            ``[B, logits_to_keep or L, vocab]`` float logits (``[B, 1, vocab]`` with ``logits_at``).
        """
        if position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] == 1:
            position_ids = position_ids[0]  # [B, L]: plain RoPE decoders take 2-D positions
        kwargs = {self.cache_argument: cache}
        out = self.decoder(
            inputs_embeds=embeds.to(self.device, self.dtype),
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            **kwargs,
            **extra,
        )
        hidden = out.last_hidden_state  # [B, L, d]
        if logits_at is not None:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden = hidden[rows, logits_at.to(hidden.device)][:, None]  # [B, 1, d]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden).float()

    # ------------------------------------------------------------------ rotary positions of cached keys
    @property
    def position_rows(self) -> int:
        """Rows of rotary positions the decoder takes: 1 (plain RoPE)."""
        return 1

    @cached_property
    def inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies ``[head_dim / 2]`` float32 (validated: static rope type, whole heads)."""
        return rope_inv_freq(self.decoder, self.head_dim)

    def rotate_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the decoder's rotary embedding at ``positions`` ``[R, n]`` to keys ``[..., n, head_dim]``.

        Negative positions rotate backwards, so ``rotate_keys(rotate_keys(k, p), -p) == k`` up to rounding, and a
        uniform shift ``rotate_keys(k, full(delta))`` moves keys by ``delta`` (also under M-RoPE, where every row
        shifts by the same ``delta``). Plain RoPE (``R = 1``); computed in float32, returned in ``keys.dtype``.
        """
        if positions.ndim == 1:
            positions = positions[None]
        if positions.shape[0] != 1 and not bool((positions == positions[:1]).all()):
            raise ValueError(
                f"{type(self.decoder).__name__} uses 1-D RoPE but got {positions.shape[0]} different position rows"
            )
        return apply_rope(keys, positions[0], self.inv_freq)

    def shift_keys(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Move keys ``[..., n, head_dim]`` by a uniform position shift ``delta`` (one rotation by ``delta``)."""
        n = keys.shape[-2]
        return self.rotate_keys(keys, torch.full((self.position_rows, n), int(delta), dtype=torch.long))
