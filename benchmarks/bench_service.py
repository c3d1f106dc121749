"""N concurrent streams through the running service (Ray Serve, HTTP): throughput, drops, TTFT, memory.

    python benchmarks/bench_service.py --streams 4 --seconds 30 [--device cpu|cuda] [--plot out.png]

1. Starts the service in this process (local Ray; tiny model unless ``--model``).
2. Correctness check before timing: one pushed stream's answer over HTTP must equal the in-process
   ``StreamPipeline``'s answer for the same frames (same weights, greedy decoding) -- the service adds no error.
3. Warm-up, then idle TTFT (one question, nothing else running).
4. Load: each stream gets a pusher thread (JPEG frames at ``--push-fps``, real video frames from
   ../shared/media/vtest.avi when present) and a questioner (a question every ``--ask-every`` s, client-side TTFT).
5. Last stdout line: one JSON object (throughput, drops, TTFT percentiles, the load/idle TTFT ratio measured in this
   run, RSS of the service's process tree at start and end, machine info).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import progress  # noqa: E402

QUESTION = "What is happening in the video?"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=2, help="concurrent pushed streams")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the timed load phase")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--model", help="model folder / hub id (default: built-in tiny model)")
    p.add_argument("--push-fps", type=float, default=4.0, help="frames per second pushed per stream")
    p.add_argument("--fps", type=float, default=4.0, help="service sampling rate (frames kept per second)")
    p.add_argument("--chunk", type=int, default=4, help="frames per chunk")
    p.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"), help="pushed frame size")
    p.add_argument("--ask-every", type=float, default=3.0, help="seconds between questions per stream")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--no-cache", action="store_true", help="turn the STC cacher off (full ViT on every frame)")
    p.add_argument("--vision-replicas", type=int, default=1)
    p.add_argument("--llm-replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule (default: all)")
    p.add_argument("--plot", type=Path, help="write a PNG: encoded frames over time and the TTFT histogram")
    return p.parse_args()


# ---- inputs -------------------------------------------------------------------------------------------------------
def load_frames(size: tuple[int, int], count: int = 64) -> np.ndarray:
    """``[count, H, W, 3]`` frames: vtest.avi resized when present, else moving squares."""
    video = REPO.parent / "shared" / "media" / "vtest.avi"
    width, height = size
    if video.is_file():
        import av

        out = []
        with av.open(str(video)) as container:
            for frame in container.decode(video=0):
                out.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                if len(out) == count:
                    break
        return np.stack(out)
    from tests.media import moving_square

    return np.stack([moving_square(i, width, height) for i in range(count)])


def rss_tree_mb(root_pid: int) -> float:
    """Resident memory (MB) of ``root_pid`` and all its descendants (Ray's raylet, GCS, workers, replicas)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/status") as fh:
                kb = next((int(line.split()[1]) for line in fh if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = kb
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 1024.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- phases -------------------------------------------------------------------------------------------------------
def make_config(args: argparse.Namespace) -> Any:
    from serve.core.config import ServiceConfig

    return ServiceConfig.parse({
        "model": {"name": args.model, "device": args.device,
                  "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32")},
        "sampler": {"fps": args.fps, "frames_per_chunk": args.chunk},
        "cacher": {"enabled": not args.no_cache},
        "serve": {
            "http": {"port": free_port()}, "max_streams": max(16, args.streams + 2),
            "max_streams_per_replica": max(8, args.streams + 2),
            "ingress": {"num_cpus": 0}, "ingest": {"num_cpus": 0},
            "vision": {"num_cpus": 0, "num_replicas": args.vision_replicas,
                       "num_gpus": 0.5 if args.device == "cuda" else 0},
            "llm": {"num_cpus": 0, "num_replicas": args.llm_replicas, "num_gpus": 0.5 if args.device == "cuda" else 0},
        },
    })


def correctness_check(client: Any, cfg: Any, frames: np.ndarray, max_new_tokens: int) -> str:
    """The service's answer must equal the in-process pipeline's for the same frames (raw pixels, exact)."""
    from serve.core.pipeline import StreamPipeline
    from stream.frames import Frame
    from stream.models import load_adapter

    rgb = frames[: 2 * cfg.sampler.frames_per_chunk]
    pts = [i / cfg.sampler.fps for i in range(len(rgb))]
    sid = client.create_stream(stream_id="check")["stream_id"]
    client.push_frames(sid, rgb, pts, encoding="raw", flush=True)
    served, _ = client.ask_text(sid, QUESTION, max_new_tokens=max_new_tokens, wait_s=120)
    client.close_stream(sid)
    adapter = load_adapter(cfg.model.name, cfg.model.device, cfg.model.dtype)
    pipe = StreamPipeline(adapter, cfg.stream_options(), cfg.kv_replica_budget_bytes())
    local_id = pipe.open("check")
    pipe.ingest(local_id, [Frame(rgb=r, pts=t, index=i) for i, (r, t) in enumerate(zip(rgb, pts))])
    local = "".join(pipe.ask(local_id, QUESTION, max_new_tokens))
    if served != local:
        raise SystemExit(f"correctness check failed: service answered {served!r}, in-process pipeline {local!r}")
    return served


class StreamLoad:
    """One stream under load: a pusher thread and a questioner thread."""

    def __init__(self, client: Any, sid: str, frames: np.ndarray, args: argparse.Namespace, t0: float) -> None:
        self.client, self.sid, self.frames, self.args, self.t0 = client, sid, frames, args, t0
        self.pushed = args.chunk  # the warm-up chunk came first: keep one clock
        self.ttft_ms: list[float] = []
        self.server_ttft_ms: list[float] = []
        self.errors: list[str] = []
        self.timeline: list[tuple[float, int, int]] = []  # (seconds, frames encoded, frames dropped)

    def push_loop(self, stop: threading.Event) -> None:
        period = 1.0 / self.args.push_fps
        batch = max(1, int(round(self.args.push_fps / 2)))  # two pushes per second
        next_t = time.monotonic()
        while not stop.is_set():
            idx = [(self.pushed + k) % len(self.frames) for k in range(batch)]
            pts = [(self.pushed + k) * period for k in range(batch)]
            try:
                self.client.push_frames(self.sid, self.frames[idx], pts, encoding="jpeg")
                self.pushed += batch
            except Exception as exc:  # recorded and reported, the run goes on
                self.errors.append(f"push: {exc}")
            next_t += batch * period
            stop.wait(max(0.0, next_t - time.monotonic()))

    def ask_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.args.ask_every):
            try:
                client_ms, server_ms = timed_ask(self.client, self.sid, self.args.max_new_tokens)
                self.ttft_ms.append(client_ms)
                self.server_ttft_ms.append(server_ms)
            except Exception as exc:
                self.errors.append(f"ask: {exc}")


    def sample_loop(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            try:
                st = self.client.stats(self.sid)["ingest"]
                self.timeline.append((time.monotonic() - self.t0, st["frames_encoded"], st["frames_dropped"]))
            except Exception as exc:
                self.errors.append(f"stats: {exc}")


def timed_ask(client: Any, sid: str, max_new_tokens: int) -> tuple[float, float]:
    """(client-side TTFT incl. HTTP, server-side TTFT at the ingress) of one question, in ms."""
    start = time.perf_counter()
    first = None
    done: dict[str, Any] = {}
    for _ in client.ask(sid, QUESTION, max_new_tokens, done=done):
        if first is None:
            first = (time.perf_counter() - start) * 1000.0
    if first is None:
        raise RuntimeError("the answer had no text piece")
    return first, float(done.get("ttft_ms", 0.0))


def run_load(client: Any, frames: np.ndarray, args: argparse.Namespace) -> tuple[list[StreamLoad], float, float]:
    """Open and warm every stream, then run the timed phase; returns (loads, seconds, RSS MB before timing)."""
    t0 = time.monotonic()
    loads = []
    for i in range(args.streams):
        sid = client.create_stream(stream_id=f"bench{i}")["stream_id"]
        client.push_frames(sid, frames[: args.chunk], [k / args.push_fps for k in range(args.chunk)], flush=True)
        client.ask_text(sid, QUESTION, max_new_tokens=2, wait_s=120)  # warm-up of this stream's path
        loads.append(StreamLoad(client, sid, frames, args, t0))
    rss_start = rss_tree_mb(os.getpid())  # service, stream actors and model replicas all up and warm
    for ld in loads:
        ld.t0 = time.monotonic()
    stop = threading.Event()
    threads = [threading.Thread(target=getattr(ld, fn), args=(stop,), daemon=True)
               for ld in loads for fn in ("push_loop", "ask_loop", "sample_loop")]
    start = time.monotonic()
    for t in threads:
        t.start()
    for _ in progress(range(int(args.seconds)), "seconds"):
        time.sleep(1.0)
    time.sleep(args.seconds - int(args.seconds))
    stop.set()
    elapsed = time.monotonic() - start
    for t in threads:
        t.join(timeout=120)
    return loads, elapsed, rss_start


def plot(path: Path, loads: list[StreamLoad], ttfts: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ld in loads:
        if ld.timeline:
            ts, enc, drop = zip(*ld.timeline)
            line = a.plot(ts, enc, label=f"{ld.sid} encoded")[0]
            a.plot(ts, drop, "--", color=line.get_color(), label=f"{ld.sid} dropped")
    a.set_xlabel("seconds into the timed phase")
    a.set_ylabel("frames")
    a.legend(fontsize=7)
    b.hist(ttfts, bins=20)
    b.set_xlabel("TTFT (ms, client side)")
    b.set_ylabel("questions")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    args = parse_args()
    import ray
    import torch

    from serve.deploy.app import start_service, stop_service
    from serve.http.client import StcClient

    cfg = make_config(args)
    frames = load_frames(tuple(args.size))
    init = {"num_cpus": args.num_cpus} if args.num_cpus else {}
    url = start_service(cfg, **init)
    try:
        client = StcClient(url, timeout_s=300)
        answer = correctness_check(client, cfg, frames, args.max_new_tokens)
        print(f"correctness: service == in-process pipeline ({answer!r})", file=sys.stderr)
        idle_sid = _idle_stream(client, frames, args)
        idle_ttft = float(np.median([timed_ask(client, idle_sid, args.max_new_tokens)[0] for _ in range(3)]))
        client.close_stream(idle_sid)
        loads, elapsed, rss_start = run_load(client, frames, args)
        stats = [client.stats(ld.sid) for ld in loads]
        rss_end = rss_tree_mb(os.getpid())
    finally:
        stop_service()
    ttfts = [t for ld in loads for t in ld.ttft_ms]
    encoded = sum(s["ingest"]["frames_encoded"] for s in stats)
    base_encoded = args.chunk * len(loads)  # the warm-up chunks, encoded before the timed phase
    out = {
        "streams": args.streams, "seconds": round(elapsed, 2),
        "frames_pushed": sum(ld.pushed - args.chunk for ld in loads),
        "frames_encoded": encoded,
        "frames_per_s": round((encoded - base_encoded) / max(elapsed, 1e-9), 2),
        "dropped_frames": sum(s["ingest"]["frames_dropped"] for s in stats),
        "questions": len(ttfts),
        "ttft_p50_ms": round(float(np.percentile(ttfts, 50)), 1) if ttfts else None,
        "ttft_p99_ms": round(float(np.percentile(ttfts, 99)), 1) if ttfts else None,
        "ttft_server_p50_ms": round(float(np.percentile([t for ld in loads for t in ld.server_ttft_ms], 50)), 1)
        if ttfts else None,
        "ttft_idle_ms": round(idle_ttft, 1),
        "ttft_p50_load_over_idle": round(float(np.percentile(ttfts, 50)) / idle_ttft, 2) if ttfts else None,
        "rss_mb_start": round(rss_start, 1), "rss_mb_end": round(rss_end, 1),
        "kv_bytes_per_stream": [s["kv_bytes"] for s in stats],
        "errors": sum(len(ld.errors) for ld in loads),
        "push_fps": args.push_fps, "sample_fps": args.fps, "chunk": args.chunk, "frame_size": list(args.size),
        "cacher": not args.no_cache, "vision_replicas": args.vision_replicas, "llm_replicas": args.llm_replicas,
        "model": args.model or "tiny-llava_onevision (random weights)", "device": args.device,
        "dtype": cfg.model.dtype,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
        "python": platform.python_version(),
    }
    for ld in loads:
        for err in ld.errors[:3]:
            print(f"{ld.sid}: {err}", file=sys.stderr)
    if args.plot:
        plot(args.plot, loads, ttfts)
    print(json.dumps(out))
    return 0


def _idle_stream(client: Any, frames: np.ndarray, args: argparse.Namespace) -> str:
    """A stream with one chunk encoded, used to time a question with nothing else running."""
    sid = client.create_stream(stream_id="idle")["stream_id"]
    client.push_frames(sid, frames[: args.chunk], [k / args.push_fps for k in range(args.chunk)], flush=True)
    client.ask_text(sid, QUESTION, max_new_tokens=2, wait_s=120)  # warm-up
    return sid


if __name__ == "__main__":
    sys.exit(main())
