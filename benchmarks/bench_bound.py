#!/usr/bin/env python
"""Measured frames/s per GPU for SigLIP-so400m + a 7B LLM, next to the physical bound computed on paper.

    python benchmarks/bench_bound.py --device cuda [--dtype bfloat16] [--context 4096] [--batch 64]
    python benchmarks/bench_bound.py --device cpu --smoke          # tiny shapes, the same code path (CI)

Random weights (real architectures: transformers' ``SiglipVisionModel`` at the so400m/14-384 shape, ``Qwen2Model``
at the Qwen2-7B shape). Per phase, after ``--warmup`` untimed calls, ``--repeats`` calls are timed with CUDA events
(``torch.cuda.Event(enable_timing=True)``, one pair per call, read after ``torch.cuda.synchronize()``); on CPU with
``time.perf_counter``. p50/p90/p99 per phase; peak GPU memory per phase from ``torch.cuda.max_memory_allocated``.

1. ViT, full: a chunk of ``--chunk`` frames through embeddings + every layer -> ms per frame.
2. ViT, cached: the STC cacher at its defaults (``CacherConfig()``) over a stream of
   similar frames (one frame's patch embedding plus small noise per frame) -> ms per frame, reference encodes
   included, and its FLOP ratio.
3. LLM prefill: one chunk of ``--chunk`` frames x ``--kept`` kept tokens (the pruner's default 25% of 196) appended
   to a ``--context``-token cache -> ms per kept token.
4. LLM decode: one token for each of ``--batch`` streams over ``--context`` tokens each -> ms per step and the
   achieved bytes/s (weights + KV read once per step).

Measured frames/s per GPU = 1 / (cached ViT s per frame + prefill s per frame); the bound = peak FLOP/s / FLOPs per
frame (same formulas, see :func:`bound`). The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_cacher import SO400M, layer_flops  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from cache.cacher import StreamCacher  # noqa: E402
from cache.config import CacherConfig  # noqa: E402
from cache.kv.config import KVConfig  # noqa: E402
from cache.kv.kvcache import BoundedLayer, KVPlane  # noqa: E402
from benchmarks.paper_memory import QWEN2_7B, component_bytes_7b  # noqa: E402
from stream.models.base import run_layers  # noqa: E402
from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402

TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=384,
                patch_size=14)
TINY_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=1024)
# Peak dense bf16 tensor FLOP/s (the datasheets' "with sparsity" figure halved) and HBM bytes/s, SXM boards:
# NVIDIA H100 Tensor Core GPU datasheet (1,979 TFLOPS sparse, 3.35 TB/s, 80 GB) and H200 datasheet (1,979 TFLOPS
# sparse, 4.8 TB/s, 141 GB).
GPUS = {"H100": (989e12, 3.35e12, 80e9), "H200": (989e12, 4.8e12, 141e9)}


def vit_flops(shape: dict, ratio: float = 1.0) -> float:
    """Matmul FLOPs of one frame through the encoder layers; ``ratio`` = the cacher's measured FLOP ratio."""
    tokens = (shape["image_size"] // shape["patch_size"]) ** 2
    return ratio * shape["num_hidden_layers"] * layer_flops(tokens, shape["hidden_size"], shape["intermediate_size"])


def llm_numbers(shape: dict, bytes_per_elem: int = 2) -> dict[str, float]:
    """Decoder-layer weights, LM-head weights and KV bytes per token of a Qwen2-style decoder."""
    d, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    head_dim = d // shape["num_attention_heads"]
    kv_dim = shape["num_key_value_heads"] * head_dim
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * inter
    return {"layer_params": layers * per_layer, "head_params": d * shape["vocab_size"],
            "kv_bytes_per_token": 2 * layers * kv_dim * bytes_per_elem, "attn_dim": layers * d}


def prefill_flops_per_token(shape: dict, context: int) -> float:
    """2 FLOPs per decoder weight + attention over ``context`` earlier tokens (QK^T and AV, all layers)."""
    n = llm_numbers(shape)
    return 2 * n["layer_params"] + 4 * n["attn_dim"] * context


def decode_flops_per_token(shape: dict, context: int) -> float:
    """One decoded token: 2 FLOPs per decoder and LM-head weight + attention over ``context`` earlier tokens."""
    n = llm_numbers(shape)
    return 2 * (n["layer_params"] + n["head_params"]) + 4 * n["attn_dim"] * context


def vit_params(shape: dict) -> int:
    """Encoder-layer weights of a SigLIP-style ViT (attention 4·D², MLP 2·D·MLP per layer; embeddings left out)."""
    d, inter = shape["hidden_size"], shape["intermediate_size"]
    return shape["num_hidden_layers"] * (4 * d * d + 2 * d * inter)


def weight_bytes(llm: dict, vit: dict | None = None, bytes_per_elem: int = 2) -> float:
    """Device bytes of the weights: decoder layers, input embedding and LM head (untied), plus the ViT's layers."""
    n = llm_numbers(llm)
    return (n["layer_params"] + 2 * n["head_params"] + (vit_params(vit) if vit else 0)) * bytes_per_elem


def decode_bytes_per_step(shape: dict, batch: int, context: int, bytes_per_elem: int = 2) -> float:
    """HBM bytes one decode step reads: all weights once (decoder + LM head) + every row's KV."""
    n = llm_numbers(shape, bytes_per_elem)
    return (n["layer_params"] + n["head_params"]) * bytes_per_elem + batch * context * n["kv_bytes_per_token"]


def bound(gpu: str, vit_ratio: float, kept: int, context: int, batch: int,
          vit: dict = SO400M, llm: dict = QWEN2_7B) -> dict[str, float]:
    """The paper bound on ``gpu`` (a key of :data:`GPUS`): frames/s when compute-bound at peak, decode tokens/s
    when bandwidth-bound at peak."""
    flops, bw, _ = GPUS[gpu]
    per_frame = vit_flops(vit, vit_ratio) + kept * prefill_flops_per_token(llm, context)
    step = decode_bytes_per_step(llm, batch, context)
    return {"flops_per_frame": per_frame, "vit_flops_per_frame": vit_flops(vit, vit_ratio),
            "prefill_flops_per_token": prefill_flops_per_token(llm, context), "frames_per_s": flops / per_frame,
            "decode_bytes_per_step": step, "decode_tokens_per_s": batch * bw / step}


def memory_bound(kv: KVConfig, cacher: CacherConfig, refs_held: int, queued_tokens: int) -> dict:
    """Bytes per 7B / so400m stream by component (MiB, :func:`component_bytes_7b`) and the streams that fit per GPU
    by memory: HBM after the weights (:func:`weight_bytes`) over a stream's device bytes."""
    parts = component_bytes_7b(kv, cacher, refs_held, queued_tokens)
    room = {g: hbm - weight_bytes(QWEN2_7B, SO400M) for g, (_, _, hbm) in GPUS.items()}
    return {"window_quant": kv.window_quant, "reference_placement": cacher.reference_placement,
            "refs_held": refs_held, "queued_tokens": queued_tokens,
            "mib": {k: round(v / 2**20, 2) for k, v in parts.to_dict().items()},
            "streams_by_memory": {g: int(r // parts.device_bytes) for g, r in room.items()}}


class Timer:
    """Times a callable: CUDA events on cuda (synchronised before reading), ``perf_counter`` on cpu."""

    def __init__(self, device: str, warmup: int, repeats: int) -> None:
        self.cuda, self.warmup, self.repeats = device == "cuda", warmup, repeats

    def __call__(self, fn: Callable[[], object], reset: Callable[[], object] | None = None) -> dict[str, float]:
        """p50/p90/p99/mean milliseconds over ``repeats`` calls of ``fn`` (``reset`` runs untimed after each)."""
        for _ in range(self.warmup):
            fn()
            if reset:
                reset()
        ms = []
        for _ in range(self.repeats):
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                ms.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
            if reset:
                reset()
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(np.mean(ms)),
                "n": len(ms)}


def peak_mib(device: str) -> float | None:
    """Peak allocated GPU memory since the last reset, MiB (None on cpu); resets the counter."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    value = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return round(value, 1)


@torch.inference_mode()
def vit_phases(args: argparse.Namespace, shape: dict, timer: Timer) -> dict:
    """ViT full and cached, ms per frame; the cached stream's FLOP ratio from its recompute counts."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        tower = SiglipVisionModel(SiglipVisionConfig(**shape)).to(dtype).eval()
    layers = tower.encoder.layers
    size = shape["image_size"]
    pv = torch.rand(1, 3, size, size, device=args.device, dtype=dtype) * 2 - 1  # [1, 3, S, S]
    base = tower.embeddings(pv)  # [1, P, D]
    gen = torch.Generator(device=args.device).manual_seed(1)
    frames = base + 0.02 * base.std() * torch.randn((args.stream_frames, *base.shape[1:]), generator=gen,
                                                    device=args.device, dtype=dtype)  # [F, P, D]
    chunk = frames[: args.chunk]

    def full() -> None:
        run_layers(chunk, layers)

    out = {"full": timer(full)}
    out["full"]["ms_per_frame"] = out["full"]["p50_ms"] / args.chunk
    out["full"]["peak_mib"] = peak_mib(args.device)
    cacher = StreamCacher(CacherConfig())

    def cached_stream() -> None:  # the whole stream, chunk by chunk, from a cold cacher
        cacher.reset()
        for s in range(0, args.stream_frames, args.chunk):
            cacher.encode(frames[s:s + args.chunk], layers)

    out["cached"] = timer(cached_stream)
    out["cached"]["ms_per_frame"] = out["cached"]["p50_ms"] / args.stream_frames
    out["cached"]["peak_mib"] = peak_mib(args.device)
    st = cacher.stats()
    tokens = (size // shape["patch_size"]) ** 2
    d, inter, n_layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    full_flops = n_layers * layer_flops(tokens, d, inter)
    cached = st["frames_full"] * full_flops + sum(
        st["frames_reused"] * layer_flops(tokens, d, inter, r / st["frames_reused"]) for r in st["tokens_recomputed"]
    ) if st["frames_reused"] else st["frames_full"] * full_flops
    out["cached"].update(flop_ratio=cached / (st["frames"] * full_flops), reuse_rate=st["reuse_rate"],
                         store_mib=round(st["store_bytes"] / 2**20, 1))
    del tower, frames, cacher
    return out


class _RowsLayer(BoundedLayer):
    """:class:`~cache.kv.kvcache.BoundedLayer` with a batch dimension: preallocated ``[B, kv_heads, capacity, hd]``
    buffers holding ``length`` random tokens (a filled context without a prefill; decode writes in place)."""

    def __init__(self, batch: int, capacity: int, length: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str) -> None:
        CacheLayerMixin.__init__(self)
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys_plane = KVPlane(torch.randn(shape, dtype=dtype, device=device), dtype)
        self.values_plane = KVPlane(torch.randn(shape, dtype=dtype, device=device), dtype)
        self.capacity, self.length, self.dtype, self.device = capacity, length, dtype, torch.device(device)
        self.quant = "none"
        self.is_initialized = True


def rows_cache(llm_cfg, batch: int, context: int, extra: int, device: str, dtype: torch.dtype) -> Cache:
    """A preallocated cache (gpt-fast style, as the KV sessions use) with ``context`` tokens in each of ``batch``
    rows and room for ``extra`` more, so timed steps write in place instead of concatenating."""
    head_dim = llm_cfg.hidden_size // llm_cfg.num_attention_heads
    return Cache(layers=[_RowsLayer(batch, context + extra, context, llm_cfg.num_key_value_heads, head_dim, dtype,
                                    device) for _ in range(llm_cfg.num_hidden_layers)])


def rollback(cache: Cache, length: int) -> None:
    """Forget every token after ``length`` (the timed chunk / decoded token)."""
    for layer in cache.layers:
        layer.length = length


def check_rows_cache(model, cache: Cache, chunk: torch.Tensor, pos: torch.Tensor, context: int) -> float:
    """Correctness before timing: a chunk over the preallocated cache gives the hidden states it gives over a plain
    ``DynamicCache`` holding the same context; returns the relative max difference (raises when off)."""
    from transformers import DynamicCache

    ref = DynamicCache()
    for i, layer in enumerate(cache.layers):
        ref.update(layer.k_buf[:, :, :context].clone(), layer.v_buf[:, :, :context].clone(), i)
    ours = model.model(inputs_embeds=chunk, past_key_values=cache, position_ids=pos, use_cache=True)
    rollback(cache, context)
    plain = model.model(inputs_embeds=chunk, past_key_values=ref, position_ids=pos, use_cache=True)
    a, b = ours.last_hidden_state.float(), plain.last_hidden_state.float()  # [1, L, d]
    err = float((a - b).abs().max() / b.abs().max())
    tol = 1e-4 if chunk.dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise SystemExit(f"correctness check failed: preallocated cache differs from DynamicCache by {err:.2e} > {tol}")
    return err


def random_qwen2(shape: dict, dtype: torch.dtype, device: str) -> Any:
    """A Qwen2 causal LM of ``shape`` with random weights (seed 0), built directly on ``device`` in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, max_position_embeddings=1 << 17)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)


@torch.inference_mode()
def llm_phases(args: argparse.Namespace, shape: dict, timer: Timer) -> dict:
    """Prefill of one pruned chunk over a filled context, and batched decode steps."""
    dtype = getattr(torch, args.dtype)
    model = random_qwen2(shape, dtype, args.device)
    cfg = model.config
    peak_mib(args.device)
    n_new = args.chunk * args.kept
    chunk = torch.randn(1, n_new, cfg.hidden_size, device=args.device, dtype=dtype) * 0.02  # [1, L, d]
    pos = torch.arange(args.context, args.context + n_new, device=args.device)[None]
    cache = rows_cache(cfg, 1, args.context, n_new, args.device, dtype)
    err = check_rows_cache(model, cache, chunk, pos, args.context)

    def prefill() -> None:
        h = model.model(inputs_embeds=chunk, past_key_values=cache, position_ids=pos, use_cache=True)
        model.lm_head(h.last_hidden_state[:, -1:])

    out = {"prefill": timer(prefill, reset=lambda: rollback(cache, args.context))}
    out["prefill"].update(tokens=n_new, ms_per_token=out["prefill"]["p50_ms"] / n_new, check_rel_err=err,
                          peak_mib=peak_mib(args.device))
    del cache
    for batch in sorted({1, args.batch}):
        cache = rows_cache(cfg, batch, args.context, 1, args.device, dtype)
        tok = torch.randn(batch, 1, cfg.hidden_size, device=args.device, dtype=dtype) * 0.02  # [B, 1, d]
        step_pos = torch.full((batch, 1), args.context, device=args.device)

        def step() -> None:
            h = model.model(inputs_embeds=tok, past_key_values=cache, position_ids=step_pos, use_cache=True)
            model.lm_head(h.last_hidden_state)

        row = timer(step, reset=lambda: rollback(cache, args.context))
        nbytes = decode_bytes_per_step(shape, batch, args.context, torch.finfo(dtype).bits // 8)
        row.update(bytes_per_step=nbytes, achieved_bytes_per_s=nbytes / (row["p50_ms"] / 1e3),
                   tokens_per_s=batch / (row["p50_ms"] / 1e3), peak_mib=peak_mib(args.device))
        out[f"decode_b{batch}"] = row
        del cache
    return out


def gpu_key(name: str | None) -> str | None:
    """``"NVIDIA H200"`` -> ``"H200"`` (a key of :data:`GPUS`), else None."""
    return next((k for k in GPUS if name and k in name.upper()), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CI: checks the code path, not speed)")
    p.add_argument("--chunk", type=int, default=8, help="frames per chunk")
    p.add_argument("--kept", type=int, default=49, help="kept LLM tokens per frame (default: 25%% of 196)")
    p.add_argument("--context", type=int, default=4096, help="tokens already in each stream's KV cache")
    p.add_argument("--batch", type=int, default=64, help="streams decoding together")
    p.add_argument("--stream-frames", type=int, default=16, help="frames of the cached ViT stream")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked but torch sees no CUDA device. Fix: use --device cpu (with --smoke).")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.smoke:
        args.context, args.batch, args.stream_frames = min(args.context, 64), min(args.batch, 2), 4
        args.chunk, args.kept, args.warmup, args.repeats = min(args.chunk, 2), min(args.kept, 8), 1, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vit_shape, llm_shape = (TINY_VIT, TINY_LLM) if args.smoke else (SO400M, QWEN2_7B)
    timer = Timer(args.device, args.warmup, args.repeats)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    vit = vit_phases(args, vit_shape, timer)
    llm = llm_phases(args, llm_shape, timer)
    vit_s, prefill_s = vit["cached"]["ms_per_frame"] / 1e3, llm["prefill"]["ms_per_token"] * args.kept / 1e3
    measured = {"frames_per_s": 1.0 / (vit_s + prefill_s), "vit_cached_frames_per_s": 1.0 / vit_s,
                "vit_full_frames_per_s": 1e3 / vit["full"]["ms_per_frame"], "prefill_frames_per_s": 1.0 / prefill_s,
                "decode_tokens_per_s": llm[f"decode_b{args.batch}"]["tokens_per_s"]}
    info = machine_info(args.device)
    key = gpu_key(info.get("gpu"))
    paper = {g: bound(g, vit["cached"]["flop_ratio"], args.kept, args.context, args.batch, vit_shape, llm_shape)
             for g in GPUS}
    result = {
        "bench": "bound", "smoke": args.smoke, "dtype": args.dtype, "random_weights": True,
        "vit": "tiny" if args.smoke else "siglip-so400m/14-384", "llm": "tiny" if args.smoke else "qwen2-7b",
        "chunk": args.chunk, "kept_per_frame": args.kept, "context": args.context, "batch": args.batch,
        "clock": "cuda events" if args.device == "cuda" else "perf_counter",
        "measured": {k: round(v, 2) for k, v in measured.items()},
        "bound": {g: {k: round(v, 4 if v < 10 else 1) for k, v in b.items()} for g, b in paper.items()},
        "fraction_of_bound": round(measured["frames_per_s"] / paper[key]["frames_per_s"], 4) if key else None,
        "phases": {**{f"vit_{k}": v for k, v in vit.items()}, **llm},
        # on paper at the 7B / so400m shape (any --device): one reference held, one chunk in flight
        "memory_7b": memory_bound(KVConfig(), CacherConfig(), 1, args.chunk * args.kept),
        "memory_7b_before": memory_bound(KVConfig(window_quant="none"), CacherConfig(reference_placement="device"),
                                         1, args.chunk * args.kept),
        "machine": info,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
