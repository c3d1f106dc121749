"""Soak: pushed and file streams, questions and stream churn for M minutes; memory of every Ray process over time.

    python benchmarks/bench_soak.py --streams 4 --minutes 30 [--plot out.png] [--series samples.json] [--config YAML]

1. Starts the service in this process (local Ray, tiny model with random weights unless ``--model``; CPU).
2. Ingest cost: RSS of the ingest host processes before and after opening ``--probe-streams`` idle pushed streams
   (``ingest_mb_per_stream``: memory added per open stream outside the model replicas).
3. Load for ``--minutes``: half the streams pushed (160x120 frames from ../shared/media/vtest.avi when present), half
   reading ``--video`` (default ../shared/media/vtest.avi, 768x576; ``synthetic``: a 120-frame 160x120 clip, which
   never exercises frame-sized allocations; the JSON's ``file_clip`` says which ran), recreated when they end
   (churn; a stream found ``failed`` is replaced too and counted in ``failed_streams``); one stream is deleted and
   recreated every ``--churn-s``;
   every stream is asked a question every ``--ask-every`` s. Any 4xx/5xx answer or SSE error counts in ``errors``,
   but a 503 (a replica being replaced; it carries Retry-After) counts in ``unavailable_503``.
4. Every ``--sample-s``: RSS of every Ray process (by process title), the streams' KV bytes and each ingest host's
   glibc heap (size, in use, free inside it, mmapped: fragmentation shows as heap growing while in-use does not) and
   ``frames_mb``, the pixels its streams hold in their bounded chunk queues; ``host_net_slopes_mb_per_min`` is the
   slope of RSS minus that (a lagging encoder fills queues up to their bound; a leak grows beyond it).
5. Faults (optional): ``--kill-host-after S`` SIGKILLs one ingest host (not the canary's), ``--kill-llm-after S`` /
   ``--kill-vision-after S`` the LLM / vision replica, that many seconds into the load (Ray restarts each). A **canary** pushed stream, never
   churned, pushes every 0.25 s and asks every ``--ask-every`` s throughout; a 503 with Retry-After (a replica being
   replaced) is retried after it and counted, anything else is a canary failure. Afterwards its counters are checked:
   still ``running``, every frame accounted for (``frames_in == frames_encoded + frames_dropped``), 0 failures
   (``canary.ok``).
6. Last stdout line: one JSON object: ``rss_mb_start``/``rss_mb_end`` (all Ray processes), ``slope_mb_per_min`` (the
   largest per-process least-squares slope after the first third, the warm-up), ``ingest_mb_per_stream``,
   ``errors``, ``frames``, ``dropped``, ``canary``, ``killed``, per-process slopes and machine info. Clock: wall
   time (a soak is about time).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_service import free_port, load_frames  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--video", default=str(REPO.parent / "shared" / "media" / "vtest.avi"),
                   help="the file streams' video; 'synthetic' for a generated 120-frame 160x120 clip")
    p.add_argument("--model", help="model folder / hub id (default: built-in tiny model, random weights)")
    p.add_argument("--config", type=Path, help="a service config YAML (e.g. to switch serve.process settings off for "
                   "an ablation); the soak's own settings (port, media root, stream limits, CPUs) override it")
    p.add_argument("--ask-every", type=float, default=5.0)
    p.add_argument("--churn-s", type=float, default=20.0, help="delete + recreate one stream this often")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--probe-streams", type=int, default=8, help="idle streams opened to measure ingest cost")
    p.add_argument("--kill-host-after", type=float, default=None,
                   help="fault injection: SIGKILL one ingest host this many seconds into the load (Ray restarts it)")
    p.add_argument("--kill-llm-after", type=float, default=None,
                   help="fault injection: SIGKILL the LLM replica this many seconds into the load (Serve restarts it)")
    p.add_argument("--kill-vision-after", type=float, default=None,
                   help="fault injection: SIGKILL the vision replica this many seconds into the load")
    p.add_argument("--plot", type=Path)
    p.add_argument("--series", type=Path, help="write every sample (RSS per process, KV MB) to this JSON file")
    return p.parse_args()


def ray_rss_mb() -> dict[str, float]:
    """RSS (MB) of each process of this run's local Ray instance (descendants of this process), keyed by process
    title (``ray::ServeReplica:stc:vision`` ...; the method suffix Ray appends while busy is cut) and pid."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            rss = proc.memory_info().rss
        except psutil.Error:
            continue
        title = cmd.split()[0].split("/")[-1].split(".")[0] if cmd else "?"
        out[f"{title}#{proc.pid}"] = rss / 2**20
    return out


