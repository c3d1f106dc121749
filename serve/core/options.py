"""``StreamOptions``: every per-stream knob in one validated model (sampler, cacher, pruner, KV session).

The service config holds the defaults; a create-stream request may override them for one stream.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from cache.config import AUTO_CELL_REFRESH, CacherConfig
from cache.kv.config import KVConfig
from pruner.config import PrunerConfig
from stream.config import SamplerConfig
from stream.config_base import StrictModel


class StreamOptions(StrictModel):
    """Per-stream settings."""

    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Frame rate and chunk size.")
    cacher: CacherConfig = Field(default_factory=CacherConfig, description="STC ViT feature reuse.")
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="Visual token budget before the LLM.")
    kv: KVConfig = Field(default_factory=KVConfig, description="Bounded KV session of the stream.")

    @model_validator(mode="after")
    def _attention_needs_plain_encoder(self) -> "StreamOptions":
        if self.pruner.enabled and self.pruner.policy == "attention" and self.cacher.enabled:
            raise ValueError(
                "pruner.policy='attention' reads the last ViT layer's full attention, which the STC cacher does not "
                "compute (it recomputes only changed tokens). Fix: set cacher.enabled=false (CLI --no-cache) or "
                "choose another pruning policy (stc, stc_adaptive, uniform, random, temporal_diff)."
            )
        return self

    def merged(self, overrides: dict[str, Any] | None) -> "StreamOptions":
        """A copy with nested ``overrides`` applied and validated (raises ConfigError naming the bad value)."""
        if not overrides:
            return self
        data = self.model_dump()
        for section, values in overrides.items():
            if isinstance(values, dict) and isinstance(data.get(section), dict):
                data[section].update(values)
            else:
                data[section] = values
        return StreamOptions.parse(data, "stream")

    def make_cacher(self, cell_refresh: float | None = AUTO_CELL_REFRESH) -> Any | None:
        """A fresh per-stream STC cacher, or ``None`` when caching is off (``cell_refresh``: the model adapter's
        ``refresh_cell_below`` for 'auto')."""
        if not self.cacher.enabled:
            return None
        from cache.cacher import StreamCacher

        return StreamCacher(self.cacher.resolved(cell_refresh))

    def make_gate(self) -> Any | None:
        """A fresh per-stream frame gate, or ``None`` when the gate or the whole cacher is off."""
        if not (self.cacher.enabled and self.cacher.gate.enabled):
            return None
        from cache.gate import FrameGate

        return FrameGate(self.cacher.gate)

    def make_pruner(self) -> Any | None:
        """A fresh per-stream pruner, or ``None`` when pruning is off."""
        if not self.pruner.enabled:
            return None
        from pruner.stream import StreamPruner

        return StreamPruner(self.pruner)

    def make_engine(self, llm: Any, memory_budget_bytes: int) -> Any:
        """The replica's shared LLM engine holding every stream's KV session."""
        from cache.kv.engine import LLMEngine

        return LLMEngine(llm, self.kv, memory_budget_bytes)
