"""STC-Cacher benchmark: ViT time and fidelity of selective recompute on real video, full-size SigLIP-so400m shape.

The tower is LLaVA-OneVision's (SigLIP-so400m/14 at 384 px: hidden 1152, 27 layers, 16 heads, MLP 4304, 729 tokens)
with random weights (seeded). Frames are decoded with decord at ``--fps`` and preprocessed with the shared
``stream.models.preprocess.frames_to_pixel_values``. The stream is fed chunk by chunk (``--chunk`` frames) to the
full encoder and, interleaved chunk by chunk, to one :class:`cache.cacher.StreamCacher` per setting.

Metrics per setting (all frames of the stream, reference encodes included):

* ``time_ratio``: total cached ViT wall time / total full ViT wall time (patch embedding + layers), same run.
  With ``--passes R`` the stream is replayed R times (decisions are deterministic) and each chunk's minimum is used.
* ``flop_ratio``: the same ratio from counted work (analytic matmul FLOPs per layer; noise-free cross-check).
* ``fidelity``: mean over frames of ``1 - ||cached - full||^2 / ||copy - full||^2`` where ``copy`` is the full
  output of the frame's reference (what a frame-level cache would return). Fully encoded frames are exact and
  count 1.0; ``fidelity_reused`` averages the reused frames only. Raw cosine is inflated with random weights
  (``copy_cos_mean`` shows how much a plain frame copy already scores), hence this normalisation.
* ``fidelity_vs_prev``: the reused frames' error against a stricter baseline that does not depend on the
  reference schedule, the previous frame's full output (``1 - ||cached - full||^2 / ||full[i-1] - full||^2``).
* ``cos_mean`` / ``cos_p5``: token cosine of cached vs full output, mean and 5th percentile over all tokens.
* ``gate_skip_rate``: frames the frame gate (``gate.*`` keys, ``cache/gate.py``) kept from the ViT / frames. Its time
  (thumbnails and decisions) counts in ``time_ratio``. A skipped frame is dropped as redundant; what the LLM last saw
  of it is the last encoded frame's output, so that stands in for it in ``cos_mean``, and ``skipped_cos_mean`` is
  its token cosine to the skipped frame's own full encode (a frame copy by design, so the copy-normalised
  ``fidelity`` would score it 0: ``fidelity`` averages the encoded frames only).

``--video still:PATH`` generates a still clip: PATH's first frame repeated ``--frames`` times at ``--fps`` as a fixed
camera sees it, with sensor noise (sigma 6 grey levels), flicker (+-3 % light per frame) and a slow light change (25 %
darker over the clip, with a left-right slope drifting up to 10 %).

Before timing: ``ratio=1.0`` must reproduce the full encoder (correctness check), and one frame is encoded as
warm-up. The last stdout line is one JSON object (primary setting's numbers at top level, every setting under
``sweep``, machine info). ``--plot out.png`` draws time ratio vs fidelity for the sweep.

Example (about 10 min on a busy 2-core CPU; CPU-time clock on one thread so other load does not skew ratios)::

    python benchmarks/bench_cacher.py --video ../shared/media/vtest.avi --frames 12 --fps 1 --threads 1 --clock cpu
    python benchmarks/bench_cacher.py --video still:../shared/media/vtest.avi --frames 24 --threads 1 --clock cpu \\
        --setting "gate.enabled=true" --sweep "gate.enabled=false"
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, progress  # noqa: E402
from cache.cacher import StreamCacher  # noqa: E402
from cache.config import CacherConfig  # noqa: E402
from cache.gate import FrameGate  # noqa: E402
from stream.models.preprocess import frames_to_pixel_values  # noqa: E402

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14)
PRIMARY = "ratio=0.1,max_reuse=3"
SWEEP = [
    "ratio=0.25,max_reuse=1",  # STC's schedule: a full encode every 2nd frame
    "ratio=0.25,max_reuse=3",  # CacherConfig's defaults
    PRIMARY,
    "ratio=0.1,max_reuse=5",
    "ratio=0.05,max_reuse=3",
    "ratio=0.0,threshold=0.97,max_reuse=3",
    "ratio=0.1,max_reuse=none,refresh_below=0.992",  # refresh on signature drift only
]


def parse_setting(text: str) -> CacherConfig:
    """``"ratio=0.25,max_reuse=4,gate.enabled=false"`` -> a validated :class:`CacherConfig` (``none`` for null;
    ``section.key`` for a nested section)."""
    data: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        *sections, name = key.strip().split(".")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
        value = value.strip()
        try:
            target[name] = None if value.lower() == "none" else json.loads(value)
        except json.JSONDecodeError:  # a bare word: a string setting (store_dtype=float16)
            target[name] = value
    return CacherConfig.parse(data, f"setting {text!r}")


def load_frames(video: str, frames: int, fps: float) -> np.ndarray:
    """``[N, H, W, 3]`` uint8: ``frames`` frames sampled at ``fps`` from the start of ``video`` (decord)."""
    import decord

    vr = decord.VideoReader(video)
    step = vr.get_avg_fps() / fps
    idx = [int(round(i * step)) for i in range(frames)]
    if idx[-1] >= len(vr):
        raise SystemExit(f"{video} has {len(vr)} frames; {frames} frames at {fps} fps need {idx[-1] + 1}. "
                         "Fix: lower --frames or raise --fps.")
    return vr.get_batch(idx).asnumpy()


def load_clip(spec: str, frames: int, fps: float) -> np.ndarray:
    """``spec`` is a video path, or an edited clip of segments ``"PATH@START_S:N,PATH@START_S:N,..."`` (N frames at
    ``fps`` from START_S of each, concatenated: a film clip with shot changes) -> ``[frames, H, W, 3]`` uint8, every
    segment resized to the first one's size; ``"still:PATH"`` is :func:`still_clip` of PATH's first frame."""
    if spec.startswith("still:"):
        return still_clip(load_frames(spec[len("still:"):], 1, fps)[0], frames)
    if "@" not in spec:
        return load_frames(spec, frames, fps)
    import decord
    from PIL import Image

    parts = []
    for seg in spec.split(","):
        path, _, rest = seg.partition("@")
        start, _, n = rest.partition(":")
        vr = decord.VideoReader(path, num_threads=1)
        src = vr.get_avg_fps()
        idx = [int(round((float(start) + i / fps) * src)) for i in range(int(n))]
        if idx[-1] >= len(vr):
            raise SystemExit(f"segment {seg!r}: {path} has {len(vr)} frames, needs {idx[-1] + 1}. Fix: start earlier")
        parts.append(vr.get_batch(idx).asnumpy())
    h, w = parts[0].shape[1:3]
    rgb = np.concatenate([p if p.shape[1:3] == (h, w) else
                          np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BICUBIC)) for f in p])
                          for p in parts])
    if len(rgb) < frames:
        raise SystemExit(f"edited clip {spec!r} has {len(rgb)} frames, --frames asks {frames}. Fix: add segments")
    return rgb[:frames]


def still_clip(frame: np.ndarray, frames: int, noise: float = 6.0, flicker: float = 0.03, dim: float = 0.25,
               slope: float = 0.1, seed: int = 0) -> np.ndarray:
    """``[frames, H, W, 3]`` uint8: ``frame`` ``[H, W, 3]`` as a fixed camera sees it over time: Gaussian sensor noise
    of ``noise`` grey levels, a flicker of +-``flicker`` of the light per frame, the light falling by ``dim`` over
    the clip with a left-right slope drifting up to ``slope``; rounded and clipped as a sensor would."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1.0, 1.0, frame.shape[1], dtype=np.float32)[None, :, None]  # [1, W, 1]
    out = np.empty((frames, *frame.shape), np.uint8)
    for i in range(frames):
        t = i / max(1, frames - 1)
        light = (1 - dim * t) * (1 + rng.uniform(-flicker, flicker)) * (1 + slope * t * x)
        out[i] = np.clip(np.rint(frame * light + rng.normal(0, noise, frame.shape)), 0, 255).astype(np.uint8)
    return out


