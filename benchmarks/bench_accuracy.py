"""Accuracy, not proxies: every compression knob on the synthetic streaming benchmark, against compression off.

Streams the test split of ``stc-serve make-bench`` (real footage with planted shapes, answers known) through the
in-process pipeline -- the stages the service runs -- once per setting, video by video (settings interleaved, so
they see the same machine load), asks every question at its time and scores it as OVO-Bench does
(``serve.eval``). Every setting answers the same items. Reports, per setting:

* accuracy per task kind with a 95 % Wilson interval: real-time perception (``ATR STU OJR``), backward tracing
  inside and beyond the KV window (``EPM`` by its ``T_s`` against the window, ``ASI``), forward counting (``REC``)
  and the yes/no watch (``CRR``);
* accuracy retained (correct answers / those with compression off) and the cost at question time relative to
  compression off (ViT ms, visual tokens, prefill ms, KV bytes, time to first token).

Groups of settings (``--groups``): ``cacher`` (ratio sweep, pruner off), ``pruner`` (policies at one budget, and the
default policy at 50 % and 75 % of the tokens; cacher off), ``kv`` (a window far shorter than the clips:
``sink_window`` forgets, ``offload`` + retrieval recalls, int8 / int4 storage), ``default`` (the shipped defaults).
Meant for the reference model (``--model reference``, trained here on planted shapes: a test instrument, not a
general VLM). Prints one JSON line last; ``--plot`` writes a PNG.

    python benchmarks/bench_accuracy.py --groups default cacher pruner kv --plot docs/accuracy.png
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/<script>.py`

from benchmarks.common import machine_info  # noqa: E402
from serve.core.config import ServiceConfig  # noqa: E402
from serve.core.options import StreamOptions  # noqa: E402
from serve.eval import EvalRunner, ItemResult, compression_off, load_bench  # noqa: E402
from serve.eval.bench import wilson  # noqa: E402
from serve.eval.synth import make_bench  # noqa: E402
from serve.eval.synth_items import TASK_KINDS  # noqa: E402
from stream.models import load_adapter  # noqa: E402

COST_KEYS = ("vit_ms", "visual_tokens", "prefill_ms", "kv_bytes", "ttft_ms")


def settings_for(groups: list[str], base: StreamOptions, window_tokens: int) -> dict[str, StreamOptions]:
    """Setting name -> stream options; ``off`` (compression off) first, it is the baseline."""
    off = compression_off(base)
    out = {"off": off}
    if "default" in groups:
        out["default"] = base
        out["int8 KV window only"] = off.merged({"kv": {"window_quant": "int8"}})
    if "cacher" in groups:
        out["gate only"] = base.merged({"cacher": {"ratio": 1.0}, "pruner": {"enabled": False}})
        out["cacher, no gate"] = base.merged({"cacher": {"gate": {"enabled": False}}, "pruner": {"enabled": False}})
        for ratio in (0.05, 0.15, 0.3, 0.5):
            out[f"cacher r={ratio}"] = base.merged({"cacher": {"ratio": ratio}, "pruner": {"enabled": False}})
    if "pruner" in groups:
        budget = {k: getattr(base.pruner, k) for k in ("tokens_per_frame", "keep_ratio")}  # the default's budget
        for policy in ("stc_context", "stc", "uniform", "random", "keep_all"):
            out[f"pruner {policy}"] = off.merged({"pruner": {"enabled": True, "policy": policy, **budget}})
        for keep in (0.5, 0.75):  # what a larger budget buys back, the default policy
            out[f"pruner {base.pruner.policy} {keep:.0%}"] = off.merged(
                {"pruner": {"enabled": True, "policy": base.pruner.policy, "tokens_per_frame": None, "keep_ratio": keep}})
    if "kv" in groups:
        sink, reserve = off.kv.sink_tokens, off.kv.reserve_tokens
        small = {"budget_tokens": sink + reserve + window_tokens}
        out["kv sink_window"] = off.merged({"kv": {**small, "policy": "sink_window"}})
        for quant in ("none", "int8", "int4"):
            name = "kv offload" + ("" if quant == "none" else f" {quant}")
            out[name] = off.merged({"kv": {**small, "policy": "offload", "quant": quant}})
    return out


def kind_of(item_id: str, task: str, meta: dict[str, dict[str, Any]], window_s: float) -> str:
    """The item's task kind; backward ``EPM`` items split by their distance ``T_s`` against the window."""
    kind = TASK_KINDS.get(task, task)
    if task == "EPM":
        t = meta.get(item_id.split("#")[0], {}).get("T_s")
        kind = "backward_inside" if t is not None and t <= window_s else "backward_beyond"
    return kind


