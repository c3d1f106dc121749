"""``ModelConfig``: which checkpoint the service loads, and where."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from stream.config_base import StrictModel


class ModelConfig(StrictModel):
    """The VLM checkpoint and its placement."""

    name: str | None = Field(
        None,
        description="A folder made by `stc-serve make-tiny-model` or `save_pretrained`, a hub id (needs network or a "
        "filled HF cache), 'tiny-llava_onevision' / 'tiny-smolvlm', or null for the built-in tiny LLaVA-OneVision "
        "(random weights: answers are meaningless).",
    )
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$", description="Torch device: cpu, cuda, cuda:N.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and activations dtype (bfloat16 recommended on GPU)."
    )
    kv_memory_bytes: int = Field(
        4 << 30, ge=1 << 20,
        description="KV memory across all streams of one LLM replica (attention buffers + offloaded history). When "
        "full, the oldest offloaded history is dropped first, then new streams are refused with a clear error.",
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Default answer length limit in tokens.")
