#!/usr/bin/env python
"""Continuous batching of the shared LLM engine: N streams' questions and chunks batched vs serialised, one run.

    python benchmarks/bench_engine.py --streams N [--context T] [--new-tokens K] [--device cpu|cuda] [--plot out.png]

What is measured (all reported in the JSON ``simulation`` field):

* LLM: the Qwen2-0.5B shape (24 layers, hidden 896, 14 heads, 2 kv heads, intermediate 4864, vocab 151936) with
  RANDOM weights, fp32 on cpu (bf16 on cuda); ``--layers`` for quick runs.
* Context: each of N streams gets a 16-token prefix and ``--context`` tokens in chunks of ``--chunk`` tokens through
  the real session path (blocks, window, budget); the chunks' keys/values are random
  (:class:`cache.kv.stub.FastForwardLM`) -- the attention work of every later step is the same as with real KV.
* Questions: N questions of ``--question`` tokens, then ``--new-tokens`` greedy tokens each (EOS never stops them).
  ``decode_tokens_per_s_*`` count the tokens after each answer's first one over the decode phase (batched: from
  the last first-token to the last token; serial: the sum of each answer's first-to-last time), comparable with the
  plain-HF decode ratio; ``answer_tokens_per_s_*`` = all tokens over the whole burst (question prefills included).
  *Batched*: all N are asked at once (one burst, the engine's step loop batches them). *Serial*: the same
  questions, one at a time to the end (a batch-1 engine, as before this engine). TTFT of question i = from the
  burst's start to its first token (serial: question i waits for the i-1 before it). ``exact_match``: batched
  answers == serial answers, token for token.
* Chunks: N arriving chunks (one per stream, ``--chunk`` tokens), batched (one burst) vs one at a time;
  ``prefill_ratio_batched_vs_serial`` = batched time / serial time (< 1 = batching helps).
* Plain-HF limit, same run: decode steps of a plain ``DynamicCache`` at batch N vs batch 1 over ``--context`` tokens
  (``hf_dynamic_cache_ratio`` = tokens/s at batch N / tokens/s at batch 1).
* Clock: ``--clock cpu`` (default) = process CPU time with one torch thread (the loop thread does all the model
  work; client threads only wait), robust on a shared CPU; ``--clock wall`` = wall time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/<script>.py`

from benchmarks.common import machine_info  # noqa: E402
from cache.kv import KVConfig, LLMEngine  # noqa: E402
from cache.kv.config import SchedulerConfig  # noqa: E402
from stream.models.llm import TextLM  # noqa: E402
from tests.kv_doubles import FastForwardLM  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                 tie_word_embeddings=True, rope_theta=1_000_000.0)
# name -> (config, default layers, default vocab); "tiny" is for smoke runs only
SHAPES = {
    "qwen2-0.5b": (QWEN2_05B, 24, 151936),
    "qwen2-7b": (dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                      tie_word_embeddings=False, rope_theta=1_000_000.0), 28, 152064),
    "tiny": (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  tie_word_embeddings=True, rope_theta=10_000.0), 2, 512),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=8, help="N streams (and N concurrent questions)")
    ap.add_argument("--context", type=int, default=1024, help="context tokens per stream before the questions")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per answer")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--plot", default=None, help="write TTFT per question (batched vs serial) here (png)")
    ap.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES), help="LLM shape (random weights)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 24 for 0.5B)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the shape's)")
    ap.add_argument("--question", type=int, default=16, help="tokens per question")
    ap.add_argument("--chunk", type=int, default=64, help="tokens per chunk (context fill and arriving chunks)")
    ap.add_argument("--hf-steps", type=int, default=4, help="timed plain-HF decode steps per batch size")
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads on cpu")
    args = ap.parse_args()
    _, layers, vocab = SHAPES[args.shape]
    args.layers = args.layers or layers
    args.vocab = args.vocab or vocab
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def build_llm(args: argparse.Namespace) -> FastForwardLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[args.shape][0], num_hidden_layers=args.layers, vocab_size=args.vocab,
                      max_position_embeddings=1 << 20)
    dtype = getattr(torch, args.dtype)
    model = Qwen2ForCausalLM(cfg).eval().to(args.device, dtype)
    return FastForwardLM(TextLM.from_causal_lm(model))


def make_clock(args: argparse.Namespace):
    if args.clock == "wall":
        return time.perf_counter
    if args.device == "cuda":
        raise SystemExit("--clock cpu measures CPU time; use --clock wall with --device cuda")
    return time.process_time


def sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def burst(engine: LLMEngine, jobs: list, clock, args) -> tuple[float, list[float], list]:
    """Run ``jobs`` (callables returning a result, calling ``mark()`` at their first output) all at once."""
    marks, results = [None] * len(jobs), [None] * len(jobs)
    threads = []
    with engine.scheduler.hold():
        start = clock()
        for i, job in enumerate(jobs):
            def run(i=i, job=job):
                results[i] = job(lambda: marks.__setitem__(i, clock()) if marks[i] is None else None)
            threads.append(threading.Thread(target=run))
            threads[-1].start()
        while engine.scheduler.queued() < len(jobs):
            time.sleep(0.001)
    for t in threads:
        t.join()
    sync(args)
    return clock() - start, [m - start for m in marks if m is not None], results


def ask_job(engine: LLMEngine, name: str, question: torch.Tensor, k: int, clock):
    """Returns (tokens, clock at the first token, clock at the last token)."""
    def job(mark):
        out, first = [], None
        for token in engine.ask(name, question, k):
            mark()
            first = first if first is not None else clock()
            out.append(token)
        return out, first, clock()
    return job


def append_job(engine: LLMEngine, name: str, chunk: torch.Tensor):
    def job(mark):
        engine.append(name, chunk)
        mark()
    return job


@torch.inference_mode()
def hf_ratio(llm: TextLM, n: int, args: argparse.Namespace, clock) -> dict:
    """Plain HF: tokens/s of decode steps over a ``DynamicCache`` of ``context`` tokens, batch n vs batch 1."""
    out = {}
    for batch in sorted({1, n}):
        cache = DynamicCache()
        kv = torch.randn(batch, llm.num_kv_heads, args.context, llm.head_dim, device=llm.device, dtype=llm.dtype)
        for layer in range(llm.num_layers):
            cache.update(kv.clone(), kv.clone(), layer)
        x = torch.randn(batch, 1, llm.hidden_size, device=llm.device, dtype=llm.dtype)
        llm.forward(x, cache=cache)  # warm-up
        sync(args)
        start = clock()
        for _ in range(args.hf_steps):
            llm.forward(x, cache=cache)
        sync(args)
        out[batch] = batch * args.hf_steps / (clock() - start)
    return {"hf_tokens_per_s_batch1": out[1], "hf_tokens_per_s_batchN": out[n],
            "hf_dynamic_cache_ratio": out[n] / out[1]}


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    clock, n, k = make_clock(args), args.streams, args.new_tokens
    llm = build_llm(args)
    gen = torch.Generator().manual_seed(1)
    d = llm.hidden_size
    chunk_tokens = args.chunk
    budget = 16 + args.context + 2 * chunk_tokens + (args.question + k + chunk_tokens)
    reserve = max(args.question + k, chunk_tokens) + 8
    cfg = KVConfig(policy="sink_window", budget_tokens=budget, sink_tokens=16, reserve_tokens=reserve, quant="none",
                   rebase_position=max(1 << 16, 2 * budget),
                   scheduler=SchedulerConfig(max_batch_rows=max(n, 1), token_budget=max(512, n * chunk_tokens)))
    serial_cfg = cfg.model_copy(update={"scheduler": SchedulerConfig(max_batch_rows=1, token_budget=512)})
    engine = LLMEngine(llm, cfg, 1 << 40)
    names = [f"cam{i}" for i in range(n)]
    # 1. filled contexts through the real session path (random KV)
    llm.fast_forward = True
    for name in names:
        engine.open(name, torch.randn(16, d, generator=gen))
        for _ in range(args.context // chunk_tokens):
            engine.append(name, torch.randn(chunk_tokens, d, generator=gen))
    llm.fast_forward = False
    questions = [torch.randn(args.question, d, generator=gen) * 0.5 for _ in names]
    # warm-up (allocator, kernels): a short answer on every stream, batched and alone
    burst(engine, [ask_job(engine, nm, q, 3, clock) for nm, q in zip(names, questions)], clock, args)
    list(engine.ask(names[0], questions[0], 3))
    # 2. N concurrent questions: batched
    jobs = [ask_job(engine, nm, q, k, clock) for nm, q in zip(names, questions)]
    t_batched, ttft, results = burst(engine, jobs, clock, args)
    answers = [r[0] for r in results]
    decode_time_b = max(r[2] for r in results) - max(r[1] for r in results)  # after every first token
    # 3. the same questions one at a time (batch-1 engine over the same streams)
    batched_scheduler = engine.scheduler
    engine.scheduler = type(batched_scheduler)(llm, serial_cfg.scheduler)
    start, ttft_serial, serial_answers, decode_time_s = clock(), [], [], 0.0
    for nm, q in zip(names, questions):
        out = []
        for token in engine.ask(nm, q, k):
            if not out:
                first = clock()
                ttft_serial.append(first - start)
            out.append(token)
        decode_time_s += clock() - first
        serial_answers.append(out)
    sync(args)
    t_serial = clock() - start
    # 4. N arriving chunks: one at a time, then batched
    start = clock()
    for nm in names:
        engine.append(nm, torch.randn(chunk_tokens, d, generator=gen))
    sync(args)
    t_prefill_serial = clock() - start
    engine.scheduler = batched_scheduler
    chunks = [torch.randn(chunk_tokens, d, generator=gen) for _ in names]
    t_prefill_batched, _, _ = burst(engine, [append_job(engine, nm, c) for nm, c in zip(names, chunks)], clock, args)
    # 5. the plain-HF limit, same run
    hf = hf_ratio(llm, n, args, clock)
    tokens, tokens_serial = sum(len(a) for a in answers), sum(len(a) for a in serial_answers)
    p99 = lambda xs: sorted(xs)[max(0, int(round(0.99 * len(xs))) - 1)]  # noqa: E731
    decode_b, decode_s = (tokens - n) / decode_time_b, (tokens_serial - n) / decode_time_s
    result = {
        "streams": n,
        "decode_tokens_per_s_batched": round(decode_b, 3),
        "decode_tokens_per_s_serial": round(decode_s, 3),
        "throughput_ratio": round(decode_b / decode_s, 3),
        "answer_tokens_per_s_batched": round(tokens / t_batched, 3),
        "answer_tokens_per_s_serial": round(tokens_serial / t_serial, 3),
        "answer_throughput_ratio": round(tokens / t_batched / (tokens_serial / t_serial), 3),
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p99_ms": round(1000 * p99(ttft), 1),
        "ttft_p50_ms_serial": round(1000 * statistics.median(ttft_serial), 1),
        "ttft_p99_ms_serial": round(1000 * p99(ttft_serial), 1),
        "ttft_p99_ratio": round(p99(ttft) / p99(ttft_serial), 3),
        "prefill_ratio_batched_vs_serial": round(t_prefill_batched / t_prefill_serial, 3),
        "exact_match": answers == serial_answers,
        "hf_dynamic_cache_ratio": round(hf["hf_dynamic_cache_ratio"], 3),
        "hf_tokens_per_s_batch1": round(hf["hf_tokens_per_s_batch1"], 3),
        "hf_tokens_per_s_batchN": round(hf["hf_tokens_per_s_batchN"], 3),
        "scheduler": vars(batched_scheduler.snapshot()),
        "clock": "process CPU time, 1 torch thread" if args.clock == "cpu" else "wall",
        "simulation": {"shape": args.shape, "layers": args.layers, "vocab": args.vocab, "context": args.context, "new_tokens": k,
                       "question_tokens": args.question, "chunk_tokens": chunk_tokens, "weights": "random",
                       "context_kv": "random (FastForwardLM), real session path", "dtype": str(llm.dtype)},
        "machine": machine_info(args.device),
    }
    if args.plot:
        plot(ttft, ttft_serial, args.plot)
    print(json.dumps(result))


def plot(ttft: list[float], ttft_serial: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sorted(1000 * t for t in ttft), "o-", label="batched (step loop)")
    ax.plot(sorted(1000 * t for t in ttft_serial), "s-", label="serial (one at a time)")
    ax.set_xlabel("question (sorted by TTFT)")
    ax.set_ylabel("time to first token (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
