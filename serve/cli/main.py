"""``stc-serve`` command line: make-tiny-model, ask (in-process pipeline), eval, make-bench, and the service commands."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from stream.errors import ConfigError, StcError

REFERENCE_NOTE = ("NOTE: the reference model, trained here on planted shapes only: a test instrument, not a general "
                  "VLM (docs/reference_model.md).")
RANDOM_WEIGHTS_NOTE = "NOTE: built-in tiny model with RANDOM weights -- the answer is meaningless (use --model for a real checkpoint)."


def _add_stream_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--fps", type=float, help="frames per second sampled from the video (default 1)")
    g.add_argument("--chunk", type=int, help="frames per chunk prefilled into the LLM as they arrive (default 8)")
    g = p.add_argument_group("STC cacher (ViT feature reuse)")
    g.add_argument("--no-cache", action="store_true", help="encode every frame fully")
    g.add_argument("--no-gate", action="store_true",
                   help="encode every frame, also near-identical ones (frame gate off)")
    g.add_argument("--cache-ratio", type=float, help="fraction of tokens recomputed per layer (0 < r <= 1)")
    g.add_argument("--cache-threshold", type=float, help="frame-signature similarity needed to reuse a reference")
    g = p.add_argument_group("pruner (visual tokens before the LLM)")
    g.add_argument("--no-prune", action="store_true", help="keep every visual token")
    g.add_argument("--budget", type=int, help="visual tokens kept per frame")
    g.add_argument("--policy", help="pruning policy (stc, stc_adaptive, uniform, random, temporal_diff, attention, keep_all)")
    g = p.add_argument_group("KV cache")
    g.add_argument("--kv-budget", type=int, help="per-stream KV budget in tokens (under it, answers equal a full cache)")
    g.add_argument("--kv-policy", help="what leaves the KV budget: sink_window (dropped) or offload (CPU + retrieval)")


FAMILY_CHOICES = ["llava_onevision", "smolvlm", "qwen2_5_vl", "qwen3_vl"]  # == stream.models.tiny.FAMILIES


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="tiny-model folder, checkpoint path or hub id (default: built-in tiny model); "
                   "'reference': the small model trained here on planted shapes (a test instrument)")
    p.add_argument("--family", default="llava_onevision", choices=FAMILY_CHOICES,
                   help="family of the built-in tiny model when --model is not given")
    p.add_argument("--device", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--config", type=Path, help="service YAML config (flags override it)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags -> nested overrides for ServiceConfig (only the flags that were given)."""
    o: dict[str, dict[str, Any]] = {"model": {}, "sampler": {}, "cacher": {}, "pruner": {}, "kv": {}}
    if getattr(args, "model", None):
        o["model"]["name"] = args.model
    elif getattr(args, "family", "llava_onevision") != "llava_onevision":
        o["model"]["name"] = f"tiny-{args.family}"
    for flag, section, key in (("device", "model", "device"), ("dtype", "model", "dtype"), ("fps", "sampler", "fps"),
                               ("chunk", "sampler", "frames_per_chunk"), ("cache_ratio", "cacher", "ratio"),
                               ("cache_threshold", "cacher", "threshold"), ("budget", "pruner", "tokens_per_frame"),
                               ("policy", "pruner", "policy"), ("kv_budget", "kv", "budget_tokens"),
                               ("kv_policy", "kv", "policy"), ("max_new_tokens", "model", "max_new_tokens")):
        value = getattr(args, flag, None)
        if value is not None:
            o[section][key] = value
    if getattr(args, "no_cache", False):
        o["cacher"]["enabled"] = False
    if getattr(args, "no_gate", False):
        o["cacher"]["gate"] = {"enabled": False}
    if getattr(args, "no_prune", False):
        o["pruner"]["enabled"] = False
    return {k: v for k, v in o.items() if v}


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from stream.models import make_tiny_model

    path = make_tiny_model(args.dir, args.family, seed=args.seed)
    print(f"saved a tiny {args.family} model with RANDOM weights to {path} "
          f"(load with --model {path}; from_pretrained(..., local_files_only=True) works too)")
    return 0


