"""Time to answer N streams at once (one fleet question, ``POST /questions``) vs N separate requests, same run, while
all N streams ingest.

Real tiny-model stages (random weights: the answers are meaningless, the costs are real) in the in-process
LocalBackend -- the IngestHost the Ray service runs -- behind the HTTP app under uvicorn on 127.0.0.1, driven by
httpx over loopback. N pushed streams get JPEG frames at ``--push-fps`` each from pusher threads during the whole
measurement. Per repeat, in alternating order so drift hits every condition alike:

* ``fleet``: one fleet question over all N streams (``yes_no``, and ``text`` with ``--max-new-tokens``);
* ``serial``: N separate requests one after another (yes/no: ``POST /questions`` naming one stream; text:
  ``POST /streams/{id}/questions``);
* ``concurrent``: the same N separate requests sent at once from N client threads.

Then, ingest stopped, a moment search over one stream's whole history with each method (``yes_no``: one question
prefill per block, batched; ``retrieval``: one question forward and an inner product per block).

Before timing, with ingest paused, the fleet's yes/no scores are checked against each stream asked alone (they must
agree: the batched engine equals one-at-a-time). Reported: median wall time per condition and mode, the ratios, the
rows the LLM's step loop batched (largest step), and ingest frames/s with frames dropped during the run. Clock: wall
time (``time.perf_counter``). Prints ONE JSON line last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# the LLM's step loop runs on its own thread, which takes OpenMP's default thread count, not torch.set_num_threads
# of the main thread: pin both to --threads before torch loads (spinning idle threads distort a busy 2-core machine)
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "1"
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python benchmarks/<script>.py`

from benchmarks.common import machine_info  # noqa: E402
from serve.core.config import ServiceConfig  # noqa: E402
from serve.core.local import LocalBackend  # noqa: E402
from serve.core.stages import LLMStage, VisionStage  # noqa: E402
from serve.http.app import make_api  # noqa: E402
from serve.http.client import StcClient  # noqa: E402
from stream.models import load_adapter  # noqa: E402

QUESTION = "Is there a person in the picture?"


def _serve(app: Any) -> tuple[str, Any]:
    """The app under uvicorn on 127.0.0.1 in a thread: (base URL, server)."""
    import socket  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


class Pushers:
    """One thread per stream pushing ``chunk`` JPEG frames every ``chunk / fps`` seconds (pts continue)."""

    def __init__(self, url: str, ids: list[str], fps: float, chunk: int, side: int) -> None:
        rng = np.random.default_rng(0)
        self.frames = rng.integers(0, 255, (chunk, side * 3 // 4, side, 3), dtype=np.uint8)  # [F, H, W, 3]
        self.url, self.ids, self.fps, self.chunk = url, ids, fps, chunk
        self.stop = threading.Event()
        self.pts = {sid: 0.0 for sid in ids}
        self.pushed = 0
        self.threads: list[threading.Thread] = []

    def push_once(self, client: StcClient, sid: str) -> None:
        pts = [self.pts[sid] + i / self.fps for i in range(self.chunk)]
        client.push_frames(sid, self.frames, pts, encoding="jpeg", flush=True)
        self.pts[sid] = pts[-1] + 1 / self.fps
        self.pushed += self.chunk

    def _loop(self, sid: str) -> None:
        with StcClient(self.url) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                self.push_once(client, sid)
                self.stop.wait(max(0.0, self.chunk / self.fps - (time.perf_counter() - t0)))

    def start(self) -> None:
        self.stop.clear()
        self.threads = [threading.Thread(target=self._loop, args=(sid,), daemon=True) for sid in self.ids]
        for t in self.threads:
            t.start()

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _conditions(url: str, ids: list[str], max_new: int) -> dict[str, Any]:
    """``(condition, mode) -> callable`` running that request pattern once."""
    client = StcClient(url)

    def fleet(mode: str) -> Any:
        def run() -> None:
            answers, done = client.fleet(QUESTION, streams=ids, mode=mode, max_new_tokens=max_new)
            assert done["answered"] == len(ids), done
        return run

    def one(sid: str, mode: str, c: StcClient) -> None:
        if mode == "yes_no":
            answers, _ = c.fleet(QUESTION, streams=[sid], mode="yes_no")
            assert answers[0]["status"] == 200, answers
        else:
            c.ask_text(sid, QUESTION, max_new_tokens=max_new)

    def serial(mode: str) -> Any:
        return lambda: [one(sid, mode, client) for sid in ids]

    pool = ThreadPoolExecutor(len(ids))
    clients = [StcClient(url) for _ in ids]

    def concurrent(mode: str) -> Any:
        return lambda: list(pool.map(lambda k: one(ids[k], mode, clients[k]), range(len(ids))))

    return {(c, m): f(m) for c, f in (("fleet", fleet), ("serial", serial), ("concurrent", concurrent))
            for m in ("yes_no", "text")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--push-fps", type=float, default=1.0, help="Frames per second pushed to each stream.")
    parser.add_argument("--chunk", type=int, default=2, help="Frames per pushed batch and per chunk.")
    parser.add_argument("--side", type=int, default=160, help="Pushed frame width (4:3).")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="Answer length of the text mode.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (also OMP_NUM_THREADS, unless set).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ServiceConfig.parse({"sampler": {"fps": args.push_fps, "frames_per_chunk": args.chunk},
                               "serve": {"max_streams": args.streams,
                                         "fleet": {"max_streams": args.streams, "max_concurrent": args.streams}}})
    adapter = load_adapter(None)
    opts = cfg.stream_options()
    llm = LLMStage(adapter, opts, cfg.kv_replica_budget_bytes())
    backend = LocalBackend(cfg.serve, cfg.source, opts, VisionStage(adapter, opts), llm)
    url, server = _serve(make_api(backend, cfg.serve))
    ids = [f"cam{i:02d}" for i in range(args.streams)]
    with StcClient(url) as client:
        for sid in ids:
            client.create_stream(stream_id=sid, labels={"bench": "fleet"})
        pushers = Pushers(url, ids, args.push_fps, args.chunk, args.side)
        for _ in range(2):  # warm-up context, then the correctness check with ingest paused
            for sid in ids:
                pushers.push_once(client, sid)
        for sid in ids:
            backend.host._runner(sid).wait_idle(120)
        answers, _ = client.fleet(QUESTION, streams=ids, mode="yes_no")
        for a in answers:
            alone, _ = client.fleet(QUESTION, streams=[a["stream_id"]], mode="yes_no")
            assert abs(alone[0]["score"] - a["score"]) < 1e-4, (a, alone)
        runs = _conditions(url, ids, args.max_new_tokens)
        for fn in runs.values():  # warm-up of every path
            fn()
        before = llm.engine.scheduler_stats()
        ingest0 = {s["stream_id"]: s["ingest"] for s in client.list_streams()}
        pushers.start()
        t0 = time.perf_counter()
        times: dict[str, list[float]] = {f"{c}_{m}": [] for c, m in runs}
        order = list(runs)
        for r in range(args.repeats):
            for key in (order if r % 2 == 0 else order[::-1]):
                times[f"{key[0]}_{key[1]}"].append(_timed(runs[key]))
        wall = time.perf_counter() - t0
        pushers.halt()
        after = llm.engine.scheduler_stats()
        ingest1 = {s["stream_id"]: s["ingest"] for s in client.list_streams()}
        moments = {}
        for method in ("yes_no", "retrieval"):  # one stream's whole history, ingest stopped
            found = [client.moments(ids[0], QUESTION, top_k=3, method=method) for _ in range(args.repeats)]
            moments[method] = {"ms": round(float(np.median([f["ms"] for f in found])), 1),
                               "blocks": found[0]["scored_blocks"]}
    server.should_exit = True
    backend.shutdown()
    med = {k: float(np.median(v)) for k, v in times.items()}
    encoded = sum(ingest1[s]["frames_encoded"] - ingest0[s]["frames_encoded"] for s in ids)
    dropped = sum(ingest1[s]["frames_dropped"] - ingest0[s]["frames_dropped"] for s in ids)
    out = {
        "bench": "fleet", "streams": args.streams, "repeats": args.repeats, "push_fps_per_stream": args.push_fps,
        "frame": f"{args.side}x{args.side * 3 // 4} jpeg", "chunk": args.chunk, "max_new_tokens": args.max_new_tokens,
        "ms": {k: round(v, 1) for k, v in med.items()},
        "serial_over_fleet": {m: round(med[f"serial_{m}"] / med[f"fleet_{m}"], 2) for m in ("yes_no", "text")},
        "concurrent_over_fleet": {m: round(med[f"concurrent_{m}"] / med[f"fleet_{m}"], 2)
                                  for m in ("yes_no", "text")},
        "largest_batched_step_rows": after.max_rows_in_step,
        "steps": after.steps - before.steps, "prefill_rows": after.prefill_rows - before.prefill_rows,
        "ingest_frames_per_s": round(encoded / wall, 2), "ingest_frames_pushed": pushers.pushed,
        "ingest_frames_dropped": dropped, "moments_one_stream": moments,
        "runs_ms": {k: [round(x, 1) for x in v] for k, v in times.items()},
        "scores_checked": "fleet yes/no scores == each stream asked alone (|diff| < 1e-4)",
        "weights": "random (tiny model)", "clock": "wall (perf_counter)",
        **machine_info("cpu", threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS")),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
