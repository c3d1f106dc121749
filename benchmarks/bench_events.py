#!/usr/bin/env python
"""Event retention: does compression keep what changed? A real object is planted into real video at known places.

    python benchmarks/bench_events.py --video ../shared/media/vtest.avi [--object ../shared/media/box.mp4]
        [--frames 8] [--fps 1] [--planted 3,4,5] [--keep 0.25] [--layers 27] [--plot out.png]

1. **Plant.** A crop from another real video (``--object``, its centre ``--object-frac`` of the short side) is pasted
   into frames ``--planted`` of ``--video`` (sampled at ``--fps``), moving ``--step`` px per frame. Its tokens are
   known exactly: a token (pruner: the projector's 14x14 grid; cacher: SigLIP's 27x27 patches) is an *object token*
   when the object covers at least half of its cell. A planted change is a change for any encoder, so this is
   meaningful with random weights (used here: no checkpoint can be downloaded).
2. **Pruner recall** per policy at ``--keep`` of the tokens: object tokens kept / object tokens, over the planted
   frames (LLaVA-OneVision architecture, small random-weight SigLIP with the real 384 px / 196-token geometry; the
   stream is pruned chunk by chunk as in the service). ``random`` and ``uniform`` keep about ``--keep`` of them.
3. **Cacher fidelity** per setting (SigLIP-so400m shape, random weights, CPU time on one thread): over the planted
   frames, ``1 - |cached - full|^2 / |copy - full|^2`` on the object tokens and on the background tokens separately,
   ``copy`` being the reference frame's full output (stale features). A frame the cacher encodes fully counts 1.0
   (it saw the change); ``planted_reused`` says how many planted frames were reused instead.

Targets at 25 %: the default pruner keeps >= 2x the object tokens random and uniform keep; the default cacher's
object-token fidelity >= 0.90. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_cacher import build_tower, load_clip, parse_setting, timed  # noqa: E402
from benchmarks.common import machine_info  # noqa: E402
from cache.cacher import StreamCacher  # noqa: E402
from cache.config import CacherConfig  # noqa: E402
from pruner import PrunerConfig, StreamPruner  # noqa: E402
from stream.models.preprocess import frames_to_pixel_values  # noqa: E402

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
POLICIES = ["stc_context", "stc", "stc_adaptive", "temporal_diff", "attention", "uniform", "random"]
CACHER_SETTINGS = ["default", "ratio=0.25,max_reuse=3", "ratio=0.1,max_reuse=3", "ratio=0.25,max_reuse=1"]


def plant(rgb: np.ndarray, obj: np.ndarray, frames: list[int], frac: float, step: int
          ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Paste the centre crop of ``obj`` ``[h, w, 3]`` into ``rgb`` ``[N, H, W, 3]`` at ``frames`` -> the new video and
    each planted frame's box ``(top, left, bottom, right)`` in pixels."""
    out, (hh, ww) = rgb.copy(), rgb.shape[1:3]
    side = int(frac * min(hh, ww))
    oy, ox = (obj.shape[0] - side) // 2, (obj.shape[1] - side) // 2
    crop = obj[oy:oy + side, ox:ox + side]
    boxes = []
    for k, f in enumerate(frames):
        top, left = int(0.3 * hh), min(ww - side, int(0.45 * ww) + k * step)
        out[f, top:top + side, left:left + side] = crop
        boxes.append((top, left, top + side, left + side))
    return out, boxes


def cell_mask(box: tuple[int, int, int, int], hw: tuple[int, int], grid: int) -> torch.Tensor:
    """``[grid * grid]`` bool: cells of a ``grid x grid`` split of an ``hw`` frame that ``box`` covers >= half of."""
    top, left, bottom, right = box
    ys, xs = np.linspace(0, hw[0], grid + 1), np.linspace(0, hw[1], grid + 1)
    cov_y = np.clip(np.minimum(ys[1:], bottom) - np.maximum(ys[:-1], top), 0, None) / np.diff(ys)  # [grid]
    cov_x = np.clip(np.minimum(xs[1:], right) - np.maximum(xs[:-1], left), 0, None) / np.diff(xs)  # [grid]
    return torch.from_numpy((cov_y[:, None] * cov_x[None, :]).reshape(-1) >= 0.5)


