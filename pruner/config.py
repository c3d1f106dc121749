"""``PrunerConfig``: which policy prunes a stream's visual tokens, and with what budget.

Budget rules (documented choices):

* ``tokens_per_frame`` and ``keep_ratio`` are exclusive; with neither, ``keep_ratio`` = :data:`DEFAULT_KEEP_RATIO`.
* ``tokens_per_frame`` larger than a frame's token count is **clamped** to that count (the frame is kept whole):
  one config serves families with 196 (LLaVA-OneVision) and 64 (SmolVLM) tokens per frame, so the real count is
  only known at :meth:`StreamPruner.select` time. ``keep_ratio`` is the portable way to say "a quarter".
* ``stc_adaptive`` spends a budget per chunk: ``chunk_budget`` tokens, or ``tokens_per_second`` x the chunk's
  duration, or (neither) the per-frame budget x the number of frames. The chunk budget is clamped to
  ``[frames x min_tokens_per_frame, frames x tokens]`` (a frame never drops below the minimum);
  ``StreamPruner.stats()`` reports both the requested and the spent budget.
"""
from __future__ import annotations

import math

from pydantic import Field, field_validator, model_validator

from stream.config_base import StrictModel
from stream.errors import ConfigError

DEFAULT_KEEP_RATIO = 0.25


class PrunerConfig(StrictModel):
    """Token pruning of the projected visual tokens, before they enter the LLM."""

    enabled: bool = Field(True, description="Prune at all. False keeps every token (same as policy keep_all).")
    policy: str = Field(
        "stc_context",
        description="Selection policy: stc_context (default: novel + context tokens), stc, stc_adaptive, uniform, "
        "random, temporal_diff, attention, keep_all (see pruner.available_policies()).",
    )
    tokens_per_frame: int | None = Field(
        None, ge=1, description="Tokens kept per frame (clamped to the frame's token count). Excludes keep_ratio."
    )
    keep_ratio: float | None = Field(
        None, gt=0.0, le=1.0,
        description=f"Fraction of each frame's tokens kept (rounded, at least 1). Default {DEFAULT_KEEP_RATIO} "
        "when tokens_per_frame is not set either.",
    )
    chunk_budget: int | None = Field(
        None, ge=1, description="stc_adaptive only: tokens kept per chunk in total, spread over its frames by change."
    )
    tokens_per_second: float | None = Field(
        None, gt=0.0, description="stc_adaptive only: tokens kept per second of video (needs frame pts)."
    )
    min_tokens_per_frame: int = Field(
        4, ge=1, description="stc_adaptive only: every frame keeps at least this many tokens (a static frame)."
    )
    memory_frames: int = Field(
        64, ge=1,
        description="Horizon of the bounded running memory mean (exact mean of the first N frames, then an "
        "exponential average with momentum 1 - 1/N). State stays one vector whatever the stream length.",
    )
    bandwidths: list[float] = Field(
        default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0], min_length=1,
        description="Bandwidths (alpha) of the multi-bandwidth Gaussian kernel exp(-|x-y|^2 / 2 alpha), summed.",
    )
    channel_keep: float = Field(
        0.5, gt=0.0, le=1.0, description="Fraction of channels (the lowest-variance ones per frame) used to score."
    )
    novel_share: float = Field(
        0.3, ge=0.0, le=1.0,
        description="stc_context only: share of each frame's budget kept for the most novel tokens (most changed since "
        "the previous frame, EVS-style); the rest are context tokens chosen so the kept set's mean stays "
        "at the frame's mean. 0.0 = context only.",
    )
    motion_radius: int = Field(
        1, ge=0, le=64,
        description="stc_context only: a token's novelty is its distance to the most similar token of the previous "
        "frame within this many grid cells (motion-compensated, so a panning camera's background is not novel "
        "while an object that appeared is); 0 = the same position only (EVS-style).",
    )
    novelty_smooth: int = Field(
        2, ge=0, le=64,
        description="stc_context only: average each token's novelty over its grid neighbourhood of this radius, so "
        "a changed region (an object) wins over scattered single-token changes (camera motion, noise); 0 = off.",
    )
    novelty_horizon: int = Field(
        1, ge=1, le=4096,
        description="stc_context only: novelty is measured against a per-position running mean of the last this "
        "many frames (1 = the previous frame), so an object that stays a few frames stays novel; state [T, d].",
    )
    seed: int = Field(0, ge=0, description="Seed of the random policy (selection depends on seed and frame index).")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        from pruner.policies import available_policies  # local: policies must not depend on config

        if name not in available_policies():
            raise ValueError(
                f"unknown pruning policy {name!r}; allowed: {', '.join(available_policies())}"
            )
        return name

    @field_validator("bandwidths")
    @classmethod
    def _positive_bandwidths(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not (v > 0 and math.isfinite(v))]
        if bad:
            raise ValueError(f"bandwidths must be finite and > 0, got {bad}; e.g. [0.125, 0.25, 0.5, 1, 2]")
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "PrunerConfig":
        if self.tokens_per_frame is not None and self.keep_ratio is not None:
            raise ValueError(
                f"tokens_per_frame={self.tokens_per_frame} and keep_ratio={self.keep_ratio} are both set; "
                "set only one of them"
            )
        from pruner.policies import get_policy

        adaptive = get_policy(self.policy).adaptive
        if not adaptive:
            for key in ("chunk_budget", "tokens_per_second"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key}={getattr(self, key)} only applies to adaptive policies (stc_adaptive), not "
                        f"{self.policy!r}; set policy: stc_adaptive or remove {key}"
                    )
        if self.chunk_budget is not None and self.tokens_per_second is not None:
            raise ValueError(
                f"chunk_budget={self.chunk_budget} and tokens_per_second={self.tokens_per_second} are both set; "
                "set only one of them"
            )
        if adaptive and self.tokens_per_frame is not None and self.tokens_per_frame < self.min_tokens_per_frame:
            raise ValueError(
                f"tokens_per_frame={self.tokens_per_frame} is below min_tokens_per_frame="
                f"{self.min_tokens_per_frame}; raise tokens_per_frame or lower min_tokens_per_frame"
            )
        return self

    @property
    def active(self) -> bool:
        """True when tokens are actually dropped (enabled and not keep_all)."""
        return self.enabled and self.policy != "keep_all"

    def frame_budget(self, tokens: int) -> int:
        """Tokens kept per frame of ``tokens`` tokens under the fixed budget (clamped to ``[1, tokens]``)."""
        if tokens < 1:
            raise ConfigError(f"a frame must have at least 1 token, got {tokens}")
        if self.tokens_per_frame is not None:
            return min(self.tokens_per_frame, tokens)
        ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
        return max(1, min(tokens, round(ratio * tokens)))