def summarize(results: list[ItemResult], names: list[str], meta: dict[str, dict[str, Any]],
              window_s: float) -> dict[str, Any]:
    """Accuracy per kind with Wilson intervals, accuracy retained and cost ratios, per setting."""
    out: dict[str, Any] = {}
    by_setting = defaultdict(list)
    for r in results:
        by_setting[r.setting].append(r)
    base_rows = by_setting["off"]
    for name in names:
        rows = by_setting[name]
        kinds: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            kinds[kind_of(r.item_id, r.task, meta, window_s)].append(r.correct)
        acc = {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 4), "ci95": [round(x, 4) for x in
                                                                                  wilson(sum(v), len(v))]}
               for k, v in sorted(kinds.items())}
        backgrounds: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            backgrounds[meta.get(r.item_id.split("#")[0], {}).get("background", "?")].append(r.correct)
        per_background = {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 4)} for k, v in
                          sorted(backgrounds.items())}
        total = sum(r.correct for r in rows)
        cost = {k: sum(getattr(r, k) for r in rows) / max(1, len(rows)) for k in COST_KEYS}
        base_cost = {k: sum(getattr(r, k) for r in base_rows) / max(1, len(base_rows)) for k in COST_KEYS}
        base_total = sum(r.correct for r in base_rows)
        out[name] = {"n": len(rows), "accuracy": round(total / max(1, len(rows)), 4),
                     "ci95": [round(x, 4) for x in wilson(total, len(rows))], "per_kind": acc,
                     "per_background": per_background,
                     "accuracy_retained": round(total / base_total, 4) if base_total else None,
                     "cost_ratio": {k: round(cost[k] / base_cost[k], 4) if base_cost[k] else None
                                    for k in COST_KEYS}}
    return out


