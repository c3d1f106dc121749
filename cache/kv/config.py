"""Validated settings of the LLM-side KV sessions (``kv:`` in the service config) and of one answer's sampling.

Token layout of one stream's resident cache (all counts are tokens of the LLM's KV cache)::

    | sinks (<= sink_tokens) | window (<= window_tokens) | reserve (<= reserve_tokens) |
                                                          ^ a chunk being prefilled, or
                                                            retrieved blocks + question + answer
    budget_tokens = sink_tokens + window_tokens + reserve_tokens   (hard cap, preallocated)
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stream.config_base import StrictModel


class SchedulerConfig(StrictModel):
    """The shared engine's step loop (continuous batching): what one step may run."""

    max_batch_rows: int = Field(
        16, ge=1, description="Most streams in one forward (per micro-batch: decode rows, prefill rows). 1 = no "
        "batching (one stream's work per forward, as a serial engine).",
    )
    token_budget: int = Field(
        512, ge=1, description="Most prefill tokens (questions + chunks) of one step, as vLLM's "
        "max_num_batched_tokens; a longer piece is prefilled in slices over several steps (chunked prefill). "
        "Decode rows (one token per answer in flight) come on top.",
    )
    questions_first: bool = Field(
        True, description="Question prefills go before chunk prefills (time to first token)."
    )
    max_ingest_wait_steps: int = Field(
        4, ge=0, description="Ageing: a chunk that has waited this many steps goes before questions, so ingest is "
        "never starved.",
    )


class KVConfig(StrictModel):
    """Bounded KV cache of one stream, and what happens to tokens that leave it."""

    policy: Literal["sink_window", "offload"] = Field(
        "offload",
        description="sink_window: keep the stream prefix (attention sinks) + the most recent blocks, drop older "
        "ones. offload: the same, but evicted blocks go to CPU storage and the blocks most relevant to a question "
        "are retrieved for its answer (ReKV-style).",
    )
    budget_tokens: int = Field(
        8192, ge=64, description="Hard cap on the KV tokens one stream holds in attention memory at any moment."
    )
    sink_tokens: int = Field(
        256, ge=0, description="Longest stream prefix (chat template before the video) kept as attention sink."
    )
    reserve_tokens: int = Field(
        1536,
        ge=16,
        description="Part of the budget kept free for the working step: one appended chunk, or retrieved blocks + "
        "question + answer. A longer chunk is appended as several blocks; a question + max_new_tokens larger than "
        "this is refused.",
    )
    retrieve_tokens: int = Field(
        1024, ge=0, description="offload: most tokens of evicted blocks brought back for one question."
    )
    offload_bytes: int = Field(
        1 << 30, ge=0, description="offload: cap on one stream's offloaded CPU bytes (blocks + index); oldest "
        "blocks are dropped first.",
    )
    quant: Literal["none", "int8", "int4"] = Field(
        "int8", description="offload: storage of offloaded blocks (none = model dtype)."
    )
    window_quant: Literal["none", "int8"] = Field(
        "int8",
        description="Storage of the resident KV buffer (sinks, window, reserve) on the device. int8: one byte per "
        "key/value element plus a float16 scale and minimum per token and head (about half of bf16: 28,672 + 896 "
        "B per token at the Qwen2-7B shape instead of 57,344), quantized once when a token is written and "
        "dequantized inside attention; canonical sink keys are int8 too. none: the model's dtype (answers exactly "
        "those of a plain full cache under the budget).",
    )
    position_mode: Literal["compact", "original"] = Field(
        "compact",
        description="compact: the model sees sinks, retrieved blocks, window and question at consecutive positions "
        "(StreamingLLM-style; positions stay bounded). original: every token keeps the position it had in the "
        "stream (grows without bound).",
    )
    rebase_position: int = Field(
        1 << 16,
        ge=1024,
        description="compact: when the next rotary position would pass this, the window's keys are rotated back "
        "so positions stay small (float32 angle precision). Must be >= 2 * budget_tokens.",
    )
    retrieval_score: Literal["query_key", "key_key"] = Field(
        "query_key",
        description="offload: block relevance = question's mean query . block's mean key (attention proxy, "
        "ReKV) or question's mean key . block's mean key (content similarity).",
    )
    summary_layers: list[int] = Field(
        default_factory=list,
        description="offload: decoder layers whose keys form a block's retrieval vector (empty = all layers).",
    )

    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="The engine's batching policy (shared by all streams)."
    )

    @property
    def window_tokens(self) -> int:
        """Capacity of the recent-blocks window."""
        return self.budget_tokens - self.sink_tokens - self.reserve_tokens

    @model_validator(mode="after")
    def _check_layout(self) -> "KVConfig":
        if self.window_tokens < 1:
            raise ValueError(
                f"budget_tokens={self.budget_tokens} leaves no window after sink_tokens={self.sink_tokens} and "
                f"reserve_tokens={self.reserve_tokens}; raise budget_tokens above "
                f"{self.sink_tokens + self.reserve_tokens} or lower the other two"
            )
        if self.policy == "offload" and self.retrieve_tokens >= self.reserve_tokens:
            raise ValueError(
                f"retrieve_tokens={self.retrieve_tokens} must be < reserve_tokens={self.reserve_tokens} (the "
                "question and answer need room too); lower retrieve_tokens or raise reserve_tokens"
            )
        if self.rebase_position < 2 * self.budget_tokens:
            raise ValueError(
                f"rebase_position={self.rebase_position} must be >= 2 * budget_tokens={2 * self.budget_tokens}; "
                "raise it"
            )
        return self


class Sampling(StrictModel):
    """How one answer picks its tokens."""

    temperature: float = Field(0.0, ge=0.0, description="0 = greedy decoding; > 0 = sample at this temperature.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens (0 = all).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1.0 = all).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="RNG seed for reproducible sampling, 0..2**63-1 (None = nondeterministic).")