def build_tower(device: str, dtype: torch.dtype, layers: int) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    with torch.device(device):
        tower = SiglipVisionModel(SiglipVisionConfig(**{**SO400M, "num_hidden_layers": layers}))
    return tower.to(dtype).eval()


# real vision-tower shapes of the Qwen families (random weights; the LLM side is tiny and unused here)
QWEN_TOWERS = {
    "qwen2_5_vl": dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, patch_size=14,
                       window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),  # Qwen2.5-VL-7B
    "qwen3_vl": dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, patch_size=16,
                     num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),  # Qwen3-VL-8B
}


def build_qwen_tower(family: str, device: str, dtype: torch.dtype, layers: int, max_pixels: int,
                     text_overrides: dict[str, Any] | None = None, all_full: bool = False):
    """The family's adapter around a real-shape vision tower (tiny random LLM unless ``text_overrides`` give its
    shape, as bench_pruner does); ``preprocess`` gives its patches."""
    from stream.models.base import PreprocessSpec
    from stream.models.loading import FAMILY_BY_MODEL_TYPE
    from stream.models.tiny import build_tiny_model, train_tokenizer

    tok = train_tokenizer(family)
    vision = {**QWEN_TOWERS[family], "depth": min(layers, QWEN_TOWERS[family]["depth"])}
    vision["fullatt_block_indexes"] = [i for i in vision.get("fullatt_block_indexes", []) if i < vision["depth"]]
    if all_full:  # ablation: every Qwen2.5-VL block attends over the whole temporal patch (no windows)
        vision["fullatt_block_indexes"] = list(range(vision["depth"]))
    vision["deepstack_visual_indexes"] = [i for i in vision.get("deepstack_visual_indexes", []) if i < vision["depth"]]
    if family == "qwen2_5_vl":
        vision.pop("deepstack_visual_indexes")
    else:
        vision.pop("fullatt_block_indexes")
    with torch.device(device):
        model = build_tiny_model(family, tok, text_overrides=text_overrides, vision_overrides=vision).to(dtype)
    cls, _, template = FAMILY_BY_MODEL_TYPE[family]
    mean = (0.5,) * 3
    adapter = cls(model, tok, PreprocessSpec(size=0, mean=mean, std=mean), template)
    adapter.max_pixels = max_pixels
    return adapter