def pruner_recall(rgb: np.ndarray, pts: list[float], planted: list[int], boxes, keep: float, chunk: int
                  ) -> dict[str, dict]:
    from benchmarks.bench_pruner import build_adapter, encode

    adapter = build_adapter("cpu", "tiny")
    tokens, attn = encode(adapter, rgb)  # [N, 196, d], [N, 196]
    rows, cols = tokens.grid
    objs = torch.stack([cell_mask(b, rgb.shape[1:3], rows) for b in boxes])  # [planted, T]
    out = {}
    for policy in POLICIES:
        pruner = StreamPruner(PrunerConfig(policy=policy, keep_ratio=keep, min_tokens_per_frame=1))
        masks = [pruner.select(tokens.embeds[s:s + chunk], tokens.positions, pts=pts[s:s + chunk],
                               attention=attn[s:s + chunk]).mask for s in range(0, len(rgb), chunk)]
        mask = torch.cat(masks)[planted]  # [planted, T]
        kept_obj = int((mask & objs).sum())
        out[policy] = {"recall": round(kept_obj / int(objs.sum()), 4), "object_tokens": int(objs.sum()),
                       "kept_ratio": round(float(torch.cat(masks).float().mean()), 4)}
    return out


def cacher_fidelity(rgb: np.ndarray, planted: list[int], boxes, settings: list[str], chunk: int, layers: int
                    ) -> dict[str, dict]:
    pv = frames_to_pixel_values(rgb, 384, (0.5,) * 3, (0.5,) * 3, "bicubic")
    tower = build_tower("cpu", torch.float32, layers)
    side = 384 // 14
    objs = {f: cell_mask(b, rgb.shape[1:3], side) for f, b in zip(planted, boxes)}  # frame -> [P]
    timed(tower, pv[:1], None, "cpu")  # warm-up
    full, t_full = [], 0.0
    for s in range(0, len(pv), chunk):
        out, t = timed(tower, pv[s:s + chunk], None, "cpu")
        full.append(out)
        t_full += t
    full_out = torch.cat(full)  # [N, P, D]
    results = {}
    for name in settings:
        cacher = StreamCacher(CacherConfig() if name == "default" else parse_setting(name))
        outs, decisions, t_c = [], [], 0.0
        for s in range(0, len(pv), chunk):
            out, t = timed(tower, pv[s:s + chunk], cacher, "cpu")
            outs.append(out)
            decisions += cacher.last_chunk_decisions()
            t_c += t
        cached = torch.cat(outs)
        source, fid_obj, fid_bg, reused = {}, [], [], 0
        for i, (kind, ref_id) in enumerate(decisions):
            if kind != "reuse":
                source[ref_id] = i
            if i not in objs:
                continue
            if kind != "reuse":
                fid_obj.append(1.0)
                fid_bg.append(1.0)
                continue
            reused += 1
            copy = full_out[source[ref_id]]
            for sel, acc in ((objs[i], fid_obj), (~objs[i], fid_bg)):
                err = float(((cached[i][sel] - full_out[i][sel]) ** 2).sum())
                base = float(((copy[sel] - full_out[i][sel]) ** 2).sum())
                acc.append(1.0 - err / base if base > 0 else 1.0)
        results[name] = {"object_fidelity": round(float(np.mean(fid_obj)), 4),
                         "background_fidelity": round(float(np.mean(fid_bg)), 4),
                         "object_fidelity_min": round(float(np.min(fid_obj)), 4), "planted_reused": reused,
                         "time_ratio": round(t_c / t_full, 4), "reuse_rate": cacher.stats()["reuse_rate"]}
        print(f"cacher {name:28s} object {results[name]['object_fidelity']:.3f} background "
              f"{results[name]['background_fidelity']:.3f} planted frames reused {reused}/{len(planted)} "
              f"time {results[name]['time_ratio']:.3f}", flush=True)
    return results


