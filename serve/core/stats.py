"""Typed stats messages: what the stages, ingest hosts and replicas report across process boundaries and over HTTP.

No ``dict[str, Any]`` crosses a process: the vision stage reports :class:`ChunkStats` per chunk and
:class:`VisionStats` per stream, the LLM stage :class:`AppendStats` per chunk and :class:`KVStats` per stream, a
replica :class:`ReplicaInfo`, an ingest host :class:`HostMemory`. The plain packages below (``cache``, ``pruner``)
keep their own counters; these models are built from them at the stage boundary (``from_counters``), and unknown
keys are rejected, so a renamed counter fails a test instead of vanishing from the API. Pydantic only (no torch):
the HTTP ingress imports this module.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Stats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_counters(cls, counters: Any) -> "_Stats":
        """Validate a plain package's counters (a dict or a dataclass) into this model."""
        return cls.model_validate(counters, from_attributes=not isinstance(counters, dict))


class CacheCounters(_Stats):
    """STC cacher counters, of one chunk or a whole stream (``cache.cacher.CacheStats``)."""

    chunks: int = 0
    frames: int = 0
    frames_full: int = Field(0, description="Frames encoded fully (new scenes and refreshes).")
    frames_reused: int = Field(0, description="Frames encoded by selective recompute against a reference.")
    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    evictions: int = 0
    grid_changes: int = 0
    tokens_recomputed: list[int] = Field(default_factory=list, description="Per ViT layer, over reused frames.")
    tokens_reusable: list[int] = Field(default_factory=list, description="Per ViT layer, tokens of reused frames.")
    refs_held: int = 0
    store_bytes: int = 0
    reference_device_bytes: int = Field(0, description="Reference tensors on the encoder's device "
                                        "(cacher.reference_placement: device).")
    reference_host_bytes: int = Field(0, description="Reference tensors in host memory (reference_placement: host) "
                                      "+ the signatures and ids of the store's index (always on the host).")
    reuse_rate: float = Field(0.0, description="frames_reused / frames.")
    recompute_fraction: float = Field(0.0, description="Recomputed / reusable tokens over all layers.")


class PrunedChunk(_Stats):
    """One recent chunk of the pruner."""

    frames: int
    tokens_in: int
    tokens_kept: int
    kept_per_frame: list[int]
    budget_requested: int | None = None


class PrunerCounters(_Stats):
    """Pruner counters of a stream (``pruner.stream.StreamPruner.stats``)."""

    policy: str
    frames: int = 0
    chunks: int = 0
    tokens_in: int = 0
    tokens_kept: int = 0
    kept_ratio: float = 1.0
    grid_changes: int = 0
    recent_chunks: list[PrunedChunk] = Field(default_factory=list, description="The last few chunks (bounded).")
    state_bytes: int = Field(0, description="Host bytes of the pruner's per-stream tensors (constant in stream "
                             "length).")


class GateCounters(_Stats):
    """Frame-gate counters of a stream (``cache.gate.FrameGate.stats``)."""

    frames: int = 0
    passed: int = Field(0, description="Frames the ViT encoded.")
    skipped: int = Field(0, description="Frames dropped as redundant: no ViT, no tokens.")
    forced: int = Field(0, description="Frames that passed only because max_skip_s ran out.")
    last_score: float = Field(0.0, description="The last frame's largest window change (0-255).")
    skip_rate: float = Field(0.0, description="skipped / frames.")
    state_bytes: int = Field(0, description="Bytes of the gate's thumbnail of the last passing frame (host).")


class ChunkStats(_Stats):
    """The vision stage's numbers for one encoded chunk."""

    vit_ms: float = 0.0
    prune_ms: float = 0.0
    tokens_in: int = 0
    tokens_kept: int = 0
    cache: CacheCounters | None = Field(None, description="The cacher's counters of this chunk (None: cache off).")
    frames_skipped: int = Field(0, description="Frames of this chunk the frame gate dropped as redundant.")


class AppendStats(_Stats):
    """The LLM stage's numbers for one appended chunk."""

    prefill_ms: float = 0.0
    llm_tokens: int = Field(0, description="Tokens the chunk added to the stream's context.")


class ChunkResult(_Stats):
    """Both stages' numbers for one chunk (what a stream's flow returns per chunk)."""

    vision: ChunkStats
    llm: AppendStats


class VisionStats(_Stats):
    """The vision stage's counters for one stream."""

    frames: int = 0
    tokens_in: int = 0
    tokens_kept: int = 0
    vit_ms: float = 0.0
    prune_ms: float = 0.0
    cache: CacheCounters | None = None
    pruner: PrunerCounters | None = None
    gate: GateCounters | None = Field(None, description="The frame gate's counters (None: gate off).")
    replica: str | None = Field(None, description="The replica holding the stream (Ray service).")


