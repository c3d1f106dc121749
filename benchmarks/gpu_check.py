#!/usr/bin/env python
"""Run every CUDA path and headline benchmark once, on one GPU, and say plainly what passed.

    bash benchmarks/gpu_check.sh                        # one H100/H200-class GPU, real-size shapes, bf16, < 8 min
    bash benchmarks/gpu_check.sh --device cpu --smoke   # the same checks with tiny shapes on CPU (CI, < 2 min)
    python benchmarks/gpu_check.py --only cacher_so400m,bound --out /tmp/gpu_check

Each check runs as its own process (a crash or hang is that check's failure, with a timeout), under one overall time
budget. Per check one JSON line is printed as it finishes (status ``pass`` / ``fail`` / ``skipped``, the reason,
seconds, the headline figures from the benchmark's own last JSON line, peak GPU memory), then a summary table, and
last one JSON object with every check and the machine. Exit status 1 when any check failed.

Peak GPU memory: single-process benchmarks run under a small wrapper that reports
``torch.cuda.max_memory_allocated()`` at exit; for every check, ``nvidia-smi`` is polled for per-process use, so the
service's vision and LLM replicas (Ray worker processes) are reported each on its own.

Benchmarks that other work adds are picked up when present and reported ``skipped: not present`` otherwise:
``bench_engine.py`` (64 streams, 7B shape) and a Qwen tower in ``bench_cacher.py --family qwen2_5_vl``. Their
options are read from ``--help``. All models have RANDOM weights; the figures are speed and memory only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_support import (REPO, Context, Fail, Plan, Result, Skip, help_text, pick, prepare,  # noqa: E402
                                    run_check, service_model)


# ---- the checks -----------------------------------------------------------------------------------------------------
def plan_pytest(ctx: Context) -> Plan:
    junit = ctx.out / "pytest_cuda.xml"
    cmd = [ctx.python, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
           str(REPO / "tests" / "test_cuda.py")]

    def judge(rc: int, _: dict | None, log: str) -> str | None:
        counts = junit_counts(junit)
        if rc not in (0,) or counts.get("failures", 0) or counts.get("errors", 0):
            return f"pytest exit {rc}: {counts}"
        if ctx.cuda and counts.get("skipped", 0):
            return f"CUDA tests skipped on a CUDA run: {counts}"
        if not counts.get("tests"):
            return "no CUDA tests collected"
        return None

    return Plan(cmd, 180 if ctx.cuda else 60, lambda _: junit_counts(junit), judge,
                note="" if ctx.cuda else "no CUDA here: every test must skip cleanly")


def junit_counts(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}


def plan_cacher(ctx: Context, family: str | None = None) -> Plan:
    if family is not None:
        text = help_text(ctx, "bench_cacher.py") or ""
        if family not in text:
            raise Skip(f"not present: bench_cacher.py has no --family {family}")
    args = ["--video", str(ctx.video), "--device", ctx.device, "--dtype", ctx.dtype, "--setting",
            "ratio=0.15"]  # the defaults (rolling, key sketch 128, region refresh)
    args += ["--family", family] if family else []
    if ctx.smoke:
        args += ["--frames", "4", "--chunk", "2", "--sweep", "", "--layers", "1", "--threads", "1", "--clock", "cpu"]
    else:
        args += ["--frames", "32", "--chunk", "8", "--sweep", "ratio=0.15,key_sketch=none", "--clock", "wall",
                 "--passes", "2"]
    keys = ("time_ratio", "flop_ratio", "fidelity", "full_s_per_frame", "exact_max_diff", "recompute_fraction",
            "store_mb", "dtype", "layers")
    return Plan(ctx.script("bench_cacher.py", *args), 120 if ctx.cuda else 60, lambda o: pick(o, *keys))


def plan_pruner(ctx: Context) -> Plan:
    args = ["--video", str(ctx.video), "--device", ctx.device, "--dtype", ctx.dtype, "--budget", "49"]
    args += (["--llm-shape", "tiny", "--frames", "4", "--chunk", "2", "--repeats", "1"] if ctx.smoke
             else ["--llm-shape", "qwen2-7b", "--frames", "16", "--chunk", "8", "--repeats", "5"])
    keys = ("llm_shape", "dtype", "seq_len_full", "seq_len_pruned", "prefill_full_s", "prefill_pruned_s",
            "prefill_ratio", "select_ms", "kl_mean")
    return Plan(ctx.script("bench_pruner.py", *args), 120 if ctx.cuda else 60, lambda o: pick(o, *keys))


def _first_option(text: str, candidates: list[tuple[str, str]]) -> list[str]:
    """The first ``(flag, value)`` whose flag (and value, if any) appears in a ``--help`` text."""
    for flag, value in candidates:
        if re.search(rf"(^|\s){re.escape(flag)}[\s=,]", text) and (not value or value in text):
            return [flag, value] if value else [flag]
    return []


def plan_engine(ctx: Context) -> Plan:
    text = help_text(ctx, "bench_engine.py")
    if text is None:
        raise Skip("not present: benchmarks/bench_engine.py (batched engine) is not in this checkout")
    args = ["--streams", "2" if ctx.smoke else "64", "--device", ctx.device, "--dtype", ctx.dtype]
    args += ["--shape", "tiny", "--context", "64", "--new-tokens", "2"] if ctx.smoke else ["--shape", "qwen2-7b"]
    keys = ("streams", "decode_tokens_per_s_batched", "decode_tokens_per_s_serial", "throughput_ratio",
            "ttft_p50_ms", "ttft_p99_ms", "ttft_p99_ratio", "exact_match", "llm_shape", "shape")

    def judge(rc: int, out: dict | None, log: str) -> str | None:
        if rc != 0:
            return f"exit {rc}"
        if out and out.get("exact_match") is False:
            return "batched answers differ from serial ones (exact_match false)"
        return None

    return Plan(ctx.script("bench_engine.py", *args), 150 if ctx.cuda else 60, lambda o: pick(o, *keys), judge)


def plan_kv(ctx: Context) -> Plan:
    args = ["--device", ctx.device, "--dtype", ctx.dtype]
    args += (["--minutes", "1", "--layers", "1", "--policy", "sink_window", "--repeats", "1"] if ctx.smoke
             else ["--minutes", "60", "--policy", "offload_int8", "--repeats", "5"])
    keys = ("policy", "minutes", "kv_bytes_at_budget", "kv_bytes_at_end", "ttft_ms_1min", "ttft_ms_end", "ttft_ratio",
            "history_minutes_held")
    return Plan(ctx.script("bench_kv.py", *args), 150 if ctx.cuda else 60, lambda o: pick(o, *keys))


def plan_service(ctx: Context, streams: int) -> Plan:
    if ctx.smoke and streams > 16:
        raise Skip("smoke mode runs one service size (16 -> 1 stream): each start of Ray costs ~20 s of CPU")
    n = 1 if ctx.smoke else streams
    args = ["--device", ctx.device, "--dtype", ctx.dtype, "--streams", str(n), "--push-fps", "1", "--fps", "1",
            "--chunk", "2" if ctx.smoke else "4", "--ask-every", "1.5" if ctx.smoke else "5",
            "--seconds", "3" if ctx.smoke else "30"]
    if ctx.cuda and ctx.service_model is None:  # built once, on first use
        try:
            ctx.service_model = str(service_model(ctx.out / "models" / "llava-ov-so400m-qwen2-0.5b"))
        except Exception as exc:  # noqa: BLE001 - reported as this check's failure
            raise Fail(f"could not build the service's model folder: {exc!r}") from None
    if ctx.service_model:
        args += ["--model", ctx.service_model]
    keys = ("streams", "frames_per_s", "dropped_frames", "questions", "ttft_p50_ms", "ttft_p99_ms",
            "ttft_p50_load_over_idle", "errors", "rss_mb_start", "rss_mb_end", "model")

    def judge(rc: int, out: dict | None, log: str) -> str | None:
        if rc != 0:
            return f"exit {rc}"
        if out and out.get("errors"):
            return f"{out['errors']} request errors under load"
        if out and not out.get("questions"):
            return "no question was answered under load"
        return None

    return Plan(ctx.script("bench_service.py", *args), (200 if streams > 16 else 120) if ctx.cuda else 150,
                lambda o: pick(o, *keys), judge)


def plan_bound(ctx: Context) -> Plan:
    args = ["--device", ctx.device, "--dtype", ctx.dtype] + (["--smoke"] if ctx.smoke else [])

    def figures(o: dict) -> dict:
        return {**o.get("measured", {}), "fraction_of_bound": o.get("fraction_of_bound"),
                "bound_frames_per_s": {g: b["frames_per_s"] for g, b in o.get("bound", {}).items()}}

    return Plan(ctx.script("bench_bound.py", *args), 120 if ctx.cuda else 60, figures)


CHECKS: dict[str, Callable[[Context], Plan]] = {  # run in this order: the cheap, most telling ones first
    "pytest_cuda": plan_pytest,
    "bound": plan_bound,
    "cacher_so400m": plan_cacher,
    "cacher_qwen2_5_vl": lambda ctx: plan_cacher(ctx, "qwen2_5_vl"),
    "pruner_7b": plan_pruner,
    "engine_64_streams": plan_engine,
    "service_16": lambda ctx: plan_service(ctx, 16),
    "kv_60min": plan_kv,
    "service_64": lambda ctx: plan_service(ctx, 64),
}




# ---- driver ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and short runs (what CI runs on CPU)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall time budget (default 480 s on cuda, 300 s with --smoke); checks not started in time "
                        "fail")
    p.add_argument("--out", type=Path, default=None, help="folder for logs (default: a new one under /tmp)")
    p.add_argument("--video", default=None, help="input video (default: ../shared/media/vtest.avi, else synthetic)")
    p.add_argument("--service-model", default=None,
                   help="model folder for the service checks (default on cuda: SigLIP-so400m + Qwen2-0.5B shape, "
                        "random weights, built once under --out; with --smoke the built-in tiny model)")
    args = p.parse_args(argv)
    unknown = sorted(set(filter(None, args.only.split(","))) - set(CHECKS))
    if unknown:
        p.error(f"--only: unknown check(s) {unknown}; allowed: {', '.join(CHECKS)}")
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu runs real-size shapes for hours on a CPU. Fix: add --smoke (tiny shapes).")
    return args


def table(results: list[Result]) -> str:
    """A fixed-width summary: check, status, seconds, peak GPU MiB (largest process), headline figures."""
    rows = [("check", "status", "s", "peak GPU MiB", "figures / reason")]
    for r in results:
        peak = f"{max(r.peak_gpu_mib.values()):.0f}" if r.peak_gpu_mib else "-"
        shown = r.reason if r.status != "pass" else ", ".join(f"{k}={_short(v)}" for k, v in r.figures.items())
        rows.append((r.check, r.status, f"{r.seconds:.0f}", peak, shown[:110]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.common import machine_info

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (CPU build or no driver). Fix: install the "
              "CUDA build of torch, or run `bash benchmarks/gpu_check.sh --device cpu --smoke`.", file=sys.stderr)
        return 2
    out = args.out or Path("/tmp") / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.device, args.smoke, out, service_model=args.service_model)
    budget = args.budget_s or (300.0 if args.smoke else 480.0)
    t_start = time.monotonic()
    prepare(ctx, args.video)
    names = [n for n in CHECKS if not args.only or n in args.only.split(",")]
    results: list[Result] = []
    for name in names:
        left = budget - (time.monotonic() - t_start)
        try:
            plan = CHECKS[name](ctx)
        except Skip as why:
            result = Result(name, "skipped", str(why))
        except Fail as why:
            result = Result(name, "fail", str(why))
        else:
            if left < 5:
                result = Result(name, "fail", f"not started: the {budget:.0f} s budget was spent")
            else:
                result = run_check(name, plan, min(plan.timeout_s, left), ctx)
        results.append(result)
        print(json.dumps(result.line()), flush=True)
    print("\n" + table(results) + "\n", flush=True)
    failed = [r.check for r in results if r.status == "fail"]
    summary = {"bench": "gpu_check", "device": args.device, "smoke": args.smoke, "random_weights": True,
               "seconds": round(time.monotonic() - t_start, 1), "budget_s": budget, "video": str(ctx.video),
               "service_model": ctx.service_model or "built-in tiny LLaVA-OneVision",
               "passed": sum(r.status == "pass" for r in results), "failed": failed,
               "skipped": [r.check for r in results if r.status == "skipped"],
               "checks": [r.line() for r in results], "out": str(out), "machine": machine_info(args.device)}
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