def plot(path: str, pr: dict, ca: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(list(pr), [v["recall"] for v in pr.values()], color="C0")
    ax1.axhline(2 * max(pr["random"]["recall"], pr["uniform"]["recall"]), ls="--", c="gray", lw=0.8)
    ax1.set(ylabel="object tokens kept / object tokens", title="pruner recall of the planted object", ylim=(0, 1))
    ax1.tick_params(axis="x", rotation=30, labelsize=8)
    x = np.arange(len(ca))
    ax2.bar(x - 0.2, [v["object_fidelity"] for v in ca.values()], 0.4, label="object tokens")
    ax2.bar(x + 0.2, [v["background_fidelity"] for v in ca.values()], 0.4, label="background")
    ax2.axhline(0.9, ls="--", c="gray", lw=0.8)
    ax2.set_xticks(x, list(ca), rotation=20, fontsize=7)
    ax2.set(ylabel="fidelity (1 exact, 0 stale copy)", title="cacher fidelity on planted frames")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", default=str(MEDIA / "vtest.avi"), help="background video, or an edited clip spec")
    ap.add_argument("--object", default=None, help="video the planted crop comes from (default: the other real one)")
    ap.add_argument("--object-time", type=float, default=1.0, help="seconds into --object of the cropped frame")
    ap.add_argument("--object-frac", type=float, default=0.3, help="crop side / the frame's short side")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--fps", type=float, default=1.0)
    ap.add_argument("--planted", default="3,4,5", help="frame indices the object appears in")
    ap.add_argument("--step", type=int, default=24, help="pixels the object moves right per planted frame")
    ap.add_argument("--keep", type=float, default=0.25, help="share of tokens the pruner keeps")
    ap.add_argument("--chunk", type=int, default=4, help="frames per pruner / cacher call")
    ap.add_argument("--layers", type=int, default=27, help="SigLIP depth for the cacher (27 = so400m)")
    ap.add_argument("--cacher-settings", default=";".join(CACHER_SETTINGS), help="';'-separated; 'default' = defaults")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import benchmarks.bench_cacher as bench_cacher

    bench_cacher._clock = time.process_time  # CPU time of this process on one thread (the shared CPU is noisy)
    t0 = time.perf_counter()
    first = Path(args.video.split("@")[0])
    obj_path = args.object or str(first.parent / ("box.mp4" if "vtest" in first.name else "vtest.avi"))
    rgb = load_clip(args.video, args.frames, args.fps)
    obj = load_clip(f"{obj_path}@{args.object_time}:1", 1, args.fps)[0]
    planted = [int(x) for x in args.planted.split(",")]
    if not all(0 <= f < args.frames for f in planted):
        raise SystemExit(f"--planted {args.planted} must index frames 0..{args.frames - 1}")
    rgb, boxes = plant(rgb, obj, planted, args.object_frac, args.step)
    pts = [i / args.fps for i in range(args.frames)]
    pr = pruner_recall(rgb, pts, planted, boxes, args.keep, args.chunk)
    for p, v in pr.items():
        print(f"pruner {p:14s} recall {v['recall']:.3f} ({v['object_tokens']} object tokens)", flush=True)
    ca = cacher_fidelity(rgb, planted, boxes, args.cacher_settings.split(";"), args.chunk, args.layers)
    default_policy = PrunerConfig().policy
    default_cacher = next((n for n in ca if (CacherConfig() if n == "default" else parse_setting(n)) == CacherConfig()),
                          None)  # the setting that equals CacherConfig()'s defaults, under whatever name
    base = max(pr["random"]["recall"], pr["uniform"]["recall"])
    result = {
        "bench": "events", "video": Path(args.video).name if "@" not in args.video else args.video,
        "object": Path(obj_path).name, "frames": args.frames, "planted": planted, "keep": args.keep,
        "random_weights": True, "default_policy": default_policy, "pruner": pr, "cacher": ca,
        "recall_default": pr[default_policy]["recall"], "recall_random": pr["random"]["recall"],
        "recall_uniform": pr["uniform"]["recall"],
        "recall_ratio_vs_best_baseline": round(pr[default_policy]["recall"] / base, 3) if base else None,
        "target_recall_met": pr[default_policy]["recall"] >= 2 * base,
        "default_cacher": default_cacher,
        "object_fidelity_default": ca[default_cacher]["object_fidelity"] if default_cacher else None,
        "target_fidelity_met": bool(default_cacher) and ca[default_cacher]["object_fidelity"] >= 0.9,
        "clock": "cpu (process_time, 1 thread)", "layers": args.layers,
        "wall_s": round(time.perf_counter() - t0, 1), "machine": machine_info("cpu"),
    }
    if args.plot:
        plot(args.plot, pr, ca, f"{result['video']} + planted {result['object']} crop, keep {args.keep}, random "
                                f"weights")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
