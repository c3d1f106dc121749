"""(c)'s bytes per stream on paper at the 7B / SigLIP-so400m shape, from the formulas the service's accounting uses
(``cache.memory``, ``Policy.state_bytes``, ``cache.gate.gate_state_bytes``); shared by ``bench_bound.py`` and
``bench_designs.py``, held equal to the accounting by ``tests/test_device_bytes.py``."""
from __future__ import annotations

import torch

from benchmarks.bench_cacher import SO400M
from cache.config import CacherConfig, GateConfig
from cache.gate import gate_state_bytes
from cache.kv.config import KVConfig
from cache.memory import MemoryReport, reference_bytes, session_bytes, stream_bytes
from cache.stc import signature_dim
from pruner.config import PrunerConfig
from pruner.policies import get_policy

QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064)


def component_bytes_7b(kv: KVConfig, cacher: CacherConfig, refs_held: int, queued_tokens: int = 0,
                       shape: dict = QWEN2_7B, vit: dict = SO400M, elem: int = 2, pruner: PrunerConfig | None = None,
                       gate: GateConfig | None = None, frame: tuple[int, int] = (576, 768)) -> MemoryReport:
    """(c)'s bytes per stream by component, from the formulas the service's accounting uses (``cache.memory``;
    ``tests/test_device_bytes.py`` holds them equal to the tensors a session and a reference store hold): the KV
    session in its steady state (sinks and window full) in ``kv.window_quant``, ``refs_held`` references placed as
    ``cacher.reference_placement`` says (in the encoder's dtype, ``elem`` bytes), ``queued_tokens`` chunk tokens in
    flight, the pruner's state (``pruner``, default config; the projected tokens of one frame, ``[T, d]`` in
    ``elem`` bytes) and the frame gate's thumbnail (``gate``, default config) of ``frame`` = (height, width) video,
    both in host memory. Default shapes: Qwen2-7B + SigLIP-so400m in bf16."""
    pruner, gate = pruner or PrunerConfig(), gate or GateConfig()
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    session = session_bytes(shape["num_hidden_layers"], shape["num_key_value_heads"], head_dim, elem, kv.budget_tokens,
                            kv.sink_tokens, kv.window_tokens, kv.window_quant)
    d, tokens = vit["hidden_size"], (vit["image_size"] // vit["patch_size"]) ** 2
    ref_elem = elem if cacher.store_dtype == "auto" else torch.finfo(getattr(torch, cacher.store_dtype)).bits // 8
    ref = reference_bytes(vit["num_hidden_layers"], tokens, d, ref_elem, cacher.sketch_width(d),
                          signature_dim(tokens, d, cacher.signature_grid))
    llm_tokens = ((vit["image_size"] // vit["patch_size"] + 1) // 2) ** 2  # 2x2 pooling, LLaVA-OV: 27^2 -> 14^2
    policy = get_policy(pruner.policy if pruner.enabled else "keep_all")
    pruner_bytes = policy.state_bytes(llm_tokens, shape["hidden_size"], elem, pruner.novelty_horizon)
    gate_bytes = gate_state_bytes(*frame, gate.cells, gate.sub) if gate.enabled else 0
    return stream_bytes(session, refs_held, ref, cacher.reference_placement, queued_tokens, shape["hidden_size"], elem,
                        pruner_bytes=pruner_bytes, gate_bytes=gate_bytes)