def window_seconds(adapter: Any, opts: StreamOptions, window_tokens: int) -> float:
    """Seconds of video a window of ``window_tokens`` holds with compression off (LLM tokens per sampled frame,
    family frame text included, measured on one chunk)."""
    import numpy as np

    from serve.core.pipeline import StreamPipeline
    from stream.frames import FrameBatch

    pipe = StreamPipeline(adapter, compression_off(opts))
    sid = pipe.open("probe")
    before = pipe.llm.stats(sid).stream_tokens
    n = opts.sampler.frames_per_chunk
    rgb = np.random.default_rng(0).integers(0, 255, (n, 192, 256, 3), dtype=np.uint8)  # [frames, H, W, 3]
    pipe.push_chunk(sid, FrameBatch(rgb, np.arange(n) / opts.sampler.fps, np.arange(n)))
    per_frame = (pipe.llm.stats(sid).stream_tokens - before) / n
    pipe.shutdown()
    return window_tokens / per_frame / opts.sampler.fps


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    kinds = sorted({k for s in summary.values() for k in s["per_kind"]})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.85 / len(names)
    for i, name in enumerate(names):
        per = summary[name]["per_kind"]
        vals = np.array([per.get(k, {}).get("accuracy", np.nan) for k in kinds])
        lo = np.array([per.get(k, {}).get("ci95", [np.nan, np.nan])[0] for k in kinds])
        hi = np.array([per.get(k, {}).get("ci95", [np.nan, np.nan])[1] for k in kinds])
        x = np.arange(len(kinds)) + i * width
        ax1.bar(x, vals, width, label=name)
        ax1.errorbar(x, vals, yerr=[vals - lo, hi - vals], fmt="none", ecolor="k", lw=0.6, capsize=1.5)
    ax1.set_xticks(np.arange(len(kinds)) + 0.425 - width / 2, kinds, fontsize=8)
    ax1.set(ylim=(0, 1.05), ylabel="accuracy (95 % Wilson interval)", title="accuracy per task kind")
    ax1.legend(fontsize=6, ncol=2)
    others = [n for n in names if n != "off"]
    retained = [summary[n]["accuracy_retained"] or 0.0 for n in others]
    vit = [summary[n]["cost_ratio"]["vit_ms"] or 0.0 for n in others]
    prefill = [summary[n]["cost_ratio"]["prefill_ms"] or 0.0 for n in others]
    kv = [summary[n]["cost_ratio"]["kv_bytes"] or 0.0 for n in others]
    y = np.arange(len(others))
    for j, (vals, label) in enumerate(((retained, "accuracy retained"), (vit, "ViT ms"), (prefill, "prefill ms"),
                                       (kv, "KV bytes"))):
        ax2.barh(y + j * 0.2, vals, 0.2, label=label)
    ax2.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set_yticks(y + 0.3, others, fontsize=7)
    ax2.set(xlabel="ratio to compression off", title="what each setting keeps and costs")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, help="a benchmark folder made by `stc-serve make-bench` (default: make the "
                   "test split here, seed --seed, --items items)")
    p.add_argument("--seed", type=int, default=0, help="test-split seed when the bench is made here (default 0)")
    p.add_argument("--items", type=int, default=96, help="items when the bench is made here (default 96)")
    p.add_argument("--model", default="reference", help="model (default: the reference model)")
    p.add_argument("--groups", nargs="+", default=["default", "cacher", "pruner", "kv"],
                   choices=["default", "cacher", "pruner", "kv"], help="which settings besides compression off")
    p.add_argument("--window-s", type=float, default=12.0,
                   help="the KV window of the kv group, in seconds of video at compression off (default 12)")
    p.add_argument("--config", type=Path, help="service YAML whose stream sections are the base settings")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--plot", type=Path, help="write accuracy per kind and cost ratios as PNG here")
    p.add_argument("--out", type=Path, help="write every answer as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    bench = args.bench
    if bench is None:
        bench = Path(tempfile.mkdtemp(prefix="stc-accuracy-"))
        make_bench(bench, args.seed, items=args.items, split="test")
    items = load_bench(bench / "ovo.json", "ovo")[: args.limit]
    meta_all = json.loads((bench / "meta.json").read_text())
    background = {c["video"]: c["background"] for c in meta_all["clips"]}
    meta = {m["id"]: {**m, "background": background.get(m["video"], "?")} for m in meta_all["items"]}
    cfg = ServiceConfig.load(args.config, {"model": {"name": args.model}})
    adapter = load_adapter(cfg.model.name, cfg.model.device, cfg.model.dtype)
    base = cfg.stream_options()
    tokens_per_s = window_seconds(adapter, base, 1000) / 1000.0  # seconds of video per KV token
    window_tokens = max(1, round(args.window_s / tokens_per_s))
    settings = settings_for(args.groups, base, window_tokens)
    t0 = time.process_time()
    runner = EvalRunner(adapter, settings, cfg.source, cfg.kv_replica_budget_bytes(), args.max_new_tokens)
    results = runner.run(items, bench, progress=lambda m: print(m, file=sys.stderr, flush=True))
    for pipe in runner.pipelines.values():
        pipe.shutdown()
    summary = summarize(results, list(settings), meta, args.window_s)
    for name, s in summary.items():
        kinds = ", ".join(f"{k} {v['accuracy']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] (n={v['n']})"
                          for k, v in s["per_kind"].items())
        print(f"{name:>20}: {s['accuracy']:.3f} retained {s['accuracy_retained']}; vit x{s['cost_ratio']['vit_ms']} "
              f"prefill x{s['cost_ratio']['prefill_ms']} kv x{s['cost_ratio']['kv_bytes']}; {kinds}")
    if args.out:
        args.out.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    if args.plot:
        plot(summary, args.plot, f"{bench.name}: {len(items)} items, model {adapter.source}, "
             f"KV window {args.window_s:g} s ({window_tokens} tokens)")
    print(json.dumps({"bench": str(bench), "items": len(items), "model": adapter.source,
                      "random_weights": bool(getattr(adapter, "random_weights", False)),
                      "window_s": args.window_s, "window_tokens": window_tokens, "cpu_s": round(time.process_time()
                                                                                                - t0, 1),
                      "settings": summary, "machine": machine_info("cpu")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