def _embed_and_layers(tower, pv: torch.Tensor):
    """``(hidden [N, P, D], layers)`` for a SigLIP tower or a Qwen adapter (grid-bound blocks)."""
    if hasattr(tower, "grid_layers"):
        return tower.vision_embed(pv), tower.grid_layers(pv.shape[1], pv.shape[2])
    return tower.embeddings(pv), tower.encoder.layers


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter
FPS = 1.0  # the clip's sampling rate (the gate reads frame times)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def timed(
    tower: torch.nn.Module, pv: torch.Tensor, cacher: StreamCacher | None, device: str
) -> tuple[torch.Tensor, float]:
    """ViT output (before post-norm: LLaVA-OV uses the last layer as is) and seconds on the chosen clock."""
    _sync(device)
    t0 = _clock()
    hidden, layers = _embed_and_layers(tower, pv)  # [N, P, D]
    if cacher is None:
        for layer in layers:
            hidden = layer(hidden, attention_mask=None)
    else:
        hidden = cacher.encode(hidden, layers)
    _sync(device)
    return hidden, _clock() - t0


def layer_flops(tokens: int, dim: int, inter: int, recomputed: float | None = None,
                sketch: int | None = None) -> float:
    """Matmul FLOPs of one layer for one frame; ``recomputed`` tokens (None: all, the plain layer). Finding them
    costs every token's key (``sketch`` None) or its ``sketch``-wide key sketch, whose picked tokens then need keys."""
    if recomputed is None:
        return 2 * tokens * dim * (4 * dim + 2 * inter) + 4 * tokens * tokens * dim
    k = recomputed
    find = 2 * tokens * dim * dim if sketch is None else 2 * tokens * dim * sketch + 2 * k * dim * dim
    return find + 2 * k * dim * (3 * dim + 2 * inter) + 4 * k * tokens * dim