class MemoryBytes(_Stats):
    """Bytes one stream (or a replica) holds, by component (``cache.memory.MemoryReport``): measured on the tensors
    held, not estimated. Device: the KV buffer's slots by what they hold now, references on the device, chunks
    queued for prefill. Host: offloaded KV blocks, references kept in host memory, the pruner's state, the frame
    gate's thumbnail."""

    kv_window: int = Field(0, description="KV slots holding window tokens.")
    kv_sinks: int = Field(0, description="KV slots holding the attention sinks + their canonical keys.")
    kv_reserve: int = Field(0, description="KV slots preallocated and empty now.")
    kv_retrieved: int = Field(0, description="KV slots holding retrieved blocks, a question and its answer, or a "
                              "chunk being prefilled, now.")
    references: int = Field(0, description="The STC cacher's references on the device.")
    queued_chunks: int = Field(0, description="Chunk embeddings waiting for prefill.")
    host_offloaded: int = Field(0, description="Offloaded KV blocks and their index (host).")
    host_references: int = Field(0, description="References and their index in host memory.")
    host_pruner: int = Field(0, description="The pruner's per-stream tensors: memory, previous frame, background "
                             "(host).")
    host_gate: int = Field(0, description="The frame gate's thumbnail of the last passing frame (host).")
    kv_bytes: int = 0
    device_bytes: int = 0
    host_bytes: int = 0


def stream_memory(vision: "VisionStats | None", llm: "KVStats | None") -> MemoryBytes:
    """One stream's bytes by component across its stages: the LLM stage's KV session and queued chunks, the vision
    stage's references (device or host, as ``cacher.reference_placement`` put them), pruner state and frame gate
    thumbnail (host)."""
    kv = llm.memory if llm is not None else MemoryBytes()
    cache = vision.cache if vision is not None else None
    refs, host_refs = (cache.reference_device_bytes, cache.reference_host_bytes) if cache is not None else (0, 0)
    pruner = vision.pruner.state_bytes if vision is not None and vision.pruner is not None else 0
    gate = vision.gate.state_bytes if vision is not None and vision.gate is not None else 0
    parts = {**kv.model_dump(exclude={"kv_bytes", "device_bytes", "host_bytes"}), "references": kv.references + refs,
             "host_references": kv.host_references + host_refs, "host_pruner": kv.host_pruner + pruner,
             "host_gate": kv.host_gate + gate}
    return MemoryBytes(**parts, kv_bytes=kv.kv_bytes, device_bytes=kv.device_bytes + refs,
                       host_bytes=kv.host_bytes + host_refs + pruner + gate)


class RetrievedBlockInfo(_Stats):
    """An offloaded KV block brought back for the last question."""

    block_id: int
    score: float
    tokens: int
    meta: dict[str, float | int | str | list[float] | list[int]] = Field(default_factory=dict)


class KVStats(_Stats):
    """The LLM stage's counters for one stream: its bounded KV session (``cache.kv.stats.SessionStats``)."""

    stream_id: str
    policy: str
    stream_tokens: int
    blocks: int
    resident_tokens: int
    peak_resident_tokens: int
    budget_tokens: int
    sink_tokens: int
    window_blocks: int
    window_used_tokens: int
    evicted_blocks: int
    offloaded_blocks: int
    offloaded_tokens: int
    offloaded_bytes: int
    dropped_blocks: int
    reserved_bytes: int
    resident_used_bytes: int
    next_position: int
    position_offset: int
    rebases: int
    last_retrieval: list[RetrievedBlockInfo] = Field(default_factory=list)
    held_bytes: int = Field(..., description="Reservation + offloaded storage.")
    used_bytes: int = Field(..., description="Resident tokens + offloaded storage.")
    kv_tokens: int = Field(..., description="Tokens resident now (= resident_tokens).")
    kv_bytes: int = Field(..., description="Bytes the stream's tokens fill now (= used_bytes).")
    memory: MemoryBytes = Field(default_factory=MemoryBytes, description="Device and host bytes by component.")
    replica: str | None = Field(None, description="The replica holding the stream (Ray service).")

    @classmethod
    def of(cls, session: Any) -> "KVStats":
        """From a :class:`cache.kv.stats.SessionStats`."""
        skip = ("held_bytes", "used_bytes", "kv_tokens", "kv_bytes", "last_retrieval", "replica", "memory")
        fields = {name: getattr(session, name) for name in cls.model_fields if name not in skip}
        return cls(**fields, held_bytes=session.held_bytes, used_bytes=session.used_bytes,
                   kv_tokens=session.resident_tokens, kv_bytes=session.used_bytes,
                   memory=MemoryBytes.model_validate(session.memory.to_dict()),
                   last_retrieval=[RetrievedBlockInfo.from_counters(b) for b in session.last_retrieval])


class ReplicaInfo(_Stats):
    """A vision or LLM replica: liveness, size and placement (``ping`` / ``where``)."""

    replica: str
    streams: int
    parameter_bytes: int
    stream_ids: list[str] = Field(default_factory=list)
    node_id: str | None = None
    pid: int | None = None
    gpu_ids: list[int | str] = Field(default_factory=list)
    reaped: int = 0


class HostMemory(_Stats):
    """An ingest host's memory: resident size, glibc heap, pixels its streams hold, the cyclic garbage collector."""

    streams: int
    pid: int
    frames_mb: float = Field(..., description="Pixels in the streams' bounded chunk queues and in flight.")
    rss_mb: float
    heap_mb: float | None = Field(None, description="glibc arena size (None without mallinfo2).")
    heap_used_mb: float | None = None
    heap_free_mb: float | None = None
    mmapped_mb: float | None = None
    gc_full_collections: int = Field(0, description="Full (oldest-generation) collections since start.")
    gc_frozen: int = Field(0, description="Objects frozen out of the collector at start-up.")
