"""``ServiceConfig``: the one config of stc-serve, composed of each package's validated model, loadable from YAML.

```yaml
model:   {name: null, device: cpu, dtype: float32}      # stream.models.config.ModelConfig
source:  {open_timeout_s: 10, read_timeout_s: 10}        # stream.config.SourceConfig
sampler: {fps: 1.0, frames_per_chunk: 8}                  # stream.config.SamplerConfig
cacher:  {enabled: true, ratio: 0.25}                     # cache.config.CacherConfig
pruner:  {policy: stc, tokens_per_frame: 49}              # pruner.config.PrunerConfig
kv:      {policy: sink_window, budget_tokens: 8192}       # cache.kv.config.KVConfig
serve:   {http: {port: 8000}, llm: {num_gpus: 1}}         # serve.core.settings.ServeSettings
```
Unknown keys are rejected; every error names the key, the bad value, what is allowed and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from cache.config import CacherConfig
from cache.kv.config import KVConfig
from pruner.config import PrunerConfig
from serve.core.options import StreamOptions
from serve.core.settings import ServeSettings
from stream.config import SamplerConfig, SourceConfig
from stream.config_base import StrictModel
from stream.errors import ConfigError
from stream.models.config import ModelConfig


PROMPT_MARGIN_TOKENS = 64  # end-of-video and chat-template tokens around a question


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ServiceConfig(StrictModel):
    """Everything stc-serve needs; each section is one package's config."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Which VLM, on which device.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="Reading files and live streams.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Frame rate and chunk size.")
    cacher: CacherConfig = Field(default_factory=CacherConfig, description="STC ViT feature reuse.")
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="Visual token budgets.")
    kv: KVConfig = Field(default_factory=KVConfig, description="Per-stream bounded KV sessions.")
    serve: ServeSettings = Field(default_factory=ServeSettings, description="Ray Serve deployments and HTTP API.")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "ServiceConfig":
        """Read YAML at ``path`` (if any), apply nested ``overrides`` (e.g. from CLI flags), validate."""
        data: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {str(p)!r} does not exist. Fix: pass an existing YAML file.")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections "
                                  f"({', '.join(cls.model_fields)}), got {type(data).__name__}")
        return cls.parse(_deep_update(data, overrides or {}))

    @model_validator(mode="after")
    def _limits_agree(self) -> "ServiceConfig":
        """The HTTP limits must fit the KV reserve, so a question the API accepts is never refused by the LLM."""
        s = self.serve
        if s.max_question_chars + s.max_new_tokens + PROMPT_MARGIN_TOKENS > self.kv.reserve_tokens:
            raise ConfigError(
                f"serve.max_question_chars={s.max_question_chars} + serve.max_new_tokens={s.max_new_tokens} + "
                f"{PROMPT_MARGIN_TOKENS} prompt tokens exceed "
                f"kv.reserve_tokens={self.kv.reserve_tokens} (a question of up to max_question_chars characters "
                "must fit the reserve with its answer; counted as one token per character, which holds for ASCII text). "
                "Fix: lower them "
                "or raise kv.reserve_tokens."
            )
        return self

    def stream_options(self) -> StreamOptions:
        """The per-stream defaults (sampler, cacher, pruner, KV)."""
        return StreamOptions(sampler=self.sampler, cacher=self.cacher, pruner=self.pruner, kv=self.kv)

    def kv_replica_budget_bytes(self) -> int:
        """KV memory across all streams of one LLM replica."""
        return self.model.kv_memory_bytes