def flop_ratio(stats: dict[str, Any], tokens: int, dim: int, inter: int, layers: int,
               sketch: int | None = None, frames: int | None = None) -> float:
    """Cached / full ViT layer FLOPs over ``frames`` frames (default: the frames the cacher saw; more when a gate
    kept some from it)."""
    full = layers * layer_flops(tokens, dim, inter)
    cached = stats["frames_full"] * full
    reused = stats["frames_reused"]
    if reused:
        cached += sum(reused * layer_flops(tokens, dim, inter, r / reused, sketch) for r in stats["tokens_recomputed"])
    return cached / ((frames or stats["frames"]) * full)


def quality(cached: torch.Tensor, full: torch.Tensor, decisions: list[tuple[str, int]]) -> dict[str, float]:
    """Fidelity vs a frame-level copy, and token cosines (see the module docstring)."""
    source: dict[int, int] = {}  # reference id -> frame whose full encode it holds
    fid, fid_reused, copy_cos, fid_prev, skipped_cos = [], [], [], [], []
    for i, (kind, ref_id) in enumerate(decisions):
        if kind == "skip":  # gated: ``cached[i]`` is the last encoded frame's output (see the module docstring)
            skipped_cos.append(torch.nn.functional.cosine_similarity(cached[i], full[i], dim=-1).mean().item())
            continue
        if kind != "reuse":
            source[ref_id] = i
            fid.append(1.0)
            continue
        copy = full[source[ref_id]]
        err = float(((cached[i] - full[i]) ** 2).sum())
        base = float(((copy - full[i]) ** 2).sum())
        value = 1.0 - err / base if base > 0 else 1.0
        fid.append(value)
        fid_reused.append(value)
        prev = float(((full[i - 1] - full[i]) ** 2).sum())  # a cache refreshed every frame would return full[i-1]
        fid_prev.append(1.0 - err / prev if prev > 0 else 1.0)
        copy_cos.append(torch.nn.functional.cosine_similarity(copy, full[i], dim=-1).mean().item())
    cos = torch.nn.functional.cosine_similarity(cached.float(), full.float(), dim=-1).flatten()  # [N * P]
    return {
        "fidelity": float(np.mean(fid)),
        "fidelity_reused": float(np.mean(fid_reused)) if fid_reused else 1.0,
        "fidelity_reused_min": float(np.min(fid_reused)) if fid_reused else 1.0,
        "fidelity_vs_prev": float(np.mean(fid_prev)) if fid_prev else 1.0,
        "cos_mean": cos.mean().item(),
        "cos_p5": torch.quantile(cos, 0.05).item(),
        "copy_cos_mean": float(np.mean(copy_cos)) if copy_cos else 1.0,
        "skipped_cos_mean": float(np.mean(skipped_cos)) if skipped_cos else None,
    }


def check_exact(tower: torch.nn.Module, pv: torch.Tensor, device: str, tol: float) -> float:
    """ratio=1.0 (every token recomputed) against the plain encoder on the first 2 frames; raises when off."""
    full, _ = timed(tower, pv[:2], None, device)
    cacher = StreamCacher(CacherConfig(ratio=1.0, max_reuse=None, match_threshold=-1.0, refresh_cell_below=None))
    cached = torch.cat([timed(tower, pv[i:i + 1], cacher, device)[0] for i in range(2)])
    assert cacher.stats()["frames_reused"] == 1, cacher.stats()
    err = (cached - full).abs().max().item()
    if not err <= tol:
        raise SystemExit(f"correctness check failed: ratio=1.0 differs from the full encoder by {err} > {tol}")
    return err


