"""Bytes a stream holds, by construction: one report type and the formulas behind it.

Two uses, one set of formulas:

* **Measured** (:func:`tensor_bytes`): the stats of a KV session (:meth:`cache.kv.session.KVSession.memory`) and of a
  cacher (:meth:`cache.cacher.StreamCacher.memory`) sum the storages of the tensors they really hold, split into the
  components below.
* **On paper** (:func:`kv_slot_bytes`, :func:`sink_key_bytes`, :func:`session_bytes`, :func:`stream_bytes`): the same
  components from shapes and config, used by the replica budget (what a stream reserves at open) and by the
  benchmarks (``device_mb_per_stream_7b``). Tests hold the two equal on real sessions and stores.

Components (see :class:`MemoryReport`): the KV buffer of a session is ``budget_tokens`` preallocated slots, each holding
keys + values of every layer; a slot holds a sink, a window token, a scratch token (retrieved block, question, answer,
a chunk being prefilled) or nothing (reserve). Canonical sink keys (un-rotated copies) count with the sinks.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Iterable

import torch

# bytes of one token's quantization statistics per head: float16 scale + float16 minimum (cache/kv/quant.py)
_INT8_STATS = 4
WINDOW_QUANTS = ("none", "int8")


@dataclass(frozen=True)
class MemoryReport:
    """Bytes one stream holds (or a replica: the sum of its streams' reports, ``a + b``), by component.

    Device (the accelerator the stage runs on; on a CPU-only machine the "device" is the CPU, and the split follows the
    configured placement):

    * ``kv_window``: KV slots holding window tokens (recent blocks).
    * ``kv_sinks``: KV slots holding the stream prefix (attention sinks) + their canonical (un-rotated) keys.
    * ``kv_reserve``: KV slots preallocated but empty now (free reserve and free window room).
    * ``kv_retrieved``: KV slots in use beyond the window now: retrieved blocks, a question and its answer, or a
      chunk being prefilled (0 between requests).
    * ``references``: the STC cacher's reference store, when ``cacher.reference_placement: device``.
    * ``queued_chunks``: chunk embeddings handed to the LLM engine and not prefilled yet.

    Host (CPU memory): ``host_offloaded`` (offloaded KV blocks + their FAISS index), ``host_references`` (the
    reference store's tensors when ``reference_placement: host``, plus its signatures and ids, which are always on
    the host), ``host_pruner`` (the pruner's running memory, previous frame and background, as its policy needs
    them; read once per chunk) and ``host_gate`` (the frame gate's thumbnail of the last frame it passed).
    """

    kv_window: int = 0
    kv_sinks: int = 0
    kv_reserve: int = 0
    kv_retrieved: int = 0
    references: int = 0
    queued_chunks: int = 0
    host_offloaded: int = 0
    host_references: int = 0
    host_pruner: int = 0
    host_gate: int = 0

    @property
    def kv_bytes(self) -> int:
        """Device bytes of the KV session (its preallocated buffer + canonical sink keys)."""
        return self.kv_window + self.kv_sinks + self.kv_reserve + self.kv_retrieved

    @property
    def device_bytes(self) -> int:
        """Every device component."""
        return self.kv_bytes + self.references + self.queued_chunks

    @property
    def host_bytes(self) -> int:
        """Every host component."""
        return self.host_offloaded + self.host_references + self.host_pruner + self.host_gate

    def __add__(self, other: "MemoryReport") -> "MemoryReport":
        return MemoryReport(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, int]:
        """Components plus ``kv_bytes``, ``device_bytes`` and ``host_bytes``."""
        return {**asdict(self), "kv_bytes": self.kv_bytes, "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes}


def total(reports: Iterable[MemoryReport]) -> MemoryReport:
    """The sum of ``reports`` (a replica's streams)."""
    out = MemoryReport()
    for r in reports:
        out = out + r
    return out


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once, whole)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def check_window_quant(quant: str) -> None:
    """Raise ``ValueError`` naming ``quant`` unless it is a window storage this code knows."""
    if quant not in WINDOW_QUANTS:
        raise ValueError(f"window quant {quant!r} is not one of {WINDOW_QUANTS}; use 'none' or 'int8'")


def kv_slot_bytes(num_layers: int, kv_heads: int, head_dim: int, element_size: int, quant: str = "none") -> int:
    """Bytes of one token slot of a session's KV buffer: keys + values of every layer.

    ``none``: ``2 * layers * kv_heads * head_dim * element_size``; ``int8``: one byte per code plus a float16 scale
    and a float16 minimum per token and head, ``2 * layers * kv_heads * (head_dim + 4)``.
    """
    check_window_quant(quant)
    per_head = head_dim * element_size if quant == "none" else head_dim + _INT8_STATS
    return 2 * num_layers * kv_heads * per_head


def sink_key_bytes(num_layers: int, kv_heads: int, head_dim: int, element_size: int, quant: str = "none") -> int:
    """Bytes of one canonical (un-rotated) sink key, every layer: half a slot (keys only)."""
    return kv_slot_bytes(num_layers, kv_heads, head_dim, element_size, quant) // 2


def session_bytes(num_layers: int, kv_heads: int, head_dim: int, element_size: int, budget_tokens: int,
                  sink_tokens: int, window_tokens: int, quant: str = "none", sinks_held: int | None = None,
                  window_held: int | None = None, scratch_held: int = 0) -> MemoryReport:
    """A KV session's device bytes by component (``*_held``: tokens in each part now; default: sinks and window
    full, scratch empty, i.e. a stream's steady state between questions). The sum is what the session reserves."""
    slot = kv_slot_bytes(num_layers, kv_heads, head_dim, element_size, quant)
    sink_key = sink_key_bytes(num_layers, kv_heads, head_dim, element_size, quant)
    sinks = sink_tokens if sinks_held is None else sinks_held
    window = window_tokens if window_held is None else window_held
    reserve = budget_tokens - sinks - window - scratch_held
    return MemoryReport(kv_window=window * slot, kv_sinks=sinks * slot + sink_tokens * sink_key,
                        kv_reserve=reserve * slot, kv_retrieved=scratch_held * slot)


def reference_bytes(num_layers: int, tokens: int, dim: int, element_size: int, sketch_dim: int | None,
                    signature_dim: int) -> tuple[int, int]:
    """One stored ViT reference: ``(tensor bytes, host-side index bytes)``; the tensors are keys, values and residual
    update per layer (``3 * dim``) plus key sketches, the index keeps the float32 signature twice and an int64 id."""
    tensors = (3 * dim + (sketch_dim or 0)) * num_layers * tokens * element_size
    return tensors, 2 * signature_dim * 4 + 8


def stream_bytes(session: MemoryReport, refs_held: int, reference: tuple[int, int], placement: str,
                 queued_tokens: int = 0, hidden_size: int = 0, element_size: int = 0,
                 offloaded_bytes: int = 0, pruner_bytes: int = 0, gate_bytes: int = 0) -> MemoryReport:
    """One stream on paper: its KV ``session`` (:func:`session_bytes`), ``refs_held`` references of
    :func:`reference_bytes` placed on ``"device"`` or ``"host"``, ``queued_tokens`` chunk tokens waiting for prefill
    (embeddings ``[tokens, hidden_size]``), ``offloaded_bytes`` of host KV history, the pruner's state
    (``pruner.policies.Policy.state_bytes``) and the frame gate's thumbnail (``cache.gate.gate_state_bytes``)."""
    if placement not in ("device", "host"):
        raise ValueError(f"reference placement {placement!r} is not 'device' or 'host'")
    tensors, index = reference
    on_device = refs_held * tensors if placement == "device" else 0
    on_host = refs_held * (index + (tensors if placement == "host" else 0))
    return session + MemoryReport(references=on_device, queued_chunks=queued_tokens * hidden_size * element_size,
                                  host_offloaded=offloaded_bytes, host_references=on_host, host_pruner=pruner_bytes,
                                  host_gate=gate_bytes)
