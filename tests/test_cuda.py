"""The CUDA paths, on a GPU: every test here is marked ``cuda`` and skips cleanly when torch sees no CUDA device.

Run with ``python -m pytest -q -m cuda tests/test_cuda.py`` (``benchmarks/gpu_check.sh`` does). Tiny random-weight
models of the real architectures, as in the CPU tests; the oracles are the same ones, moved to the GPU:

* the adapter's step-by-step path vs the HF model's own ``forward``: in float32 on the GPU within 1e-3; in bfloat16
  no further from the float32 ``forward`` than HF's own bfloat16 ``forward`` is (2x its error, plus 1e-2);
* cacher ``ratio=1.0`` vs the plain tower (float32 within 1e-4; bfloat16 by the same 2x rule);
* KV sessions under budget, and after eviction with all history retrieved, vs a plain full cache (same tokens, fp32);
* a chunk encoded on the GPU, pickled as Ray ships it, appended by an LLM stage in a process without a GPU (a node
  without one, simulated with ``CUDA_VISIBLE_DEVICES=""``), and on a second GPU when there is one;
* the reference store and the KV buffers live on the GPU, and the bytes they report are the bytes allocated.
"""
from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from serve.core.messages import text_of
from cache.cacher import StreamCacher
from cache.config import CacherConfig
from cache.kv import KVConfig, LLMEngine
from stream.models import load_adapter
from stream.models.llm import TextLM
from tests.test_adapter import _frames, _ours, _reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False); run on a GPU machine, e.g. "
                              "bash benchmarks/gpu_check.sh"),
]
DEVICE = "cuda"
REPO = Path(__file__).resolve().parents[1]


def _family_dir(request: pytest.FixtureRequest, family: str) -> Path:
    return request.getfixturevalue("tiny_llava_dir" if family == "llava_onevision" else "tiny_smolvlm_dir")


@pytest.fixture(scope="module", params=["llava_onevision", "smolvlm"])
def gpu_pair(request: pytest.FixtureRequest):
    """The family's tiny model on the GPU twice: (float32 adapter, bfloat16 adapter)."""
    path = _family_dir(request, request.param)
    return load_adapter(path, DEVICE, "float32"), load_adapter(path, DEVICE, "bfloat16")


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_step_path_equals_hf_forward_on_gpu(gpu_pair) -> None:
    fp32, bf16 = gpu_pair
    assert fp32.device.type == DEVICE and bf16.llm.dtype == torch.bfloat16
    rgb, pts = _frames(3), [0.0, 1.0, 2.0]
    ref = _reference(fp32, rgb, pts)  # [Lq, vocab] float32 HF forward: the oracle
    torch.testing.assert_close(_ours(fp32, rgb, pts).float(), ref, atol=1e-3, rtol=1e-3)
    ours_bf16, hf_bf16 = _ours(bf16, rgb, pts), _reference(bf16, rgb, pts)
    assert _max_err(ours_bf16, ref) <= 2 * _max_err(hf_bf16, ref) + 1e-2
    other = _ours(fp32, _frames(3, seed=1), pts)  # not trivially equal: other frames, other logits
    assert _max_err(other, ref) > 1e-3


def test_cacher_ratio_one_equals_the_tower_on_gpu(gpu_pair) -> None:
    fp32, bf16 = gpu_pair
    rgb = _frames(6)
    plain = fp32.encode_vision(fp32.preprocess(rgb))  # [F, P, D] float32
    for adapter, check in ((fp32, "fp32"), (bf16, "bf16")):
        pv = adapter.preprocess(rgb)
        cacher = StreamCacher(CacherConfig(ratio=1.0, max_reuse=2, match_threshold=-1.0, refresh_cell_below=None))
        cached = torch.cat([adapter.encode_vision(pv[s:s + n], layer_runner=cacher.runner)
                            for s, n in ((0, 2), (2, 3), (5, 1))])
        assert cached.device.type == DEVICE and cacher.stats()["frames_reused"] >= 3
        if check == "fp32":
            torch.testing.assert_close(cached, plain, atol=1e-4, rtol=1e-4)
        else:
            hf_err = _max_err(adapter.encode_vision(pv), plain)
            assert _max_err(cached, plain) <= 2 * hf_err + 1e-2


