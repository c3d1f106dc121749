"""Helpers of the KV session tests: tiny random LLMs and a plain full-cache reference (the oracle)."""
from __future__ import annotations

from typing import Iterator, Sequence

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from cache.kv import KVConfig, LLMEngine
from stream.models.llm import TextLM

HIDDEN = 64


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on a busy machine two threads spin-wait (50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_lm(family: str = "qwen2", seed: int = 0, layers: int = 2) -> TextLM:
    """A seeded random LM. ``initializer_range=0.2`` makes attention matter, so wrong context changes tokens."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=1 << 20, initializer_range=0.2,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    return TextLM.from_causal_lm(model.eval())


def embeds(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """``[n, HIDDEN]`` seeded random embeddings."""
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed)) * scale


def stream(n_chunks: int, tokens: int, seed: int = 100) -> list[torch.Tensor]:
    return [embeds(tokens, seed + i) for i in range(n_chunks)]


def kv_config(**kw) -> KVConfig:
    base = dict(budget_tokens=256, sink_tokens=8, reserve_tokens=64, retrieve_tokens=32, quant="none",
                window_quant="none", rebase_position=4096)
    base.update(kw)
    return KVConfig(**base)


def run_engine(llm: TextLM, cfg: KVConfig, prefix, chunks, question, n: int = 8, budget: int = 1 << 30):
    """Open, append every chunk, ask once greedily; returns (tokens, engine)."""
    engine = LLMEngine(llm, cfg, budget)
    engine.open("s", prefix)
    for i, chunk in enumerate(chunks):
        engine.append("s", chunk, {"chunk": i})
    return list(engine.ask("s", question, n)), engine


@torch.inference_mode()
def reference(
    llm: TextLM,
    pieces: Sequence[torch.Tensor],
    question: torch.Tensor,
    n: int = 8,
    drop: tuple[int, int] | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Plain ``DynamicCache`` greedy decoding: prefill ``pieces`` one call each at consecutive positions,
    optionally delete cache tokens ``drop=(start, end)``, then the question. Returns tokens, first logits."""
    cache, pos = DynamicCache(), 0
    for piece in pieces:
        llm.forward(piece[None], cache=cache, position_ids=torch.arange(pos, pos + len(piece))[None])
        pos += len(piece)
    if drop is not None:
        a, b = drop
        for layer in cache.layers:
            layer.keys = torch.cat([layer.keys[:, :, :a], layer.keys[:, :, b:]], 2)
            layer.values = torch.cat([layer.values[:, :, :a], layer.values[:, :, b:]], 2)
    logits = llm.forward(question[None], cache=cache, position_ids=torch.arange(pos, pos + len(question))[None])
    first, out = logits[0, -1].clone(), []
    pos += len(question)
    for _ in range(n):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits = llm.forward(llm.embed(torch.tensor([token]))[None], cache=cache, position_ids=torch.tensor([[pos]]))
        pos += 1
    return out, first


class RecordingLM(TextLM):
    """A ``TextLM`` that records ``(position_ids [L], logits [vocab] of the last position)`` of every call."""

    def __init__(self, llm: TextLM) -> None:
        super().__init__(llm.decoder, llm.lm_head)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, embeds, cache=None, position_ids=None, attention_mask=None, logits_to_keep=1, **kw):
        logits = super().forward(embeds, cache, position_ids, attention_mask, logits_to_keep, **kw)
        pos = position_ids.reshape(-1, position_ids.shape[-1])[0]  # first row of [B, L] / [R, B, L]
        n = int(kw["logits_at"][0]) + 1 if kw.get("logits_at") is not None else len(pos)
        self.calls.append((pos[:n].cpu().clone(), logits[0, -1].clone()))
        return logits

    def logits_at(self, first_position: int, length: int) -> torch.Tensor:
        """Logits of the last call that prefilled ``length`` tokens from ``first_position``."""
        for positions, logits in reversed(self.calls):
            if len(positions) == length and int(positions[0]) == first_position:
                return logits
        raise LookupError(f"no call at positions {first_position}..+{length}")