def slope_per_min(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope (units per minute) of ``ys`` over ``ts`` (seconds)."""
    if len(ts) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(ts) / 60.0, np.asarray(ys), 1)[0])


class Soak:
    def __init__(self, client: Any, args: argparse.Namespace, frames: np.ndarray) -> None:
        self.client, self.args, self.frames = client, args, frames
        self.errors: list[str] = []
        self.races: list[str] = []  # 404/409 on a stream this soak's churn deleted during the call (not errors)
        self.unavailable: list[str] = []  # 503 + Retry-After: a replica being replaced (documented, not errors)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.streams: dict[str, str] = {}  # id -> "push" | "file"
        self.closed_frames = self.closed_dropped = 0
        self.failed: list[str] = []  # streams the churn found failed (replaced like ended ones, but reported)
        self.serial = 0

    def _guard(self, what: str, call: Any, sid: str | None = None) -> Any:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - every failed answer is a soak error, counted and named
            with self.lock:
                status = getattr(exc, "status", None)
                if sid is not None and sid not in self.streams and status in (404, 409):
                    self.races.append(f"{what}: {type(exc).__name__}: {exc}"[:300])  # we deleted it meanwhile
                elif status == 503:
                    self.unavailable.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
                else:
                    self.errors.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
            return None

    def open(self, kind: str) -> None:
        with self.lock:
            self.serial += 1
            sid = f"{kind}{self.serial}"
        src = "soak.avi" if kind == "file" else None
        if self._guard("create", lambda: self.client.create_stream(src, stream_id=sid, fps=4, frames_per_chunk=4)):
            with self.lock:
                self.streams[sid] = kind

    def close(self, sid: str) -> None:
        with self.lock:
            self.streams.pop(sid, None)
        final = self._guard("delete", lambda: self.client.close_stream(sid))
        if final:
            with self.lock:
                self.closed_frames += final["ingest"]["frames_in"]
                self.closed_dropped += final["ingest"]["frames_dropped"]

    def pusher(self) -> None:
        k = 0
        while not self.stop.is_set():
            for sid, kind in list(self.streams.items()):
                if kind == "push":
                    rgb = self.frames[k % len(self.frames)][None]
                    self._guard("push", lambda: self.client.push_frames(sid, rgb, [k / 4.0]), sid)
            k += 1
            time.sleep(0.25)

    def questioner(self) -> None:
        while not self.stop.wait(self.args.ask_every):
            for sid in list(self.streams):
                if sid in self.streams:
                    def ask() -> None:
                        text, done = self.client.ask_text(sid, "What happens?", max_new_tokens=4)
                        if not done:
                            raise RuntimeError("answer without a done event")
                    self._guard("ask", ask, sid)

    def churner(self) -> None:
        while not self.stop.wait(self.args.churn_s):
            for sid, kind in list(self.streams.items()):  # ended file streams are replaced
                st = self._guard("stats", lambda: self.client.stats(sid), sid)
                if st and st["state"] == "failed":
                    with self.lock:
                        self.failed.append(f"{sid}: {st.get('error')}"[:300])
                if st and st["state"] in ("ended", "failed"):
                    self.close(sid)
                    self.open(kind)
            victim = next(iter(self.streams), None)
            if victim:
                kind = self.streams[victim]
                self.close(victim)
                self.open(kind)

    def totals(self) -> tuple[int, int]:
        frames, dropped = self.closed_frames, self.closed_dropped
        for st in self._guard("list", self.client.list_streams) or []:
            frames += st["ingest"]["frames_in"]
            dropped += st["ingest"]["frames_dropped"]
        return frames, dropped


class Canary:
    """One pushed stream outside the churn, pushing and asking all along; its counters are the soak's verdict on
    faults. A 503 with Retry-After (a replica being replaced) is retried after it and counted, not a failure."""

    def __init__(self, client: Any, args: argparse.Namespace, frames: np.ndarray) -> None:
        self.client, self.args, self.frames = client, args, frames
        self.sid = client.create_stream(stream_id="canary", fps=4, frames_per_chunk=4)["stream_id"]
        self.counts = {"pushes": 0, "asks": 0, "retried_503": 0, "failures": 0}
        self.examples: list[str] = []
        self.stop = threading.Event()

    def _call(self, what: str, call: Any) -> None:
        while not self.stop.is_set():
            try:
                call()
                self.counts[what] += 1
                return
            except Exception as exc:  # noqa: BLE001 - counted and named
                if getattr(exc, "status", None) == 503:
                    self.counts["retried_503"] += 1
                    time.sleep(2.0)
                    continue
                self.counts["failures"] += 1
                self.examples.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
                return

    def run(self) -> None:
        k, next_ask = 0, time.monotonic()
        while not self.stop.is_set():
            rgb = self.frames[k % len(self.frames)][None]
            self._call("pushes", lambda: self.client.push_frames(self.sid, rgb, [k / 4.0]))
            if time.monotonic() >= next_ask:
                next_ask += self.args.ask_every
                self._call("asks", lambda: self.client.ask_text(self.sid, "What happens?", max_new_tokens=4))
            k += 1
            time.sleep(0.25)

    def verdict(self) -> dict[str, Any]:
        """Flush the partial chunk, wait until every frame went through, then read and check the counters."""
        rgb = self.frames[0][None]
        self.stop.clear()
        threading.Timer(120.0, self.stop.set).start()  # a service that stays unavailable ends the verdict too
        self._call("pushes", lambda: self.client.push_frames(self.sid, rgb, [1e6], flush=True))
        self._call("asks", lambda: self.client.ask_text(self.sid, "And finally?", max_new_tokens=4, wait_s=60))
        st = self.client.stats(self.sid)
        ing = st["ingest"]
        accounted = ing["frames_in"] == ing["frames_encoded"] + ing["frames_dropped"]
        return {**self.counts, "state": st["state"], "frames_in": ing["frames_in"],
                "frames_encoded": ing["frames_encoded"], "frames_dropped": ing["frames_dropped"],
                "state_resets": ing["state_resets"], "frames_lost": ing["frames_lost"], "examples": self.examples[:3],
                "ok": self.counts["failures"] == 0 and st["state"] == "running" and accounted}


def kill_host_without(cfg: Any, stream_id: str) -> str:
    """SIGKILL an ingest host that does not run ``stream_id`` (the canary must see the other faults, not lose its
    host: a lost host's streams fail by design); returns its key."""
    import ray

    from serve.core.slots import rendezvous_pick
    from serve.deploy.hosts import STREAM_NAMESPACE

    names = [f"{cfg.serve.app_name}/ingest/{k}" for k in range(cfg.serve.ingest.hosts)]
    victim = next(n for n in names if n != rendezvous_pick(stream_id, names))
    pid = ray.get(ray.get_actor(victim, namespace=STREAM_NAMESPACE).memory.remote(), timeout=30).pid
    os.kill(pid, signal.SIGKILL)
    return f"{victim}#{pid}"


def kill_one(title: str) -> str:
    """SIGKILL the first Ray process whose title contains ``title`` (``IngestHostActor``,
    ``ServeReplica:stc:llm``, ``ServeReplica:stc:vision``); returns its key."""
    import psutil

    for proc in sorted(psutil.Process().children(recursive=True), key=lambda p: p.pid):
        try:
            if title in " ".join(proc.cmdline()):
                os.kill(proc.pid, signal.SIGKILL)
                return f"{title}#{proc.pid}"
        except psutil.Error:
            continue
    return f"{title}: not found"


def host_heaps(cfg: Any) -> dict[str, dict[str, float]]:
    """Each ingest host's glibc heap (``IngestHost.memory``: heap, in use, free inside it, mmapped; MB) and its
    cyclic garbage collector's counters (full collections since start, objects frozen)."""
    import ray

    from serve.deploy.hosts import STREAM_NAMESPACE

    out = {}
    for k in range(cfg.serve.ingest.hosts):
        name = f"{cfg.serve.app_name}/ingest/{k}"
        try:
            mem = ray.get(ray.get_actor(name, namespace=STREAM_NAMESPACE).memory.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - a host being restarted has no numbers this sample
            continue
        out[name] = {key: round(v, 1) for key, v in mem.model_dump().items()
                     if v is not None and (key.endswith("_mb") or key.startswith("gc_"))}
    return out


def host_rss(snapshot: dict[str, float]) -> float:
    return sum(v for k, v in snapshot.items() if "IngestHostActor" in k)


def main() -> None:
    args = parse_args()
    from serve.deploy.app import start_service, stop_service
    from serve.http.client import StcClient
    from serve.core.config import ServiceConfig

    media = Path(tempfile.mkdtemp(prefix="soak-media-"))
    if args.video == "synthetic":
        from tests.media import make_clip

        make_clip(media / "soak.avi", num_frames=120, fps=10, size=(160, 120))
    elif Path(args.video).is_file():
        shutil.copy(args.video, media / "soak.avi")
    else:
        raise SystemExit(f"--video {args.video}: no such file; pass a video path, or --video synthetic for a "
                         "generated 120-frame 160x120 clip")
    from stream.sources.file import probe_file

    info = probe_file(media / "soak.avi").info
    file_clip = {"video": args.video, "size": [info.width, info.height], "frames": info.num_frames}
    n_total = args.streams + args.probe_streams + 2
    cfg = ServiceConfig.load(args.config, {
        "model": {"name": args.model},
        "serve": {"http": {"port": free_port()}, "media_root": str(media), "max_streams": n_total,
                  "max_streams_per_replica": n_total, "ingress": {"num_cpus": 0}, "ingest": {"num_cpus": 0},
                  "vision": {"num_cpus": 0}, "llm": {"num_cpus": 0}},
    })
    client = StcClient(start_service(cfg, num_cpus=2, object_store_memory=200 * 2**20), timeout_s=120)
    try:
        warm = client.create_stream(stream_id="warm")["stream_id"]  # starts the ingest hosts
        client.close_stream(warm)
        time.sleep(2.0)
        before = host_rss(ray_rss_mb())
        probes = [client.create_stream(stream_id=f"probe{i}")["stream_id"] for i in range(args.probe_streams)]
        time.sleep(2.0)
        ingest_mb = (host_rss(ray_rss_mb()) - before) / args.probe_streams
        for sid in probes:
            client.close_stream(sid)
        soak = Soak(client, args, load_frames((160, 120), 32))
        canary = Canary(client, args, soak.frames)
        for i in range(args.streams):
            soak.open("push" if i % 2 == 0 else "file")
        threads = [threading.Thread(target=f, daemon=True) for f in (soak.pusher, soak.questioner, soak.churner,
                                                                     canary.run)]
        for t in threads:
            t.start()
        t0, samples, heaps = time.monotonic(), [], []
        end = t0 + args.minutes * 60
        app = cfg.serve.app_name
        faults = {"IngestHostActor": args.kill_host_after, f"ServeReplica:{app}:llm": args.kill_llm_after,
                  f"ServeReplica:{app}:vision": args.kill_vision_after}
        killed: list[str] = []
        while time.monotonic() < end:
            for title, after in list(faults.items()):
                if after is not None and time.monotonic() - t0 >= after:
                    key = kill_host_without(cfg, canary.sid) if title == "IngestHostActor" else kill_one(title)
                    killed.append(f"{key} at {time.monotonic() - t0:.0f}s")
                    del faults[title]
            snap = ray_rss_mb()
            kv = sum((s.get("kv_bytes") or 0) for s in soak._guard("list", client.list_streams) or [])
            samples.append((time.monotonic() - t0, snap, kv / 2**20))
            heaps.append(host_heaps(cfg))
            time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
        soak.stop.set()
        canary.stop.set()
        for t in threads:
            t.join(60)
        frames, dropped = soak.totals()
        canary_verdict = canary.verdict()
    finally:
        stop_service()
    warm_from = samples[len(samples) // 3][0] if samples else 0.0
    slopes = {}
    for key in samples[-1][1] if samples else {}:
        pts = [(t, s[key]) for t, s, _ in samples if t >= warm_from and key in s]
        slopes[key] = round(slope_per_min([p[0] for p in pts], [p[1] for p in pts]), 3)
    net_slopes = {}  # per host: RSS minus the pixels held in its bounded chunk queues (what a leak shows in)
    for name in sorted({n for h in heaps for n in h}):
        pts = [(t, h[name]["rss_mb"] - h[name].get("frames_mb", 0.0)) for (t, _, _), h in zip(samples, heaps)
               if t >= warm_from and name in h]
        if len(pts) > 2:
            net_slopes[name] = round(slope_per_min([p[0] for p in pts], [p[1] for p in pts]), 3)
    if args.series and samples:
        keys = sorted({k for _, snap, _ in samples for k in snap})
        args.series.write_text(json.dumps({
            "t_s": [round(t, 1) for t, _, _ in samples], "kv_mb": [round(kv, 3) for _, _, kv in samples],
            "rss_mb": {k: [round(s[k], 1) if k in s else None for _, s, _ in samples] for k in keys},
            "host_heap": heaps,
        }))
    if args.plot and samples:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        for key in samples[-1][1]:
            ax.plot([t / 60 for t, _, _ in samples], [s.get(key, np.nan) for _, s, _ in samples], label=key[:40])
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS MB")
        ax.legend(fontsize=6)
        fig.savefig(args.plot, dpi=120)
    print(json.dumps({
        "bench": "soak", "streams": args.streams, "minutes": args.minutes, "clock": "wall",
        "rss_mb_start": round(sum(samples[0][1].values()), 1) if samples else None,
        "rss_mb_end": round(sum(samples[-1][1].values()), 1) if samples else None,
        "slope_mb_per_min": max(slopes.values()) if slopes else None,
        "ingest_mb_per_stream": round(ingest_mb, 2), "errors": len(soak.errors), "error_examples": soak.errors[:3],
        "races": len(soak.races), "race_examples": soak.races[:2], "unavailable_503": len(soak.unavailable),
        "frames": frames, "dropped": dropped, "file_clip": file_clip,
        "failed_streams": len(soak.failed), "failed_examples": soak.failed[:2],
        "kv_mb_end": round(samples[-1][2], 3) if samples else None,
        "slopes_mb_per_min": slopes, "host_net_slopes_mb_per_min": net_slopes,
        "host_heap_end": heaps[-1] if heaps else None,
        "random_weights": args.model is None, "config": str(args.config) if args.config else None,
        "process": cfg.serve.process.model_dump(),
        "killed": killed, "canary": canary_verdict,
        "machine": machine_info("cpu"),
    }))


if __name__ == "__main__":
    main()