# ---- KV sessions ----------------------------------------------------------------------------------------------------
def _gpu_lm(seed: int = 0) -> TextLM:
    from tests.kv_support import tiny_lm

    llm = tiny_lm("qwen2", seed)
    return TextLM.from_causal_lm(_CausalLM(llm).to(DEVICE))


class _CausalLM(torch.nn.Module):
    """Re-wraps a TextLM's decoder + head so ``.to(device)`` moves both (``TextLM.from_causal_lm`` reads them)."""

    def __init__(self, llm: TextLM) -> None:
        super().__init__()
        self.model, self.lm_head = llm.decoder, llm.lm_head


@torch.inference_mode()
def _full_cache_tokens(llm: TextLM, pieces: list[torch.Tensor], question: torch.Tensor, n: int) -> list[int]:
    """Plain ``DynamicCache`` greedy decoding on the LLM's device (the oracle)."""
    cache, pos, dev = DynamicCache(), 0, llm.device
    for piece in [*pieces, question]:
        logits = llm.forward(piece[None].to(dev), cache=cache, position_ids=torch.arange(pos, pos + len(piece),
                                                                                            device=dev)[None])
        pos += len(piece)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = llm.forward(llm.embed(torch.tensor([out[-1]]))[None], cache=cache,
                             position_ids=torch.tensor([[pos]], device=dev))
        pos += 1
    return out


