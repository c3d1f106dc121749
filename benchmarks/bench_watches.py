"""Ingest frames/s of one stream with 0 vs 4 standing questions (text watches), same process, same run.

Real tiny-model stages (random weights: the answers are meaningless, the costs are real) in the in-process
LocalBackend, whose WatchHub (serve/core/watchset.py: the class every ingest host runs) drives the watches on its scheduler
thread; frames are pushed one chunk at a time (the next once the previous is encoded), so frames/s is the ingest
path's throughput while the watches compete for the LLM. Clock: wall time
(``time.perf_counter``), since watches run concurrently with ingest; process CPU time is reported alongside.
Prints ONE JSON line last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/<script>.py`

from benchmarks.common import machine_info  # noqa: E402
from serve.core.api import CreateStreamRequest  # noqa: E402
from serve.core.config import ServiceConfig  # noqa: E402
from serve.core.stages import LLMStage, VisionStage  # noqa: E402
from serve.core.local import LocalBackend  # noqa: E402
from serve.core.watchset import WatchRequest  # noqa: E402
from stream.frames import FrameBatch  # noqa: E402
from stream.models import load_adapter  # noqa: E402


async def _run(backend: LocalBackend, watches: int, frames: int, chunk: int, every_s: float, bar: tqdm) -> dict:
    sid = f"bench{watches}"
    await backend.create(CreateStreamRequest(stream_id=sid))
    for i in range(watches):
        await backend.add_watch(sid, WatchRequest(question=f"what is happening {i}?", every_s=every_s,
                                                  max_new_tokens=4))
    rng = np.random.default_rng(0)
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, frames, chunk):  # one chunk in flight at a time: encoder throughput, no queue drops
        rgb = rng.integers(0, 255, (chunk, 48, 64, 3), dtype=np.uint8)  # [frames, H, W, 3]
        await backend.push(sid, FrameBatch(rgb, np.arange(start, start + chunk) / 10.0, np.arange(start, start + chunk)),
                           flush=True)
        while True:
            ing = (await backend.stats(sid)).ingest
            if ing.frames_encoded + ing.frames_dropped >= start + chunk:
                break
            await asyncio.sleep(0.005)
        bar.update(chunk)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ticks = sum(w.ticks for w in await backend.list_watches(sid))
    stats = await backend.close(sid)  # ends the stream's watches too
    return {"watches": watches, "frames_per_s": (frames - stats.ingest.frames_dropped) / wall, "wall_s": wall, "cpu_s": cpu, "watch_answers": ticks,
            "frames_dropped": stats.ingest.frames_dropped}


async def main_async(args: argparse.Namespace) -> dict:
    cfg = ServiceConfig.parse({"sampler": {"fps": 1000.0, "frames_per_chunk": args.chunk},
                               "serve": {"max_streams": 4, "watches": {"asks_per_s": args.asks_per_s,
                                                                       "min_every_s": 0.01}}})
    adapter = load_adapter(None)
    backend = LocalBackend(cfg.serve, cfg.source, cfg.stream_options(), VisionStage(adapter, cfg.stream_options()),
                           LLMStage(adapter, cfg.stream_options(), cfg.kv_replica_budget_bytes()))
    quiet = args.json or not sys.stderr.isatty()
    runs = []
    with tqdm(total=args.frames * 2 * args.repeats, desc="frames", unit="f", disable=quiet, file=sys.stderr) as bar:
        await _run(backend, 0, args.chunk * 2, args.chunk, args.every_s, bar)  # warm-up, not reported
        for _ in range(args.repeats):  # interleaved so drift hits both conditions alike
            runs.append(await _run(backend, 0, args.frames, args.chunk, args.every_s, bar))
            runs.append(await _run(backend, 4, args.frames, args.chunk, args.every_s, bar))
    backend.shutdown()
    none = [r["frames_per_s"] for r in runs if r["watches"] == 0]
    four = [r["frames_per_s"] for r in runs if r["watches"] == 4]
    return {"bench": "watches", "clock": "wall (perf_counter); cpu_s = process_time", "frames": args.frames,
            "every_s": args.every_s, "asks_per_s": args.asks_per_s, "fps_no_watches": float(np.median(none)), "fps_4_watches": float(np.median(four)),
            "ratio_4_vs_none": float(np.median(four) / np.median(none)),
            "cpu_ms_per_frame_no_watches": float(np.median([r["cpu_s"] for r in runs if r["watches"] == 0])) * 1000
            / args.frames,
            "cpu_ms_per_frame_4_watches": float(np.median([r["cpu_s"] for r in runs if r["watches"] == 4])) * 1000
            / args.frames, "runs": runs,
            "weights": "random (tiny model)", **machine_info("cpu", threads=torch.get_num_threads())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--every-s", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--asks-per-s", type=float, default=1000.0,
                        help="The watch rate limit (default: effectively none, the worst case for ingest).")
    parser.add_argument("--json", action="store_true", help="JSON only (no progress bar).")
    parser.add_argument("--plot", default=None, help="Write a bar chart of frames/s to this PNG.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = asyncio.run(main_async(args))
    if args.plot:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(["no watches", "4 watches"], [out["fps_no_watches"], out["fps_4_watches"]])
        ax.set_ylabel("ingest frames/s (wall)")
        fig.tight_layout()
        fig.savefig(args.plot)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
