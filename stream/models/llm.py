"""A thin handle on the decoder-only LLM inside a VLM: embed ids, run embeddings through it with a KV cache.

Everything LLM-side (``cache.kv`` sessions, the pipeline, benchmarks) talks to this class instead of a family's
model class, so a stream session works the same for LLaVA-OneVision (Qwen2), SmolVLM (Llama) or a bare
``*ForCausalLM``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Cache, PreTrainedModel


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

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        cache: Cache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 1,
    ) -> torch.Tensor:
        """Run ``embeds`` ``[B, L, d]`` through the decoder, appending to ``cache`` in place.

        Args:
            position_ids: ``[B, L]`` int64 rotary positions; default continues from ``cache``'s length.
            attention_mask: optional ``[B, past + L]`` 0/1 mask (padding); ``None`` = causal over everything.
            logits_to_keep: how many final positions get logits (0 = all).

        Returns:
            ``[B, logits_to_keep or L, vocab]`` float logits.
        """
        out = self.decoder(
            inputs_embeds=embeds.to(self.device, self.dtype),
            past_key_values=cache,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=cache is not None,
        )
        hidden = out.last_hidden_state  # [B, L, d]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden).float()