def _pieces(hidden: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    prefix, question = torch.randn(20, hidden, generator=gen), torch.randn(16, hidden, generator=gen)
    return prefix, [torch.randn(8, hidden, generator=gen) for _ in range(3)], question


@pytest.mark.parametrize("name,cfg", [
    ("under_budget", dict(policy="offload", budget_tokens=256, sink_tokens=32, reserve_tokens=64, retrieve_tokens=32,
                          quant="int8")),
    ("sink_window_under_budget", dict(policy="sink_window", budget_tokens=256, sink_tokens=32, reserve_tokens=64)),
    ("evicted_all_retrieved", dict(policy="offload", budget_tokens=32 + 16 + 64, sink_tokens=32, reserve_tokens=64,
                                   retrieve_tokens=32, quant="none", rebase_position=1024)),
])
def test_kv_session_equals_full_cache_on_gpu(name: str, cfg: dict) -> None:
    llm = _gpu_lm()
    prefix, frames, question = _pieces(llm.hidden_size)
    expected = _full_cache_tokens(llm, [prefix, *frames], question, 6)
    engine = LLMEngine(llm, KVConfig(**{"window_quant": "none", **cfg}), 1 << 30)  # exact: the float window
    engine.open("cam", prefix)
    for i, frame in enumerate(frames):
        engine.append("cam", frame, {"frame": i})
    assert list(engine.ask("cam", question, 6)) == expected
    if name == "evicted_all_retrieved":
        assert engine.stats("cam").evicted_blocks > 0


@pytest.mark.parametrize("window_quant", ["none", "int8"])
def test_kv_buffers_live_on_gpu_with_their_bytes(window_quant: str) -> None:
    llm = _gpu_lm()
    cfg = KVConfig(policy="offload", budget_tokens=4096, sink_tokens=64, reserve_tokens=512, retrieve_tokens=256,
                   window_quant=window_quant)
    engine = LLMEngine(llm, cfg, 1 << 30)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine.open("cam", _pieces(llm.hidden_size)[0])
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    reserved, measured = engine.stats("cam").reserved_bytes, engine.memory_report("cam").device_bytes
    assert measured <= reserved == engine.bytes_per_stream()  # the reservation counts all sink_tokens' keys
    assert measured <= grown <= measured + (2 << 20), (grown, measured)  # the accounting = what CUDA allocated
    engine.close("cam")
    gc.collect()
    assert torch.cuda.memory_allocated() - before < (1 << 20)  # and freed at close


@pytest.mark.parametrize("placement", ["device", "host"])
def test_reference_store_lives_where_placed_with_its_bytes(gpu_pair, placement: str) -> None:
    fp32, _ = gpu_pair
    pv = fp32.preprocess(_frames(6))
    cacher = StreamCacher(CacherConfig(ratio=0.25, max_reuse=2, match_threshold=-1.0, max_refs=4,
                                       reference_placement=placement))
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for s in range(0, 6, 2):
        fp32.encode_vision(pv[s:s + 2], layer_runner=cacher.runner)
    torch.cuda.synchronize()
    held, stats = torch.cuda.memory_allocated() - before, cacher.stats()
    side = pv.shape[-1] // fp32.model.config.vision_config.patch_size  # patches per side
    per_ref = 3 * len(fp32.vision_layers) * side ** 2 * fp32.vision_layers[0].embed_dim * 4  # K, V, update; fp32
    tensors = stats["refs_held"] * per_ref
    assert stats["refs_held"] >= 1 and 0 <= stats["store_bytes"] - tensors <= stats["refs_held"] * (64 << 10)
    memory = cacher.memory()
    if placement == "device":
        assert held >= tensors == memory.references, (held, tensors)  # on the GPU (the FAISS entries on the host)
    else:  # pinned host memory; only the chunk's transient copies were on the GPU, and they are gone
        assert held < (1 << 20) and memory.references == 0 and memory.host_references >= tensors, (held, memory)
    cacher.reset()
    gc.collect()
    assert torch.cuda.memory_allocated() - before < (1 << 20)


# ---- a chunk crossing devices (vision replica -> LLM replica) -------------------------------------------------------
_RECEIVER = """
import pickle, sys, torch
assert not torch.cuda.is_available()
from serve.core.messages import text_of
from serve.core.stages import LLMStage
from stream.models import load_adapter
chunk = pickle.load(open(sys.argv[2], "rb"))
stage = LLMStage(load_adapter(sys.argv[1], "cpu", "float32"))
stage.open(chunk.stream_id)
stage.append(chunk.stream_id, chunk)
print(repr(text_of(stage.ask(chunk.stream_id, "What is happening?", 8))))
"""


def _answer(adapter, chunk) -> str:
    from serve.core.stages import LLMStage

    stage = LLMStage(adapter)
    stage.open(chunk.stream_id)
    stage.append(chunk.stream_id, chunk)
    return text_of(stage.ask(chunk.stream_id, "What is happening?", 8))


def test_chunk_encoded_on_gpu_is_appended_on_another_device(tiny_llava_dir: Path, tmp_path: Path) -> None:
    from serve.core.stages import VisionStage
    from stream.frames import FrameBatch

    vision = VisionStage(load_adapter(tiny_llava_dir, DEVICE, "float32"))
    vision.open("cam")
    chunk = vision.encode("cam", FrameBatch(_frames(4), np.arange(4.0), np.arange(4)))
    assert chunk.embeds.device.type == DEVICE
    wire = tmp_path / "chunk.pkl"
    wire.write_bytes(pickle.dumps(chunk))  # what Ray does between replicas
    received = pickle.loads(wire.read_bytes())
    torch.testing.assert_close(received.embeds, chunk.embeds.cpu(), atol=0, rtol=0)
    expected = _answer(load_adapter(tiny_llava_dir, "cpu", "float32"), received)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _RECEIVER, str(tiny_llava_dir), str(wire)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == repr(expected)  # a node without a GPU answers the same
    if torch.cuda.device_count() > 1:  # a second GPU: same answer as on the first one
        on_1 = _answer(load_adapter(tiny_llava_dir, "cuda:1", "float32"), received)
        on_0 = _answer(load_adapter(tiny_llava_dir, DEVICE, "float32"), received)
        assert on_1 == on_0
