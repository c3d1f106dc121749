"""Model adapters: one class per VLM family exposing the seams the cacher, pruner and KV sessions hook into."""
from stream.models.base import LayerRunner, PreprocessSpec, VisualTokens, VLMAdapter, run_layers
from stream.models.llm import TextLM
from stream.models.loading import load_adapter, resolve_model
from stream.models.tiny import FAMILIES, ensure_tiny_model, make_tiny_model

__all__ = [
    "FAMILIES",
    "LayerRunner",
    "PreprocessSpec",
    "TextLM",
    "VLMAdapter",
    "VisualTokens",
    "ensure_tiny_model",
    "load_adapter",
    "make_tiny_model",
    "resolve_model",
    "run_layers",
]