def _ask_options(text: str | None) -> list[str]:
    """``--options "red,green,blue"`` -> the option texts (2-10 of them)."""
    if text is None:
        return []
    options = [o.strip() for o in text.split(",") if o.strip()]
    if not 2 <= len(options) <= 10:
        raise ConfigError(f"--options {text!r} gives {len(options)} option(s); allowed: 2-10 comma-separated texts. "
                          "Fix: e.g. --options \"red,green,blue\"")
    return options


def cmd_ask(args: argparse.Namespace) -> int:
    from serve.core.config import ServiceConfig
    from serve.core.pipeline import StreamPipeline
    from stream.models import load_adapter
    from stream.sources import open_source

    cfg = ServiceConfig.load(args.config, _overrides(args))
    adapter = load_adapter(cfg.model.name, cfg.model.device, cfg.model.dtype)
    random_weights = bool(getattr(adapter, "random_weights", False))
    if random_weights and not args.json:
        print(RANDOM_WEIGHTS_NOTE, file=sys.stderr)
    if getattr(adapter, "reference", False) and not args.json:
        print(REFERENCE_NOTE, file=sys.stderr)
    pipe = StreamPipeline(adapter, cfg.stream_options(), cfg.kv_replica_budget_bytes())
    sid = pipe.open("cli")
    from tqdm import tqdm  # noqa: PLC0415

    question, options = args.question, _ask_options(args.options)
    if options:
        from serve.eval.bench import mc_prompt, parse_choice

        question = mc_prompt(question, options)
    with open_source(args.video, cfg.source) as source:  # progress bar on stderr only when interactive, never with --json
        with tqdm(source, desc="frames decoded", unit="f", file=sys.stderr,
                  disable=args.json or not sys.stderr.isatty()) as frames:
            upto = frames if args.until is None else itertools.takewhile(lambda f: f.pts <= args.until, frames)
            stats = pipe.ingest(sid, upto)
    pieces = []
    if not args.json:
        print("answer: ", end="", flush=True)
    for piece in pipe.ask(sid, question, cfg.model.max_new_tokens):
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    pipe.shutdown()  # the step loop's thread ends before the interpreter does
    out = {"answer": "".join(pieces), **stats.as_dict(), "model": adapter.source, "family": adapter.family,
           "random_weights": random_weights}
    if options:
        letter = parse_choice(out["answer"], len(options))
        out["choice"] = None if letter is None else options["ABCDEFGHIJ".index(letter)]
    if args.json:
        print(json.dumps(out))
    else:
        print(f" ({out['choice']})" if options else "")
        keys = ("frames", "chunks", "visual_tokens", "visual_tokens_in", "vit_ms", "prune_ms", "prefill_ms",
                "ttft_ms", "decode_ms", "new_tokens", "kv_tokens", "kv_bytes")
        print("stats: " + ", ".join(f"{k}={out[k]}" for k in keys))
        if out["cache"]:
            print("cache: " + json.dumps(out["cache"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from serve.core.config import ServiceConfig
    from serve.eval import EvalRunner, compression_off, load_bench, plot_report, resolve_video, results_json, summarize
    from stream.models import load_adapter

    cfg = ServiceConfig.load(args.config, _overrides(args))
    items = load_bench(args.bench, args.format)[: args.limit]
    for item in items:  # every video must exist before anything is encoded
        resolve_video(item, args.videos)
    adapter = load_adapter(cfg.model.name, cfg.model.device, cfg.model.dtype)
    random_weights = bool(getattr(adapter, "random_weights", False))
    if random_weights:
        print(RANDOM_WEIGHTS_NOTE.replace("the answer is", "answers and accuracy are"), file=sys.stderr)
    settings = {"configured": cfg.stream_options()}
    if args.compare == "off":
        settings["off"] = compression_off(settings["configured"])
    runner = EvalRunner(adapter, settings, cfg.source, cfg.kv_replica_budget_bytes(), args.max_new_tokens)
    results = runner.run(items, args.videos, progress=lambda m: print(m, file=sys.stderr, flush=True))
    for pipe in runner.pipelines.values():  # the step loops' threads end before the interpreter does
        pipe.shutdown()
    summary = summarize(results, list(settings))
    report = {"bench": str(args.bench), "format": args.format, "questions": len(items), "model": adapter.source,
              "family": adapter.family, "random_weights": random_weights, "settings": summary,
              "options": {k: v.model_dump(exclude={"kv"}) for k, v in settings.items()}}
    if args.out:
        Path(args.out).write_text(json.dumps({**report, "results": results_json(results)}, indent=1))
    if args.plot:
        plot_report(summary, args.plot, f"{Path(args.bench).name} ({args.format}), {adapter.source}"
                    + (", RANDOM weights" if random_weights else ""))
    for name, s in summary.items():
        acc = s["accuracy"]
        tasks = ", ".join(f"{t} {v['accuracy']:.3f} ({v['n']})" for t, v in sorted(acc["per_task"].items()))
        print(f"{name}: accuracy {acc['overall']:.4f} (task mean {acc['task_mean']:.4f}); {tasks}")
    print(json.dumps(report))
    return 0


def cmd_make_bench(args: argparse.Namespace) -> int:
    from serve.eval.synth import make_bench

    print(json.dumps(make_bench(args.out_dir, args.seed, args.videos, args.items, args.split)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stc-serve", description="Let a video-LLM watch live video cheaply.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="build a tiny random-weight model + tokenizer offline")
    p.add_argument("dir", type=Path)
    p.add_argument("--family", default="llava_onevision", choices=FAMILY_CHOICES)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("ask", help="stream a video through the pipeline chunk by chunk, then ask a question")
    p.add_argument("video", help="video file, rtsp:// or http(s):// URL")
    p.add_argument("question")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streamed text")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--options", metavar="A,B,...", help="ask a multiple-choice question: comma-separated options, "
                   "lettered A, B, ... in the benchmarks' prompt; the chosen option is printed after the answer")
    p.add_argument("--until", type=float, metavar="SECONDS", help="stream only the video's first SECONDS, then ask")
    _add_model_flags(p)
    _add_stream_flags(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", help="streaming accuracy on an OVO-Bench or StreamingBench file, compression vs off",
                       description="Stream each benchmark video through the pipeline up to each question's time, "
                       "ask the question there, score it as the benchmark does; with --compare off also with the "
                       "cacher and pruner switched off, in the same run.")
    p.add_argument("--bench", required=True, type=Path, help="benchmark JSON file")
    p.add_argument("--format", required=True, choices=["ovo", "streamingbench"], help="the file's format")
    p.add_argument("--videos", required=True, type=Path, help="folder holding the benchmark's videos")
    p.add_argument("--compare", choices=["off", "none"], default="off",
                   help="also run with compression off (default) or only the configured compression")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--out", type=Path, help="write the full report (every answer) as JSON here")
    p.add_argument("--plot", type=Path, help="write accuracy per task and cost ratios as PNG here")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length (default 16)")
    _add_model_flags(p)
    _add_stream_flags(p)
    p.set_defaults(func=cmd_eval)

    from serve.eval.synth import build_parser as bench_parser

    p = sub.add_parser("make-bench", parents=[bench_parser()], add_help=False, description=bench_parser().description,
                       help="write a seeded synthetic streaming benchmark (clips + OVO-Bench/StreamingBench files)")
    p.set_defaults(func=cmd_make_bench)

    try:
        from serve.cli.service import add_service_commands
    except ImportError:  # the service commands need the serve extras (ray[serve])
        add_service_commands = None
    if add_service_commands is not None:
        add_service_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StcError as exc:
        print(f"stc-serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
