#!/usr/bin/env python
"""Designs side by side: what one camera stream costs per minute of video under the designs users would pick.

    python benchmarks/bench_designs.py --video still:../shared/media/vtest.avi --video ../shared/media/vtest.avi
    python benchmarks/bench_designs.py --device cuda     # Qwen2-7B shape, bf16, on one GPU
    python benchmarks/bench_designs.py --smoke           # tiny shapes, the same code path

Same footage and model shapes for every design: SigLIP-so400m/14-384 (196 tokens per frame after LLaVA-OneVision's
2x2 pooling) + a Qwen2-0.5B-shape LLM on CPU (CPU time on one torch thread), the Qwen2-7B shape on cuda; random
weights (speed and memory are real for the shapes; answers would be meaningless). Frames at ``--fps``; one question
every ``--chunk-s`` seconds in every design (the blueprint's alert check per chunk), ``--question-tokens`` in and
``--answer-tokens`` out.

* (a) ``chunked``: every ``--chunk-s`` chunk is encoded in full and prefilled from scratch with its question, as
  NVIDIA's video search and summarization blueprint does; its KV lives while the chunk is answered.
* (b) ``resend``: each question carries the last ``--resend-frames`` frames (an OpenAI-compatible server without
  sessions), encoded in full and prefilled from scratch.
* (c) ``stc_serve``: the defaults: frame gate + STC cacher + pruner (49 of 196 tokens) + incremental prefill into a
  bounded KV session; frames are encoded and prefilled once, as they arrive; a question prefills only itself over the
  stream's KV, taken in its steady state (the window full).

Measured at real size on a few frames, then scaled per stream-minute (counts x measured unit times). ViT: a full
encode per frame on ``--full-frames`` frames; (c)'s gate + cacher over ``--frames`` frames of each clip (its skip
rate, reuse and counted FLOPs taken to hold for the minute; the clip's first frame is a cold start, so this is
conservative). LLM: each prefill a design does, once, at its real length and context (a preallocated KV cache holding
random keys and values stands in for a context), and the answer's decode steps at each design's context. Correctness
before timing: the cacher at ratio 1.0 equals the full encoder; the preallocated cache equals a DynamicCache. FLOPs
and bytes from the formulas of bench_bound.py. Projections per H100 / H200 (Qwen2-7B shape, bf16, 100 % of peak, as
bench_bound.py): by compute, peak FLOP/s over a stream's FLOP/s; by memory, HBM after the weights over a stream's
device bytes ((a), (b): the KV of the prompt in flight; (c): :func:`component_bytes_7b`, the accounting's own
formulas (``cache.memory``): the preallocated KV budget in ``kv.window_quant``, the ViT references the footage held
where ``cacher.reference_placement`` puts them, one chunk in flight; host bytes printed beside). The last stdout line is one JSON object (the first clip's figures at the top, every clip under
``clips``).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_bound import (  # noqa: E402
    GPUS, QWEN2_7B, TINY_LLM, TINY_VIT, check_rows_cache, decode_flops_per_token, llm_numbers,
    prefill_flops_per_token, random_qwen2, rows_cache, vit_flops, weight_bytes)
from benchmarks.bench_cacher import SO400M, build_tower, check_exact, flop_ratio, load_clip  # noqa: E402
from benchmarks.bench_pruner import QWEN2_05B  # noqa: E402
from benchmarks.paper_memory import component_bytes_7b  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from cache.cacher import StreamCacher  # noqa: E402
from cache.config import CacherConfig  # noqa: E402
from cache.gate import FrameGate  # noqa: E402
from cache.kv.config import KVConfig  # noqa: E402
from cache.memory import MemoryReport  # noqa: E402
from pruner.config import PrunerConfig  # noqa: E402
from stream.config import SamplerConfig  # noqa: E402
from stream.models.preprocess import frames_to_pixel_values  # noqa: E402

DESIGNS = ("chunked", "resend", "stc_serve")
FRAME_TOKENS = 196  # LLaVA-OneVision: 27 x 27 SigLIP patches pooled 2x2 -> 14 x 14 tokens per frame


def clock(device: str) -> Callable[[], float]:
    """CPU time of this process on cpu (one torch thread: robust to other load); wall time after a sync on cuda."""
    if device == "cuda":
        return lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    return time.process_time


# -- measurements ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def measure_vision(args: argparse.Namespace, shape: dict, clips: dict[str, np.ndarray]) -> dict[str, Any]:
    """Full-encode seconds per frame, and per clip (c)'s gate + cacher: seconds and counted FLOPs per frame."""
    dtype, now = getattr(torch, args.dtype), clock(args.device)
    tower = build_tower(args.device, dtype, shape["num_hidden_layers"]) if shape is SO400M else _tiny_tower(args)
    size = shape["image_size"]
    layers = tower.encoder.layers

    def pixels(rgb: np.ndarray) -> torch.Tensor:
        return frames_to_pixel_values(rgb, size, (0.5,) * 3, (0.5,) * 3, "bicubic").to(args.device, dtype)

    first = next(iter(clips.values()))
    pv = pixels(first[: max(2, args.full_frames)])
    exact = check_exact(tower, pv, args.device, 1e-3 if dtype == torch.float32 else 5e-2)
    tower.encoder(tower.embeddings(pv[:1]))  # warm-up
    t0 = now()
    for i in range(args.full_frames):
        tower.encoder(tower.embeddings(pv[i:i + 1]))
    out: dict[str, Any] = {"exact_max_diff": exact, "full_s_per_frame": (now() - t0) / args.full_frames, "clips": {}}
    patches, d, inter = (size // shape["patch_size"]) ** 2, shape["hidden_size"], shape["intermediate_size"]
    config = CacherConfig()
    config = config.model_copy(update={"gate": config.gate.model_copy(update={"enabled": True})})
    for name, rgb in clips.items():
        cacher, gate, seconds = StreamCacher(config), FrameGate(config.gate), 0.0
        clip_pv = pixels(rgb)  # [N, 3, S, S]: preprocessing is the same in every design, so it is left out
        for s in range(0, len(rgb), args.chunk):  # a stream: chunks of the sampler's size, gate first
            t0 = now()
            keep = gate.admit(rgb[s:s + args.chunk], np.arange(s, s + len(rgb[s:s + args.chunk])) / args.fps)
            if keep.any():
                cacher.encode(tower.embeddings(clip_pv[s:s + args.chunk][torch.from_numpy(keep)]), layers)
            seconds += now() - t0
        st = cacher.stats()
        out["clips"][name] = {
            "frames": len(rgb), "s_per_frame": seconds / len(rgb), "gate_skip_rate": gate.stats()["skip_rate"],
            "flop_ratio": flop_ratio(st, patches, d, inter, shape["num_hidden_layers"], config.sketch_width(d),
                                     len(rgb)) if st["frames"] else 0.0,
            "reuse_rate": st["reuse_rate"], "refs_held": st["refs_held"]}
    return out


def _tiny_tower(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    with torch.device(args.device):
        return SiglipVisionModel(SiglipVisionConfig(**TINY_VIT)).to(getattr(torch, args.dtype)).eval()


def prompts(args: argparse.Namespace, kv: KVConfig, kept: int) -> dict[str, tuple[int, int]]:
    """Every prefill the designs do: name -> (tokens, context already in the cache)."""
    q, steady = args.question_tokens, kv.budget_tokens - kv.reserve_tokens  # (c): its window full
    return {"chunked": (round(args.chunk_s * args.fps) * FRAME_TOKENS + q, 0),
            "resend": (args.resend_frames * FRAME_TOKENS + q, 0),
            "stc_serve_chunk": (args.chunk * kept, steady - args.chunk * kept),
            "stc_serve": (q, steady)}


@torch.inference_mode()
def measure_llm(args: argparse.Namespace, shape: dict, plan: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Seconds of each prefill in ``plan`` (and of the answer's decode steps after it), measured once each."""
    dtype, now = getattr(torch, args.dtype), clock(args.device)
    model = random_qwen2(shape, dtype, args.device)
    cfg = model.config
    kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    probe = torch.randn(1, 16, cfg.hidden_size, device=args.device, dtype=dtype) * 0.02  # [1, 16, d]
    err = check_rows_cache(model, rows_cache(cfg, 1, 64, 16, args.device, dtype), probe,
                           torch.arange(64, 80, device=args.device)[None], 64)
    out: dict[str, Any] = {"cache_check_rel_err": err, "prefill_s": {}, "decode_s": {}}
    for name, (tokens, context) in plan.items():
        cache = rows_cache(cfg, 1, context, tokens + args.answer_tokens, args.device, dtype)
        x = torch.randn(1, tokens, cfg.hidden_size, device=args.device, dtype=dtype) * 0.02  # [1, T, d]
        t0 = now()
        h = model.model(inputs_embeds=x, use_cache=True, **{kw: cache},
                        position_ids=torch.arange(context, context + tokens, device=args.device)[None])
        model.lm_head(h.last_hidden_state[:, -1:])
        out["prefill_s"][name] = now() - t0
        tok = x[:, -1:]  # [1, 1, d]
        t0 = now()
        for i in range(args.answer_tokens):
            pos = torch.full((1, 1), context + tokens + i, device=args.device)
            h = model.model(inputs_embeds=tok, position_ids=pos, use_cache=True, **{kw: cache})
            model.lm_head(h.last_hidden_state)
        out["decode_s"][name] = now() - t0
        del cache, x
    return out


# -- per stream-minute ----------------------------------------------------------------------------------------------
def prefill_flops(shape: dict, tokens: int, context: int) -> float:
    """``tokens`` prefilled after ``context``: per-token FLOPs are linear in the context, so the mean context holds."""
    return tokens * prefill_flops_per_token(shape, context + (tokens - 1) / 2)


def decode_flops(shape: dict, tokens: int, context: int) -> float:
    return tokens * decode_flops_per_token(shape, context + (tokens - 1) / 2)


def per_minute(args: argparse.Namespace, design: str, vision: dict, clip: dict, llm: dict,
               plan: dict[str, tuple[int, int]], kept: int, shapes: dict[str, dict]) -> dict[str, Any]:
    """One design's counts, FLOPs and seconds per stream-minute (``shapes``: the run's ViT and LLM shapes; FLOPs
    also at the Qwen2-7B shape)."""
    frames, questions = 60 * args.fps, 60 / args.chunk_s
    full = vit_flops(shapes["vit"])
    if design == "stc_serve":
        encoded = frames * (1 - clip["gate_skip_rate"])
        vit_fl, vit_s = frames * clip["flop_ratio"] * full, frames * clip["s_per_frame"]
        chunk_tokens = plan["stc_serve_chunk"][0]
        events = [("stc_serve_chunk", encoded * kept / chunk_tokens), ("stc_serve", questions)]  # (prefill, per min)
        ttft = llm["prefill_s"]["stc_serve"]
    else:
        per_question = round(args.chunk_s * args.fps) if design == "chunked" else args.resend_frames
        encoded = questions * per_question
        vit_fl, vit_s = encoded * full, encoded * vision["full_s_per_frame"]
        events = [(design, questions)]
        ttft = per_question * vision["full_s_per_frame"] + llm["prefill_s"][design]
    answer_context = sum(plan[design])
    row: dict[str, Any] = {"vit_frames": encoded, "vit_gflop": vit_fl / 1e9, "vit_s": vit_s,
                           "prefill_tokens": sum(n * plan[e][0] for e, n in events),
                           "prefill_s": sum(n * llm["prefill_s"][e] for e, n in events),
                           "decode_s": questions * llm["decode_s"][design], "ttft_s": ttft,
                           "answer_s": ttft + llm["decode_s"][design]}
    for key, shape in (("", shapes["llm"]), ("_7b", QWEN2_7B)):
        llm_fl = sum(n * prefill_flops(shape, *plan[e]) for e, n in events)
        llm_fl += questions * decode_flops(shape, args.answer_tokens, answer_context)
        row[f"llm_gflop{key}"] = llm_fl / 1e9
        row[f"total_tflop{key}"] = (vit_fl + llm_fl) / 1e12
    row["total_s"] = row["vit_s"] + row["prefill_s"] + row["decode_s"]
    return row


def device_bytes(design: str, plan: dict[str, tuple[int, int]], kv: KVConfig, clip: dict, answer: int,
                 shape: dict, vit: dict, elem: int) -> float:
    """A stream's device bytes: the KV of its prompt in flight ((a), (b)), or (c)'s :func:`component_bytes_7b` at
    these shapes with one chunk in flight (``plan["stc_serve_chunk"]``) and the references the footage held."""
    per_token = llm_numbers(shape, elem)["kv_bytes_per_token"]
    if design != "stc_serve":
        return (plan[design][0] + answer) * per_token
    return component_bytes_7b(kv, CacherConfig(), clip["refs_held"], plan["stc_serve_chunk"][0], shape, vit,
                              elem).device_bytes


def project(row: dict, mem_bytes: float, vit: dict) -> dict[str, float]:
    """Streams per GPU at the Qwen2-7B shape in bf16: by compute (100 % of peak) and by memory."""
    out = {}
    for gpu, (flops, _, hbm) in GPUS.items():
        compute = flops / (row["total_tflop_7b"] * 1e12 / 60)
        memory = (hbm - weight_bytes(QWEN2_7B, vit)) / mem_bytes
        out[f"streams_per_{gpu.lower()}_by_compute"] = compute
        out[f"streams_per_{gpu.lower()}_by_memory"] = memory
        out[f"streams_per_{gpu.lower()}"] = min(compute, memory)
    return out


# -- the run --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", action="append", default=None,
                   help="footage, repeatable: a video file, an edited clip 'PATH@START_S:N,...' or 'still:PATH' "
                        "(bench_cacher.py's still clip); default ../shared/media/vtest.avi")
    p.add_argument("--frames", type=int, default=8, help="frames of each clip run through (c)'s gate + cacher")
    p.add_argument("--full-frames", type=int, default=2, help="frames timed for one full ViT encode")
    p.add_argument("--fps", type=float, default=SamplerConfig().fps, help="frames per second, every design")
    p.add_argument("--chunk-s", type=float, default=10.0, help="(a)'s chunk; one question per chunk in every design")
    p.add_argument("--resend-frames", type=int, default=30, help="(b): frames each question carries")
    p.add_argument("--chunk", type=int, default=SamplerConfig().frames_per_chunk, help="(c): frames per chunk")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--llm-shape", choices=["qwen2-0.5b", "qwen2-7b"], default=None,
                   help="LLM shape (random weights); default qwen2-0.5b on cpu, qwen2-7b on cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads (cpu: 1, and CPU time is the clock)")
    p.add_argument("--smoke", action="store_true", help="tiny ViT and LLM, short prompts (checks the code path)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked but torch sees no CUDA device. Fix: use --device cpu.")
    args.video = args.video or [str(Path(__file__).resolve().parents[2] / "shared/media/vtest.avi")]
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.llm_shape = args.llm_shape or ("qwen2-7b" if args.device == "cuda" else "qwen2-0.5b")
    if args.smoke:
        args.frames, args.full_frames, args.resend_frames = min(args.frames, 4), 1, min(args.resend_frames, 3)
        args.chunk_s, args.chunk = min(args.chunk_s, 2.0), min(args.chunk, 2)
    return args


def table(rows: dict[str, dict], mem: dict[str, float], proj: dict[str, dict]) -> str:
    cols = [("vit frames", "vit_frames", "{:.1f}"), ("ViT TFLOP", "vit_gflop", "{:.1f}", 1e-3),
            ("ViT s", "vit_s", "{:.1f}"), ("prefill tok", "prefill_tokens", "{:.0f}"),
            ("prefill s", "prefill_s", "{:.1f}"), ("decode s", "decode_s", "{:.1f}"),
            ("TFLOP", "total_tflop", "{:.2f}"), ("TFLOP 7B", "total_tflop_7b", "{:.1f}"), ("s", "total_s", "{:.1f}"),
            ("TTFT s", "ttft_s", "{:.2f}"), ("answer s", "answer_s", "{:.2f}")]
    head = "design      " + " ".join(f"{c[0]:>11s}" for c in cols) + "  dev MB 7B  H100 (cmp/mem)  H200 (cmp/mem)"
    lines = [head]
    for name, r in rows.items():
        cells = " ".join(f"{c[2].format(r[c[1]] * (c[3] if len(c) > 3 else 1)):>11s}" for c in cols)
        p = proj[name]
        lines.append(f"{name:11s} {cells} {mem[name] / 2**20:10.0f}  {p['streams_per_h100_by_compute']:6.0f} / "
                     f"{p['streams_per_h100_by_memory']:5.0f}  {p['streams_per_h200_by_compute']:6.0f} / "
                     f"{p['streams_per_h200_by_memory']:5.0f}")
    return "\n".join(lines)


def memory_table(parts: MemoryReport, worst: MemoryReport, max_refs: int) -> str:
    """(c)'s bytes per stream at the 7B shape by component (MiB), from the accounting's formulas."""
    d = parts.to_dict()
    dev = ", ".join(f"{k} {d[k] / 2**20:.1f}" for k in ("kv_window", "kv_sinks", "kv_reserve", "kv_retrieved",
                                                         "references", "queued_chunks"))
    return (f"(c) device MiB per stream, 7B shape: {parts.device_bytes / 2**20:.1f} ({dev}); host MiB: "
            f"{parts.host_bytes / 2**20:.1f} with the references this footage held, {worst.host_bytes / 2**20:.1f} "
            f"with max_refs={max_refs} (offloaded KV history comes on top, up to kv.offload_bytes)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    vit, llm_shape = (TINY_VIT, TINY_LLM) if args.smoke else (SO400M, {"qwen2-0.5b": QWEN2_05B,
                                                                     "qwen2-7b": QWEN2_7B}[args.llm_shape])
    print(f"RANDOM weights: ViT {'tiny' if args.smoke else 'SigLIP-so400m/14-384'}, LLM "
          f"{'tiny' if args.smoke else args.llm_shape}; {args.device}, {args.dtype}; "
          f"{'CPU time, ' + str(args.threads) + ' thread(s)' if args.device == 'cpu' else 'wall time'}; unit costs "
          f"measured on a few frames at real size, scaled per stream-minute", flush=True)
    clips = {spec: load_clip(spec, args.frames, args.fps) for spec in args.video}
    kv, kept = KVConfig(), PrunerConfig().frame_budget(FRAME_TOKENS)
    plan = prompts(args, kv, kept)
    vision = measure_vision(args, vit, clips)
    print(f"correctness: cacher ratio=1.0 vs full encoder max |diff| {vision['exact_max_diff']:.2e}", flush=True)
    llm = measure_llm(args, llm_shape, plan)
    print(f"correctness: preallocated KV cache vs DynamicCache rel err {llm['cache_check_rel_err']:.1e}", flush=True)
    elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
    results = {}
    for spec, clip in vision["clips"].items():
        rows = {d: per_minute(args, d, vision, clip, llm, plan, kept, {"vit": vit, "llm": llm_shape}) for d in DESIGNS}
        mem = {d: device_bytes(d, plan, kv, clip, args.answer_tokens, llm_shape, vit, elem) for d in DESIGNS}
        mem7 = {d: device_bytes(d, plan, kv, clip, args.answer_tokens, QWEN2_7B, vit, 2) for d in DESIGNS}
        proj = {d: project(rows[d], mem7[d], vit) for d in DESIGNS}
        parts = component_bytes_7b(kv, CacherConfig(), clip["refs_held"], plan["stc_serve_chunk"][0], vit=vit)
        worst = component_bytes_7b(kv, CacherConfig(), CacherConfig().max_refs, plan["stc_serve_chunk"][0], vit=vit)
        c, a, b = rows["stc_serve"], rows["chunked"], rows["resend"]
        print(f"\n{spec}: gate skip rate {clip['gate_skip_rate']:.3f}, ViT FLOP ratio {clip['flop_ratio']:.3f} over "
              f"{clip['frames']} frames; per stream-minute at {args.fps:g} fps, a question every {args.chunk_s:g} s")
        print(table(rows, mem7, proj))
        print(memory_table(parts, worst, CacherConfig().max_refs))
        summary = {
            "compute_ratio_vs_chunked": c["total_tflop"] / a["total_tflop"],
            "compute_ratio_vs_resend": c["total_tflop"] / b["total_tflop"],
            "compute_ratio_vs_chunked_7b": c["total_tflop_7b"] / a["total_tflop_7b"],
            "compute_ratio_vs_resend_7b": c["total_tflop_7b"] / b["total_tflop_7b"],
            "time_ratio_vs_chunked": c["total_s"] / a["total_s"], "time_ratio_vs_resend": c["total_s"] / b["total_s"],
            "ttft_ratio_vs_chunked": c["ttft_s"] / a["ttft_s"],
            "device_mb_per_stream_7b": mem7["stc_serve"] / 2**20, "kv_mb_per_stream": mem["stc_serve"] / 2**20,
            "device_mb_per_stream_7b_by_component": {k: v / 2**20 for k, v in parts.to_dict().items()
                                                     if k not in ("host_offloaded", "host_references", "host_bytes")},
            "host_mb_per_stream_7b": parts.host_bytes / 2**20,
            "host_mb_per_stream_7b_max_refs": worst.host_bytes / 2**20,
            "window_quant": kv.window_quant, "reference_placement": CacherConfig().reference_placement,
            **{k: v for k, v in proj["stc_serve"].items()},
            "target_met": c["total_tflop"] <= 0.1 * a["total_tflop"], **clip,
            "designs": {d: {**rows[d], "device_mb_7b": mem7[d] / 2**20, "kv_mb": mem[d] / 2**20, **proj[d]}
                        for d in DESIGNS}}
        results[spec] = _rounded(summary)
        print("ratios (c) / (a), (c) / (b): compute {compute_ratio_vs_chunked:.3f}, {compute_ratio_vs_resend:.3f} "
              "(7B shape {compute_ratio_vs_chunked_7b:.3f}, {compute_ratio_vs_resend_7b:.3f}); CPU time "
              "{time_ratio_vs_chunked:.3f}, {time_ratio_vs_resend:.3f}; target (c) <= 0.1x (a): {target_met}"
              .format(**summary))
    first = next(iter(results.values()))
    out = {"bench": "designs", "random_weights": True, "smoke": args.smoke, **{k: v for k, v in first.items()
                                                                                if k != "designs"},
           "video": args.video, "fps": args.fps, "chunk_s": args.chunk_s, "resend_frames": args.resend_frames,
           "question_tokens": args.question_tokens, "answer_tokens": args.answer_tokens, "kept_per_frame": kept,
           "kv_budget_tokens": kv.budget_tokens, "llm": args.llm_shape if not args.smoke else "tiny",
           "units": _rounded({"full_vit_s_per_frame": vision["full_s_per_frame"], **llm}), "clips": results,
           "machine": machine_info(args.device, load_avg=os.getloadavg(), date=datetime.date.today().isoformat(),
                                   dtype=args.dtype)}
    print(json.dumps(out))


def _rounded(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return float(f"{x:.4g}") if isinstance(x, float) else x


if __name__ == "__main__":
    main()
