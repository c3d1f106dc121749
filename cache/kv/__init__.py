"""LLM side of the service: one shared language model, a bounded KV session per live stream.

Public API: :class:`LLMEngine` (open / append / ask / close / stats / memory_bytes), :class:`KVConfig`,
:class:`Sampling`, :class:`SchedulerConfig` (the step loop's batching policy, ``kv.scheduler``), the stats records
and errors. All model work runs in one continuous-batching step loop (:mod:`cache.kv.scheduler`). Pure building
blocks live in :mod:`cache.kv.policies`, :mod:`cache.kv.quant` and :mod:`stream.models.rope`.
"""
from cache.kv.config import KVConfig, Sampling, SchedulerConfig
from cache.kv.engine import LLMEngine
from cache.kv.errors import KVCapacityError, StreamExistsError, UnknownStreamError
from cache.kv.stats import PromptUsage, RetrievedBlock, SessionStats

__all__ = [
    "KVCapacityError",
    "KVConfig",
    "LLMEngine",
    "PromptUsage",
    "RetrievedBlock",
    "Sampling",
    "SchedulerConfig",
    "SessionStats",
    "StreamExistsError",
    "UnknownStreamError",
]