def run_stream(tower, pv, rgb, configs, chunk, device, passes):
    """Full and cached encodes, interleaved per chunk; per-chunk minimum over passes. A setting with the gate on
    times its decisions and encodes the passing frames only; a skipped frame's output is the last encoded one."""
    n = len(pv)
    starts = list(range(0, n, chunk))
    t_full = np.full(len(starts), np.inf)
    t_cached = np.full((len(configs), len(starts)), np.inf)
    t_gate = np.zeros((len(configs), len(starts)))
    for _ in progress(range(passes), "passes"):
        cachers = [StreamCacher(c) for c in configs]
        gates = [FrameGate(c.gate) if c.gate.enabled else None for c in configs]
        full_out, cached_out, decisions = [], [[] for _ in configs], [[] for _ in configs]
        for j, s in enumerate(starts):
            out, t = timed(tower, pv[s:s + chunk], None, device)
            full_out.append(out)
            t_full[j] = min(t_full[j], t)
            for k, (cacher, gate) in enumerate(zip(cachers, gates)):
                t0 = _clock()
                keep = gate.admit(rgb[s:s + chunk], np.arange(s, s + len(out)) / FPS) if gate else \
                    np.ones(len(out), bool)
                t = t_gate[k, j] = _clock() - t0
                if keep.any():
                    enc, t_enc = timed(tower, pv[s:s + chunk][torch.from_numpy(keep)], cacher, device)
                    t += t_enc
                    made = iter(zip(enc, cacher.last_chunk_decisions()))
                for i, kept in enumerate(keep):
                    frame_out, decision = next(made) if kept else (cached_out[k][-1], ("skip", -1))
                    cached_out[k].append(frame_out)
                    decisions[k].append(decision)
                t_cached[k, j] = min(t_cached[k, j], t)
    full = torch.cat(full_out)
    gate_stats = [{**g.stats(), "ms_per_frame": 1e3 * float(t_gate[k].sum()) / n} if g else None
                  for k, g in enumerate(gates)]
    return full, [torch.stack(o) for o in cached_out], decisions, [c.stats() for c in cachers], t_full, t_cached, \
        gate_stats


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r["time_ratio"], r["fidelity"], s=40)
        ax.annotate(r["setting"], (r["time_ratio"], r["fidelity"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.axvline(0.40, ls="--", lw=0.8, c="gray")
    ax.axhline(0.80, ls="--", lw=0.8, c="gray")
    ax.set_xlabel("time ratio (cached / full ViT time, references included)")
    ax.set_ylabel("fidelity (1 = exact, 0 = frame copy)")
    ax.set_title("STC-Cacher on SigLIP-so400m shape (random weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", default=str(Path(__file__).resolve().parents[2] / "shared/media/vtest.avi"),
                   help="a video file, an edited clip 'PATH@START_S:N,PATH@START_S:N,...' (segments at --fps), or "
                        "'still:PATH' (PATH's first frame with sensor noise, flicker and a slow light change)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--fps", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=4, help="frames per encode call (a streaming chunk)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--layers", type=int, default=27, help="encoder depth (27 = so400m; fewer only for smoke runs; "
                   "a Qwen tower keeps at most its own depth: pass 32 for Qwen2.5-VL-7B)")
    p.add_argument("--family", choices=["llava_onevision", *QWEN_TOWERS], default="llava_onevision",
                   help="tower shape: SigLIP-so400m (LLaVA-OV), Qwen2.5-VL-7B (windowed) or Qwen3-VL-8B (DeepStack)")
    p.add_argument("--max-pixels", type=int, default=192 * 28 * 28,
                   help="Qwen: smart-resize area cap per frame (the real default is larger; kept small for CPU)")
    p.add_argument("--all-full", action="store_true",
                   help="Qwen2.5-VL ablation: every block full attention (no windows), to measure what windows cost")
    p.add_argument("--setting", default=PRIMARY, help="primary cacher setting, e.g. 'ratio=0.15,max_reuse=4' (nested: "
                   "'gate.enabled=false')")
    p.add_argument("--sweep", default=";".join(SWEEP), help="';'-separated settings for the sweep ('' = primary only)")
    p.add_argument("--passes", type=int, default=1, help="replay the stream this many times, keep per-chunk minima")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or this process's CPU time ('cpu': with --threads 1, robust to other load on a "
                        "shared CPU; cpu device only)")
    p.add_argument("--plot", default=None, help="write time ratio vs fidelity to this PNG")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked but torch sees no CUDA device. Fix: use --device cpu.")
    if args.clock == "cpu" and args.device == "cuda":
        raise SystemExit("--clock cpu measures CPU time, not GPU work. Fix: use --clock wall with --device cuda.")
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock, FPS
    _clock, FPS = CLOCKS[args.clock], args.fps
    dtype = getattr(torch, args.dtype)

    names = list(dict.fromkeys([args.setting, *filter(None, args.sweep.split(";"))]))
    configs = [parse_setting(s) for s in names]
    rgb = load_clip(args.video, args.frames, args.fps)
    if args.family == "llava_onevision":
        pv = frames_to_pixel_values(rgb, 384, (0.5,) * 3, (0.5,) * 3, "bicubic").to(args.device, dtype)
        tower = build_tower(args.device, dtype, args.layers)
        dims = (SO400M["image_size"] // SO400M["patch_size"]) ** 2, SO400M["hidden_size"], SO400M["intermediate_size"]
    else:  # one "frame" of the cacher = one temporal patch of 2 video frames
        tower = build_qwen_tower(args.family, args.device, dtype, args.layers, args.max_pixels,
                                 all_full=args.all_full)
        pv = tower.preprocess(rgb)
        vc = tower.model.config.vision_config
        dims = pv.shape[1] * pv.shape[2] * pv.shape[3], vc.hidden_size, vc.intermediate_size
        args.layers = vc.depth
        configs = [c.resolved(tower.cell_refresh) for c in configs]  # refresh_cell_below='auto': the family's
        print(f"{args.family}: {len(pv)} temporal patches of {dims[0]} patches (grid {tuple(pv.shape[1:3])})")
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    exact_err = check_exact(tower, pv, args.device, tol)
    print(f"correctness: ratio=1.0 vs full encoder max |diff| = {exact_err:.2e} (tol {tol})", flush=True)
    timed(tower, pv[:1], None, args.device)  # warm-up

    if args.family != "llava_onevision" and any(c.gate.enabled for c in configs):
        print("frame gate off: it is measured on the SigLIP tower here (a Qwen cacher frame is 2 video frames)")
        configs = [c.model_copy(update={"gate": c.gate.model_copy(update={"enabled": False})}) for c in configs]
    full, cached, decisions, stats, t_full, t_cached, gates = run_stream(tower, pv, rgb, configs, args.chunk,
                                                                         args.device, args.passes)
    results = []
    for k, name in enumerate(names):
        flops = flop_ratio(stats[k], *dims, args.layers, configs[k].sketch_width(dims[1]), len(full))
        row = {"setting": name, "time_ratio": float(t_cached[k].sum() / t_full.sum()),
               "flop_ratio": flops, "gate_skip_rate": gates[k]["skip_rate"] if gates[k] else 0.0,
               "gate_ms_per_frame": gates[k]["ms_per_frame"] if gates[k] else 0.0,
               **quality(cached[k], full, decisions[k]),
               "reuse_rate": stats[k]["reuse_rate"], "frames_full": stats[k]["frames_full"],
               "recompute_fraction": stats[k]["recompute_fraction"], "refs_held": stats[k]["refs_held"],
               "store_mb": round(stats[k]["store_bytes"] / 2**20, 1)}
        results.append({k2: round(v, 4) if isinstance(v, float) else v for k2, v in row.items()})
        print(f"{name:45s} time {row['time_ratio']:.3f} flops {row['flop_ratio']:.3f} gate_skip_rate "
              f"{row['gate_skip_rate']:.3f} fidelity {row['fidelity']:.3f} (reused {row['fidelity_reused']:.3f}, vs "
              f"prev {row['fidelity_vs_prev']:.3f}) cos {row['cos_mean']:.4f} p5 {row['cos_p5']:.4f} reuse "
              f"{row['reuse_rate']:.2f}", flush=True)
    if args.plot:
        plot(results, args.plot)
    summary = {**results[0], "frames": args.frames, "fps": args.fps, "chunk": args.chunk,
               "video": ("still:" if args.video.startswith("still:") else "")
               + Path(args.video.removeprefix("still:")).name, "family": args.family, "all_full": args.all_full,
               "layers": args.layers, "dtype": args.dtype, "passes": args.passes,
               "clock": args.clock, "exact_max_diff": exact_err,
               "full_s_per_frame": round(float(t_full.sum()) / args.frames, 3), "sweep": results,
               "machine": machine_info(args.device, python=platform.python_version())}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
