#!/usr/bin/env python
"""KV bytes held and question time-to-first-token vs stream length, per KV policy, for a simulated 1-fps stream.

    python benchmarks/bench_kv.py [--minutes 60] [--policy all|full|sink_window|offload|offload_int8|offload_int4]
        [--device cpu|cuda] [--plot out.png]

What is simulated (all of it is reported in the JSON ``simulation`` field):

* LLM: the Qwen2-0.5B shape (hidden 896, 14 heads, 2 kv heads, head_dim 64, intermediate 4864) with RANDOM
  weights, vocab 4096 instead of 151936 (only the LM head is smaller), ``--layers`` decoder layers (default 6 on
  CPU so one run stays within minutes on a shared 2-core machine; 24 = the real depth, default on cuda).
* Stream: 1 frame per second, ``--tokens-per-frame`` visual tokens per frame (default 64, SmolVLM-like; 196 =
  LLaVA-OneVision), one frame per ``append`` (one block = one frame), a 20-token prompt prefix.
* Fast-forward: between measurement marks the frames are prefilled by :class:`cache.kv.stub.FastForwardLM`, which
  writes random keys/values of the exact KV shape through the session's normal path (eviction, offload,
  quantization, FAISS index, budgets all run for every frame); prefilling 3600 frames with the real network is hours
  of CPU. At each mark (1, 5, 15, 30, 60 min) the real network answers a 16-token question: TTFT = ``ask()`` to the
  first token, including retrieval (question probe pass, FAISS search, dequantization, RoPE placement), the question
  prefill over everything resident + retrieved, and the first token.
* TTFT protocol: a second stream ``ref`` of the same engine gets only the first minute and is then frozen; at every
  mark the live stream and ``ref`` are asked alternately (one warm-up each, then ``--repeats`` pairs), so
  ``ttft_ratio`` = median over pairs of TTFT(live) / TTFT(1-minute stream), each pair back to back under the same
  machine load. ``ttft_ms_1min`` / ``ttft_ms_end`` are the best TTFT of the 1-minute stream and of the live stream
  at the last mark. ``ttft_cpu_time_ratio`` is the same ratio in process CPU time (less sensitive to other
  processes on a shared CPU).
* Policies: ``sink_window`` (drop evicted frames), ``offload`` (evicted frames kept in float32 on CPU, retrieval),
  ``offload_int8`` / ``offload_int4`` (quantized storage), and ``full`` (no eviction, the unbounded reference; capped
  at ``--full-minutes`` because its cache and TTFT grow without bound).

Correctness before timing: with a budget larger than the stream, the session's greedy tokens equal plain
full-cache generation; with eviction and retrieval of all evicted history (float32 storage) too.

``kv_bytes_*`` = bytes the stream's tokens occupy: resident tokens + offloaded blocks + FAISS index. The last
stdout line is one JSON object (top-level fields: the chosen policy, ``offload_int8`` for ``--policy all``).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import faiss
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, progress  # noqa: E402

from cache.kv import KVConfig, LLMEngine, SessionStats  # noqa: E402
from stream.models.llm import TextLM  # noqa: E402
from tests.kv_doubles import FastForwardLM  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864)
POLICIES = {
    "sink_window": dict(policy="sink_window"),
    "offload": dict(policy="offload", quant="none"),
    "offload_int8": dict(policy="offload", quant="int8"),
    "offload_int4": dict(policy="offload", quant="int4"),
    "full": {},
}
MARKS = (1, 5, 15, 30, 60)
PREFIX_TOKENS, QUESTION_TOKENS = 20, 16


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=int, default=60, help="stream length (1 frame per second)")
    ap.add_argument("--policy", default="all", choices=["all", *POLICIES])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="LLM dtype (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--plot", default=None, help="write KV bytes and TTFT vs minutes here (png)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 6 on cpu, 24 on cuda)")
    ap.add_argument("--tokens-per-frame", type=int, default=64, help="64 = SmolVLM-like, 196 = LLaVA-OV")
    ap.add_argument("--window-frames", type=int, default=32, help="recent frames kept resident")
    ap.add_argument("--retrieve-frames", type=int, default=8, help="offloaded frames brought back per question")
    ap.add_argument("--offload-mib", type=int, default=128, help="per-stream cap on offloaded CPU storage")
    ap.add_argument("--full-minutes", type=int, default=10, help="stream length for the unbounded 'full' reference")
    ap.add_argument("--repeats", type=int, default=5, help="timed questions per stream per mark (after a warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch and FAISS threads on cpu (1 resists contention "
                    "on a shared machine)")
    return ap.parse_args()




def build_llm(args: argparse.Namespace, dtype: torch.dtype | None = None) -> FastForwardLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN2_05B, num_hidden_layers=args.layers, vocab_size=4096, max_position_embeddings=1 << 20)
    if dtype is None:
        default = torch.bfloat16 if args.device == "cuda" else torch.float32
        dtype = getattr(torch, args.dtype) if args.dtype else default
    model = Qwen2ForCausalLM(cfg).eval().to(args.device, dtype)
    return FastForwardLM(TextLM.from_causal_lm(model))


def kv_config(args: argparse.Namespace, name: str, frames: int) -> KVConfig:
    tpf = args.tokens_per_frame
    reserve = max(tpf, (args.retrieve_frames + 4) * tpf)
    if name == "full":  # no eviction: the window holds the whole stream
        budget = 64 + frames * tpf + reserve + tpf
        return KVConfig(policy="sink_window", budget_tokens=budget, sink_tokens=64, reserve_tokens=reserve,
                        rebase_position=max(1 << 16, 2 * budget))
    return KVConfig(**POLICIES[name], budget_tokens=64 + args.window_frames * tpf + reserve, sink_tokens=64,
                    reserve_tokens=reserve, retrieve_tokens=args.retrieve_frames * tpf,
                    offload_bytes=args.offload_mib << 20)


# ---------------------------------------------------------------------------------------------- correctness
@torch.inference_mode()
def plain_greedy(llm: TextLM, pieces: list[torch.Tensor], question: torch.Tensor, n: int) -> list[int]:
    cache, pos = DynamicCache(), 0
    for piece in [*pieces, question]:
        logits = llm.forward(piece[None], cache=cache, position_ids=torch.arange(pos, pos + len(piece),
                                                                                  device=llm.device)[None])
        pos += len(piece)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = llm.forward(llm.embed(torch.tensor([out[-1]]))[None], cache=cache,
                             position_ids=torch.tensor([[pos]], device=llm.device))
        pos += 1
    return out


def correctness(llm: FastForwardLM, args: argparse.Namespace) -> dict:
    """Session tokens == plain full-cache tokens: (a) under budget, (b) evicted + all history retrieved."""
    llm.fast_forward = False
    gen = torch.Generator().manual_seed(1)
    prefix, question = torch.randn(PREFIX_TOKENS, llm.hidden_size, generator=gen), torch.randn(
        QUESTION_TOKENS, llm.hidden_size, generator=gen)
    frames = [torch.randn(8, llm.hidden_size, generator=gen) for _ in range(3)]
    expected = plain_greedy(llm, [prefix, *frames], question, 4)
    checks = {
        "under_budget": KVConfig(policy="offload", budget_tokens=256, sink_tokens=32, reserve_tokens=64,
                                 retrieve_tokens=32, quant="int8"),
        "evicted_all_retrieved": KVConfig(policy="offload", budget_tokens=32 + 16 + 64, sink_tokens=32,
                                          reserve_tokens=64, retrieve_tokens=32, quant="none", rebase_position=1024),
    }
    result = {}
    for name, cfg in checks.items():
        engine = LLMEngine(llm, cfg, 1 << 34)
        engine.open("check", prefix)
        for i, frame in enumerate(frames):
            engine.append("check", frame, {"frame": i})
        got = list(engine.ask("check", question, 4))
        if got != expected:
            sys.exit(f"correctness check {name} failed: session {got} != full cache {expected}")
        result[name] = {"tokens_equal": True, "evicted_blocks": engine.stats("check").evicted_blocks}
    return result


# ---------------------------------------------------------------------------------------------- simulation
def ask_ms(engine: LLMEngine, stream_id: str, question: torch.Tensor, device: str) -> tuple[float, float]:
    """(wall, process CPU) milliseconds from ``ask()`` to the first token; the answer is then closed (rolled back)."""
    t0, c0 = time.perf_counter(), time.process_time()
    answer = engine.ask(stream_id, question, 1)
    next(answer)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = ((time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000)
    answer.close()
    return elapsed


def measure_ttft(engine: LLMEngine, question: torch.Tensor, args: argparse.Namespace) -> dict:
    """TTFT of the live stream and of the frozen 1-minute reference stream, asked alternately (one warm-up each).

    The ratio is the median of the per-pair ratios (each pair runs back to back, under the same machine load).
    """
    gc.collect()
    wall, cpu = {"cam": [], "ref": []}, {"cam": [], "ref": []}
    for i in progress(range(1 + args.repeats), "repeats"):
        for stream_id in ("ref", "cam"):
            w, c = ask_ms(engine, stream_id, question, args.device)
            if i:
                wall[stream_id].append(w)
                cpu[stream_id].append(c)

    def paired(t: dict) -> float:
        return statistics.median(c / r for c, r in zip(t["cam"], t["ref"]))

    return {"best": min(wall["cam"]), "p50": statistics.median(wall["cam"]), "ref_best": min(wall["ref"]),
            "ratio_vs_1min": paired(wall), "cpu_ratio_vs_1min": paired(cpu)}


def simulate(llm: FastForwardLM, args: argparse.Namespace, name: str) -> dict:
    """Feed ``cam`` for the whole stream and ``ref`` for its first minute only; measure at every mark."""
    minutes = min(args.minutes, args.full_minutes) if name == "full" else args.minutes
    frames = minutes * 60
    engine = LLMEngine(llm, kv_config(args, name, frames), 1 << 40)
    gen = torch.Generator().manual_seed(2)
    llm.fast_forward = False
    prefix = torch.randn(PREFIX_TOKENS, llm.hidden_size, generator=gen)
    for stream_id in ("cam", "ref"):
        engine.open(stream_id, prefix)
    question = torch.randn(QUESTION_TOKENS, llm.hidden_size, generator=gen)
    frame = torch.randn(args.tokens_per_frame, llm.hidden_size, generator=gen)
    marks = sorted({m for m in MARKS if m < minutes} | {minutes})
    curve, ttft, at_budget = [], {}, None
    t_start = time.perf_counter()
    for f in range(frames):
        llm.fast_forward = True
        for stream_id in ("cam", "ref") if f < 60 else ("cam",):
            engine.append(stream_id, frame, {"t": f})
        if at_budget is None and name != "full":
            stats = engine.stats("cam")
            if (stats.dropped_blocks if stats.policy == "offload" else stats.evicted_blocks) > 0:
                at_budget = ((f + 1) / 60, stats.used_bytes)
        if (f + 1) % 60 == 0:
            curve.append(engine.stats("cam").used_bytes)
            if (f + 1) // 60 in marks:
                llm.fast_forward = False
                ttft[(f + 1) // 60] = measure_ttft(engine, question, args)
                _report_mark(name, (f + 1) // 60, engine.stats("cam"), ttft[(f + 1) // 60])
    return _result(name, minutes, engine.stats("cam"), at_budget, ttft, curve, time.perf_counter() - t_start)


def _report_mark(name: str, minute: int, stats: SessionStats, t: dict) -> None:
    print(f"  {name:>12} {minute:3d} min: used {stats.used_bytes / 2**20:8.1f} MiB, resident "
          f"{stats.resident_tokens} tok, offloaded {stats.offloaded_blocks} frames, TTFT best {t['best']:.0f} ms "
          f"(1-min stream now {t['ref_best']:.0f} ms, ratio {t['ratio_vs_1min']:.2f}, cpu-time ratio "
          f"{t['cpu_ratio_vs_1min']:.2f})", flush=True)


def _result(name: str, minutes: int, stats: SessionStats, at_budget: tuple[float, int] | None, ttft: dict,
            curve: list[int], seconds: float) -> dict:
    end = ttft[max(ttft)]
    return {
        "policy": name, "minutes": minutes,
        "kv_bytes_at_budget": at_budget[1] if at_budget else None,
        "minute_at_budget": round(at_budget[0], 2) if at_budget else None,
        "kv_bytes_at_end": stats.used_bytes, "kv_bytes_reserved": stats.reserved_bytes,
        "ttft_ms_1min": round(end["ref_best"], 1), "ttft_ms_end": round(end["best"], 1),
        "ttft_ratio": round(end["ratio_vs_1min"], 3),
        "ttft_ms_best": {m: round(v["best"], 1) for m, v in ttft.items()},
        "ttft_ms_p50": {m: round(v["p50"], 1) for m, v in ttft.items()},
        "ttft_ratio_vs_1min": {m: round(v["ratio_vs_1min"], 3) for m, v in ttft.items()},
        "ttft_cpu_time_ratio": round(end["cpu_ratio_vs_1min"], 3),
        "history_minutes_held": round((stats.offloaded_blocks + stats.window_blocks) / 60, 2),
        "retrieved_frames": len(stats.last_retrieval), "rebases": stats.rebases,
        "sim_seconds": round(seconds, 1), "bytes_per_minute": curve,
    }


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        ax1.plot(range(1, len(r["bytes_per_minute"]) + 1), [b / 2**20 for b in r["bytes_per_minute"]],
                 label=r["policy"])
        ratios = r["ttft_ratio_vs_1min"]
        ax2.plot(list(ratios), list(ratios.values()), marker="o", label=r["policy"])
    ax1.set(xlabel="stream minutes (1 fps)", ylabel="KV MiB held (resident + offloaded)", title="KV memory")
    ax2.set(xlabel="stream minutes (1 fps)", ylabel="TTFT / TTFT of a 1-minute stream", yscale="log",
            title="question time to first token (paired, same load)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    args.layers = args.layers or (24 if args.device == "cuda" else 6)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    llm = build_llm(args)
    # token-exact check in float32: greedy argmax over near-uniform random-weight logits flips on bf16 rounding
    check = correctness(llm if llm.dtype == torch.float32 else build_llm(args, torch.float32), args)
    check["dtype"] = "float32"
    names = [n for n in POLICIES if args.policy in ("all", n)]
    results = [simulate(llm, args, name) for name in names]
    if args.plot:
        plot(results, args.plot)
    primary = next(r for r in results if r["policy"] == ("offload_int8" if args.policy == "all" else args.policy))
    summary = {k: v for k, v in primary.items() if k != "bytes_per_minute"}
    summary["results"] = [{k: v for k, v in r.items() if k != "bytes_per_minute"} for r in results]
    summary["correctness"] = check
    summary["simulation"] = {
        "llm": f"Qwen2-0.5B shape, random weights, {args.layers} layers, vocab 4096",
        "dtype": str(llm.dtype), "kv_bytes_per_token": llm.kv_bytes_per_token(),
        "tokens_per_frame": args.tokens_per_frame, "fps": 1, "block": "one frame",
        "window_frames": args.window_frames, "retrieve_frames": args.retrieve_frames,
        "offload_cap_mib": args.offload_mib, "question_tokens": QUESTION_TOKENS, "prefix_tokens": PREFIX_TOKENS,
        "prefill": "fast-forward stub (random KV, real session path) between marks; real network for questions",
        "position_mode": "compact", "full_capped_at_minutes": min(args.minutes, args.full_minutes),
    }
    summary["machine"] = machine_info(args.device)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
