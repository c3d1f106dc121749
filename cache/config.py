"""Validated settings of the cache package."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from stream.config_base import StrictModel

AUTO_CELL_REFRESH = 0.8  # refresh_cell_below='auto' without an adapter's own value
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GateConfig(StrictModel):
    """Frame gate before the ViT (``cache/gate.py``): a frame whose thumbnail barely differs from the last frame the
    ViT encoded is skipped (no ViT, no tokens); lighting changes are fitted out first."""

    enabled: bool = Field(
        True,
        description="Gate frames before the ViT; a skipped frame is dropped as redundant (no visual tokens). "
        "false: every frame is encoded (exactly as without a gate). Needs cacher.enabled.",
    )
    threshold: float = Field(
        8.0,
        gt=0.0,
        le=255.0,
        description="A frame passes when some window x window block of thumbnail cells differs from the last "
        "passing frame by more than this mean absolute difference (0-255 scale), after its lighting is fitted. "
        "Lower passes smaller or fainter changes (and more noise).",
    )
    cells: int = Field(
        64,
        ge=8,
        le=512,
        description="Thumbnail cells along the frame's longer side (64: 12-px cells on 768x576, about half a "
        "SigLIP patch); more cells see smaller objects and more noise.",
    )
    sub: int = Field(
        4,
        ge=1,
        le=16,
        description="Blocks per cell side the lighting fit is applied at (clipped per block), so a brightening "
        "that saturates a lamp is predicted, not taken for a change; 1: per cell.",
    )
    window: int = Field(
        2, ge=1, le=16, description="Side, in cells, of the block whose mean change is compared with threshold."
    )
    trim: float = Field(
        0.2,
        ge=0.0,
        le=0.5,
        description="Share of cells left out of the lighting fit's second pass (the worst-fitting ones), so a "
        "local change does not bend the fitted gain.",
    )
    max_skip_s: float | None = Field(
        60.0,
        gt=0.0,
        description="Let one frame pass after this many seconds of skipping, whatever its score (the LLM sees a "
        "still scene at least this often); null: only a change passes.",
    )

    @model_validator(mode="after")
    def _check(self) -> "GateConfig":
        if self.window > self.cells:
            raise ValueError(
                f"window={self.window} cells is larger than the thumbnail ({self.cells} cells along the longer "
                f"side); use window <= cells, e.g. window=2"
            )
        return self


class CacherConfig(StrictModel):
    """STC-Cacher: reuse ViT features of similar frames (per stream), with a multi-reference store."""

    enabled: bool = Field(True, description="Reuse ViT features across frames; false encodes every frame fully.")
    ratio: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="Fraction of tokens recomputed per layer in a reused frame (the least similar keys); 1.0 is "
        "exact (every token recomputed), STC uses 0.25.",
    )
    threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Also recompute every token whose key cosine to the reference is below this (0.9-0.99 "
        "typical); null: the ratio alone decides.",
    )
    match_threshold: float = Field(
        0.9,
        ge=-1.0,
        le=1.0,
        description="Signature cosine a frame needs to reuse a stored reference; below it the frame is a new "
        "scene, encoded fully and stored.",
    )
    refresh_below: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Re-encode a matched reference fully (refresh) when the frame's signature cosine to it is "
        "below this (>= match_threshold), so drift cannot accumulate; null: no similarity-based refresh.",
    )
    refresh_cell_below: float | Literal["auto"] | None = Field(
        "auto",
        description="Per-region drift: re-encode a matched reference fully when any cell of the frame's signature "
        "grid (signature_grid x signature_grid regions) has cosine to the reference's cell below this, so a local "
        "change (something appeared) that barely moves the whole-frame signature is not served stale; null: off. "
        "'auto' (default): the model adapter's value, 0.8 for towers whose patch embeddings carry an absolute "
        "position embedding (SigLIP, Idefics3, Qwen3-VL), off for Qwen2.5-VL, whose content-only region signatures "
        "swing with any local motion and would refresh every frame.",
    )
    rolling: bool = Field(
        True,
        description="Rolling reference: a reused frame writes the tokens it recomputed (keys, values, residual "
        "update per layer) back into its reference, so the next frame is compared with, and reuses, the freshest "
        "features of every position (drift cannot build up against a stale key frame); the reference keeps the "
        "signature of the frame it was fully encoded from, so refresh_below / refresh_cell_below still measure "
        "drift since then. false: the reference stays that frame (STC). Reused frames then run one after another.",
    )
    key_sketch: int | None = Field(
        128,
        ge=2,
        le=4096,
        description="Find changed tokens by a random r-wide sketch of their keys (cache/sketch.py) instead of every "
        "token's full key: a reused frame then computes keys of the picked tokens only (the others attend with the "
        "reference's key, as with its value): ~20 % less work per reused SigLIP-so400m layer at ratio 0.15. "
        "Used when r is at most half the encoder width (a wider sketch saves nothing); null: exact keys of every "
        "token (STC).",
    )
    max_reuse: int | None = Field(
        None,
        ge=1,
        description="Refresh a reference after this many frames reused it; 1 re-encodes every 2nd frame (STC's "
        "schedule); null: never refresh by count.",
    )
    max_refs: int = Field(8, ge=1, le=4096, description="References kept per stream (least recently used evicted).")
    signature_grid: int = Field(
        4, ge=1, le=64, description="Cells per side of the pooled patch-embedding signature used to find references."
    )
    gate: GateConfig = Field(
        default_factory=GateConfig,
        description="Frame gate before the ViT: near-identical frames skip it entirely (cache/gate.py).",
    )
    reference_placement: Literal["device", "host"] = Field(
        "host",
        description="Where a stream's stored references live. host: in CPU memory (page-locked when CUDA is "
        "present); the references a chunk reuses are copied to the encoder's device for that chunk (a transient of "
        "the replica, not of the stream) and, with rolling, written back after it. device: on the encoder's device "
        "(no copies; up to max_refs x ~141 MB per stream at SigLIP-so400m in bf16). The features are identical "
        "either way.",
    )
    store_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="Dtype of stored reference tensors; 'auto' keeps the encoder's dtype, float16/bfloat16 halve "
        "memory for float32 encoders.",
    )

    @model_validator(mode="after")
    def _check(self) -> "CacherConfig":
        cell = self.refresh_cell_below
        if isinstance(cell, float) and not -1.0 <= cell <= 1.0:
            raise ValueError(f"refresh_cell_below={cell} is not a cosine; use a value in [-1, 1], 'auto' or null")
        if self.ratio == 0.0 and self.threshold is None:
            raise ValueError(
                "ratio=0 with no threshold would recompute no token at all; set ratio > 0 (e.g. 0.25) or a "
                "threshold (e.g. 0.95), or set enabled=false to turn the cache off"
            )
        if self.refresh_below is not None and self.refresh_below < self.match_threshold:
            raise ValueError(
                f"refresh_below={self.refresh_below} is below match_threshold={self.match_threshold}, so it could "
                "never trigger; use a value >= match_threshold or null"
            )
        return self

    def resolved(self, cell_refresh: float | None = AUTO_CELL_REFRESH) -> "CacherConfig":
        """A copy with ``refresh_cell_below='auto'`` replaced by ``cell_refresh`` (the model adapter's value)."""
        if self.refresh_cell_below != "auto":
            return self
        return self.model_copy(update={"refresh_cell_below": cell_refresh})

    def sketch_width(self, dim: int) -> int | None:
        """The key sketch width for an encoder of width ``dim``, or ``None`` (exact keys)."""
        return self.key_sketch if self.key_sketch is not None and 2 * self.key_sketch <= dim else None

    def torch_store_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype references are stored in, for an encoder running in ``compute``."""
        return compute if self.store_dtype == "auto" else _DTYPES[self.store_dtype]
