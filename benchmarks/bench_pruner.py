#!/usr/bin/env python
"""LLM prefill with token pruning vs without, on real video frames, plus a fidelity proxy.

    python benchmarks/bench_pruner.py --video ../shared/media/vtest.avi [--family llava_onevision] [--budget 49]
        [--policy stc] [--frames 16] [--fps 1] [--device cpu|cuda] [--plot out.png]

Model: the real architecture of ``--family`` with RANDOM weights (no checkpoint can be downloaded here):

* ``llava_onevision``: a small SigLIP tower (hidden 64, 2 layers, real 384 px / 27x27-patch geometry -> 196 tokens
  per frame) and a Qwen2-0.5B shaped LLM on CPU (Qwen2-7B shaped, bfloat16, on cuda).
* ``qwen2_5_vl`` / ``qwen3_vl``: the real-size vision tower of Qwen2.5-VL-7B (32 windowed/full blocks, width 1280) /
  Qwen3-VL-8B (27 blocks, width 1152, DeepStack), as ``bench_cacher.py --family`` builds it, frames resized within
  ``--max-pixels``; one pruner "frame" is a temporal patch of 2 video frames. LLM: Qwen2-0.5B shape (Qwen2.5-VL) /
  Qwen3-0.6B shape (Qwen3-VL) on CPU, Qwen2-7B / Qwen3-8B shapes on cuda, with the family's M-RoPE (3 position
  rows; kept tokens keep their original positions) and DeepStack (a dropped token leaves every level).

Frames are decoded from the real video with decord.

Measured in one run:
1. correctness: keep-all pruning reproduces the unpruned LLM input; cached question logits equal a one-shot
   prefill; every policy keeps exactly the budget.
2. prefill time of the whole sequence (prompt prefix + video chunk + question), unpruned vs pruned, interleaved,
   median of ``--repeats``; the pruned time includes the pruner's own selection time.
3. fidelity proxy: KL(unpruned || pruned) of the next-token distribution after each of 8 questions, for the
   chosen policy and for random and uniform selection at the same budget. With random weights the distribution
   is close to uniform, so only the comparison between policies means anything; accuracy needs a real checkpoint.

The last stdout line is one JSON object.
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

from benchmarks.common import machine_info, progress  # noqa: E402
from benchmarks.pruner_inputs import Kept, Seq, forward, mrope_overrides  # noqa: E402

from pruner import PrunerConfig, StreamPruner, available_policies  # noqa: E402
from stream.models.base import PreprocessSpec, VisualTokens, VLMAdapter  # noqa: E402
from stream.models.llava_onevision import LLAVA_OV_CHAT_TEMPLATE, LlavaOneVisionAdapter  # noqa: E402
from stream.models.tiny import build_tiny_model, train_tokenizer  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936)
QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064)
QUESTIONS = [
    "What is happening in the video?",
    "How many people are there?",
    "Describe the scene.",
    "What moves in the last second?",
    "Where is the camera?",
    "What color is the largest object?",
    "Does anyone walk to the left?",
    "What happened first?",
]
QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936)
QWEN3_8B = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936)
SHAPES = {"qwen2-0.5b": QWEN2_05B, "qwen2-7b": QWEN2_7B, "qwen3-0.6b": QWEN3_06B, "qwen3-8b": QWEN3_8B, "tiny": {}}
FAMILIES = ("llava_onevision", "qwen2_5_vl", "qwen3_vl")
DEFAULT_SHAPE = {"llava_onevision": ("qwen2-0.5b", "qwen2-7b"), "qwen2_5_vl": ("qwen2-0.5b", "qwen2-7b"),
                 "qwen3_vl": ("qwen3-0.6b", "qwen3-8b")}  # (cpu, cuda)
SWEEP_POLICIES = ["stc_context", "stc", "stc_adaptive", "uniform", "random", "temporal_diff", "attention"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", default="../shared/media/vtest.avi", help="video file (decoded with decord)")
    ap.add_argument("--family", default="llava_onevision", choices=FAMILIES,
                    help="architecture: LLaVA-OV (small SigLIP), Qwen2.5-VL-7B or Qwen3-VL-8B vision tower")
    ap.add_argument("--vision-layers", type=int, default=None,
                    help="Qwen: tower depth (default: the real 32 / 27 blocks; fewer only for smoke runs)")
    ap.add_argument("--max-pixels", type=int, default=192 * 28 * 28,
                    help="Qwen: smart-resize area cap per frame (as bench_cacher.py; kept small for CPU)")
    ap.add_argument("--budget", type=int, default=None,
                    help="tokens kept per frame (Qwen: per temporal patch); default a quarter (49 of 196)")
    ap.add_argument("--policy", default=PrunerConfig().policy, choices=available_policies(),
                    help="policy measured (default: the config's default policy)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--frames", type=int, default=16, help="frames sampled from the video")
    ap.add_argument("--fps", type=float, default=1.0, help="sampling rate (frames per second of video)")
    ap.add_argument("--chunk", type=int, default=8, help="frames per pruner call (a streaming chunk)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed prefills per variant (median); the KL pass gives the first one")
    ap.add_argument("--llm-shape", default=None, choices=list(SHAPES),
                    help="LLM shape (default per family: qwen2-0.5b / qwen3-0.6b on cpu, qwen2-7b / qwen3-8b on "
                         "cuda; tiny = smoke test only)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--plot", default=None, help="write budget vs prefill ratio vs KL for every policy here")
    ap.add_argument("--sweep", default=None,
                    help="budgets swept for --plot (tokens per frame; default 25,49,98 for 196, else T/8,T/4,T/2)")
    return ap.parse_args(argv)




def load_frames(path: str, n: int, fps: float) -> tuple[np.ndarray, list[float]]:
    """``n`` frames at ``fps`` from the start of ``path`` -> ``[n, H, W, 3]`` uint8 and their pts (seconds).
    ``path`` may be an edited clip ``"PATH@START_S:N,..."`` (see ``bench_cacher.load_clip``; pts ``k / fps``)."""
    import decord

    if "@" in path:
        from benchmarks.bench_cacher import load_clip

        return load_clip(path, n, fps), [k / fps for k in range(n)]

    vr = decord.VideoReader(path, num_threads=1)
    src_fps = float(vr.get_avg_fps())
    idx = [round(k * src_fps / fps) for k in range(n)]
    if idx[-1] >= len(vr):
        raise SystemExit(f"{path} has {len(vr)} frames at {src_fps:.2f} fps: too short for {n} frames at {fps} fps; "
                         "lower --frames or raise --fps")
    return vr.get_batch(idx).asnumpy(), [i / src_fps for i in idx]


def build_adapter(device: str, shape_name: str, dtype_name: str | None = None, family: str = "llava_onevision",
                  max_pixels: int = 192 * 28 * 28, vision_layers: int | None = None) -> VLMAdapter:
    """Real classes of ``family``, random weights: its vision tower (small SigLIP for LLaVA-OV, the real-size Qwen
    tower otherwise), LLM of the named shape."""
    shape = SHAPES[shape_name]
    dtype = getattr(torch, dtype_name) if dtype_name else (torch.float32 if device == "cpu" else torch.bfloat16)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if family != "llava_onevision":
            from benchmarks.bench_cacher import build_qwen_tower

            torch.manual_seed(0)
            adapter = build_qwen_tower(family, device, dtype, vision_layers or 99, max_pixels,
                                       {**shape, **mrope_overrides(family, shape)})
            adapter.model.eval()
            return adapter
        tokenizer = train_tokenizer("llava_onevision")
        with torch.device(device):
            model = build_tiny_model("llava_onevision", tokenizer, text_overrides=shape, seed=0)
    finally:
        torch.set_default_dtype(old)
    spec = PreprocessSpec(size=384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return LlavaOneVisionAdapter(model.eval(), tokenizer, spec, LLAVA_OV_CHAT_TEMPLATE)


def encode(adapter: VLMAdapter, rgb: np.ndarray) -> tuple[VisualTokens, torch.Tensor]:
    """Frames -> visual tokens ``[N, T, d]`` and per-token attention ``[N, T]`` from the last used ViT layer
    (the adapter seam the ``attention`` policy uses in the service)."""
    with torch.inference_mode():
        feats, scores = adapter.encode_vision_attention(adapter.preprocess(rgb))  # [N, P, D], [N, P]
        tokens = adapter.project(feats)
    return tokens, adapter.attention_tokens(scores, tokens.grid)


def prune(cfg: PrunerConfig, tokens: VisualTokens, attn: torch.Tensor, pts: list[float], chunk: int) -> Kept:
    """Run one stream's pruner chunk by chunk -> the kept tokens (positions, DeepStack rows), selection seconds."""
    pruner, out, t0 = StreamPruner(cfg), Kept([], [], {name: [] for name in tokens.extras}), clock()
    for s in range(0, tokens.embeds.shape[0], chunk):
        e = tokens.embeds[s:s + chunk]
        result = pruner.select(e, tokens.positions, pts=pts[s:s + chunk], attention=attn[s:s + chunk])
        out.embeds += result.kept(e)
        out.positions += result.kept_positions(tokens.positions)
        for name, x in tokens.extras.items():  # a dropped token leaves every family extra (DeepStack levels)
            out.extras[name] += [x[s + f][result.mask[f]] for f in range(e.shape[0])]
    out.tokens, out.select_s = pruner.stats()["tokens_kept"], clock() - t0
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock() -> np.ndarray:
    """``[wall, cpu]`` seconds now. CPU time (this process, all threads) is reported beside wall time because
    the dev machine is shared: waiting for a core inflates wall time but not CPU time."""
    return np.array([time.perf_counter(), time.process_time()])


def prefill_time(adapter: VLMAdapter, seq: Seq, q: torch.Tensor) -> np.ndarray:
    """``[wall, cpu]`` seconds for one prefill of ``seq`` + ``q`` (fresh cache, logits of the last position)."""
    from transformers import DynamicCache

    device = adapter.device.type
    sync(device)
    t0 = clock()
    forward(adapter, seq, q, DynamicCache())
    sync(device)
    return clock() - t0


def question_logits(adapter: VLMAdapter, video: Seq, questions: list[torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """Prefill ``video`` + the first question in one timed forward, then each other question on top of the cached
    video (cropped away after) -> ``([Q, vocab]`` next-token logits, ``[wall, cpu]`` s of the first prefill)."""
    from transformers import DynamicCache

    device = adapter.device.type
    cache = DynamicCache()
    sync(device)
    t0 = clock()
    first = forward(adapter, video, questions[0], cache)
    sync(device)
    seconds = clock() - t0
    out = [first.double().cpu()]
    cache.crop(-questions[0].shape[0])  # negative = remove that many tokens: back to the cached video
    for q in questions[1:]:
        out.append(forward(adapter, video, q, cache, after_video=True).double().cpu())
        cache.crop(-q.shape[0])
    return torch.stack(out), seconds


def kl_mean(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(other)) in nats."""
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def mean_shift(embeds: torch.Tensor, kept: list[torch.Tensor]) -> float:
    """How far the kept tokens' mean moved from all tokens' mean, relative, averaged over frames: a diagnostic
    of how representative a selection is (what a random-weight LLM, which mostly averages, is sensitive to)."""
    full = embeds.float().mean(dim=1)  # [F, d]
    sub = torch.stack([k.float().mean(dim=0) for k in kept])  # [F, d]
    return float(((sub - full).norm(dim=-1) / full.norm(dim=-1)).mean())


class Bench:
    """The model, the encoded video and the prompt pieces shared by every measurement."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        torch.manual_seed(0)
        self.adapter = build_adapter(args.device, args.llm_shape, args.dtype, args.family, args.max_pixels,
                                     args.vision_layers)
        rgb, pts = load_frames(args.video, args.frames, args.fps)
        self.pts = self.adapter.frame_pts(pts)  # one per adapter frame (Qwen: per temporal patch)
        self.tokens, self.attn = encode(self.adapter, rgb)
        self.per_frame = int(self.tokens.embeds.shape[1])
        a = self.adapter
        with torch.inference_mode():
            self.prefix = a.llm.embed(a.stream_prefix_ids())
            self.questions = [a.question_embeds(q) for q in QUESTIONS]
            self.full_video = self.video(self.full())
        self.ref_logits: torch.Tensor | None = None
        self.full_s: list[np.ndarray] = []  # [wall, cpu] samples

    def full(self, frames: int | None = None) -> Kept:
        """Every token of the first ``frames`` frames, at their grid positions."""
        t = self.tokens
        n = t.embeds.shape[0] if frames is None else frames
        extras = {name: list(x[:n]) for name, x in t.extras.items()}
        return Kept(list(t.embeds[:n]), [t.positions] * n, extras, n * self.per_frame)

    def reference(self) -> None:
        """Unpruned next-token logits after every question; its timed prefill is the first unpruned sample."""
        self.ref_logits, seconds = question_logits(self.adapter, self.full_video, self.questions)
        self.full_s.append(seconds)

    def config(self, policy: str, budget: int) -> PrunerConfig:
        return PrunerConfig(policy=policy, tokens_per_frame=budget, min_tokens_per_frame=min(4, budget))

    def video(self, kept: Kept) -> Seq:
        """Prompt prefix + the LLM input of the first ``len(kept.embeds)`` frames (M-RoPE: 3-row positions)."""
        a, n, p = self.adapter, len(kept.embeds), self.prefix.shape[0]
        with torch.inference_mode():
            if a.llm.position_rows == 1:
                seq = torch.cat([self.prefix, a.chunk_embeds(kept.embeds, self.pts[:n])])
                return Seq(seq, None, seq.shape[0])
            piece = a.chunk_embeds(kept.embeds, self.pts[:n], positions=kept.positions, grid=self.tokens.grid,
                                   extras=kept.extras)
        start = torch.arange(p).expand(3, -1)
        return Seq(torch.cat([self.prefix, piece.embeds]), torch.cat([start, piece.position_rows(3).cpu() + p], 1),
                   p + piece.extent, piece.extras, p)

    def run(self, policy: str, budget: int) -> dict:
        """Prune with ``policy`` at ``budget`` -> tokens kept, selection time, KL vs unpruned, the pruned video and
        one timed prefill sample (selection included)."""
        kept = prune(self.config(policy, budget), self.tokens, self.attn, self.pts, self.args.chunk)
        video = self.video(kept)
        shift = mean_shift(self.tokens.embeds, kept.embeds)
        logits, seconds = question_logits(self.adapter, video, self.questions)
        kl = kl_mean(self.ref_logits, logits)
        return {"kept": kept.tokens, "select_s": kept.select_s, "kl": kl, "video": video,
                "pruned_s": [seconds + kept.select_s], "mean_shift": shift}


def check_correctness(b: Bench) -> None:
    """Keep-all is the identity on the LLM input; cached questions equal one-shot prefill; budgets are exact."""
    t = b.per_frame
    with torch.inference_mode():
        kept = prune(b.config("keep_all", t), b.tokens, b.attn, b.pts, b.args.chunk)
        if not b.video(kept).equal(b.full_video):
            raise SystemExit("correctness: keep_all pruning changed the LLM input")
        short = b.video(b.full(2))
        one_shot = forward(b.adapter, short, b.questions[1], None).double().cpu()
        cached = question_logits(b.adapter, short, b.questions[:2])[0][1]
        tol = 1e-3 if b.adapter.llm.dtype == torch.float32 else 5e-2
        if not torch.allclose(one_shot, cached, atol=tol, rtol=0):
            raise SystemExit(f"correctness: cached question logits differ by {float((one_shot - cached).abs().max())}")
    n = b.tokens.embeds.shape[0]
    for policy in progress(SWEEP_POLICIES, "policies"):
        kept = prune(b.config(policy, b.args.budget), b.tokens, b.attn, b.pts, b.args.chunk)
        if kept.tokens != n * min(b.args.budget, t):
            raise SystemExit(f"correctness: {policy} kept {kept.tokens} tokens, budget {n * b.args.budget}")


def timed_ratio(b: Bench, chosen: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """More interleaved prefill timings of the whole sequence (video + first question), up to ``--repeats``
    samples each with the ones taken during the KL passes -> ``[wall, cpu]`` medians: full s, pruned s, ratio."""
    q = b.questions[0]
    full, pruned = b.full_s, chosen["pruned_s"]
    for _ in range(b.args.repeats - 1):
        full.append(prefill_time(b.adapter, b.full_video, q))
        pruned.append(prefill_time(b.adapter, chosen["video"], q) + chosen["select_s"])
    f, p = np.median(full, axis=0), np.median(pruned, axis=0)
    return f, p, p / f


def sweep(b: Bench, chosen: dict, full_s: np.ndarray) -> dict:
    """KL of every policy at every swept budget, and a prefill ratio per budget (it depends on length only: the
    stc samples, against the median unpruned time ``full_s``)."""
    out: dict = {"budgets": [], "prefill_ratio": [], "prefill_ratio_cpu_time": [],
                 "kl": {p: [] for p in SWEEP_POLICIES}, "tokens_per_frame": b.per_frame}
    for budget in progress([int(x) for x in b.args.sweep.split(",")], "budgets"):
        runs = {p: (chosen[p] if budget == b.args.budget and p in chosen else b.run(p, budget)) for p in SWEEP_POLICIES}
        out["budgets"].append(budget)
        ratio = np.median(runs[SWEEP_POLICIES[0]]["pruned_s"], axis=0) / full_s  # [wall, cpu]
        out["prefill_ratio"].append(round(float(ratio[0]), 4))
        out["prefill_ratio_cpu_time"].append(round(float(ratio[1]), 4))
        for p in SWEEP_POLICIES:
            out["kl"][p].append(runs[p]["kl"])
    return out


def plot(path: str, data: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(data["budgets"], data["prefill_ratio"], "o-k", label="wall time")
    ax1.plot(data["budgets"], data["prefill_ratio_cpu_time"], "s--", color="gray", label="CPU time")
    t = data["tokens_per_frame"]
    ax1.plot(data["budgets"], [b / t for b in data["budgets"]], ":", color="C0", label="tokens kept / all")
    ax1.legend(fontsize=8)
    ax1.set(xlabel=f"tokens kept per frame (of {t})", ylabel="prefill time, pruned / unpruned",
            title="prefill ratio (stc runs; same length for every policy)")
    for p, kls in data["kl"].items():
        ax2.plot(data["budgets"], kls, "o-", label=p)
    ax2.set(xlabel=f"tokens kept per frame (of {t})", ylabel="KL(unpruned || pruned), nats", yscale="log",
            title="next-token KL, random weights")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.llm_shape = args.llm_shape or DEFAULT_SHAPE[args.family][args.device == "cuda"]
    if args.repeats < 1 or args.frames < 2 or args.chunk < 1:
        raise SystemExit("--repeats and --chunk must be >= 1 and --frames >= 2")
    if args.family != "llava_onevision" and args.frames < 4:
        raise SystemExit(f"--family {args.family} pairs frames into temporal patches: pass --frames >= 4")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    b = Bench(args)
    t = b.per_frame
    args.budget = args.budget or round(t / 4)
    args.sweep = args.sweep or ("25,49,98" if t == 196 else f"{max(1, t // 8)},{round(t / 4)},{t // 2}")
    check_correctness(b)  # also warms the LLM up before anything is timed
    b.reference()
    policies = list(dict.fromkeys([args.policy, "random", "uniform"]))
    chosen = {p: b.run(p, args.budget) for p in policies}
    full_s, pruned_s, ratio = timed_ratio(b, chosen[args.policy])
    entropy = float(-(torch.softmax(b.ref_logits, -1) * torch.log_softmax(b.ref_logits, -1)).sum(-1).mean())
    n_tokens = int(b.tokens.embeds[:, :, 0].numel())
    vc = b.adapter.model.config.vision_config
    result = {
        "bench": "pruner", "family": args.family, "policy": args.policy, "budget_per_frame": args.budget,
        "tokens_per_frame": t, "grid": list(b.tokens.grid), "frames": args.frames,
        "pruner_frames": int(b.tokens.embeds.shape[0]), "video": Path(args.video).name,
        "vision_tower": {"layers": int(getattr(vc, "depth", 0) or getattr(vc, "num_hidden_layers", 0)),
                         "width": int(vc.hidden_size)},
        "llm_shape": args.llm_shape, "dtype": str(b.adapter.llm.dtype),
        "random_weights": True, "tokens_full": n_tokens, "tokens_kept": chosen[args.policy]["kept"],
        "tokens_kept_ratio": round(chosen[args.policy]["kept"] / n_tokens, 4),
        "seq_len_full": int(b.full_video.embeds.shape[0] + b.questions[0].shape[0]),
        "seq_len_pruned": int(chosen[args.policy]["video"].embeds.shape[0] + b.questions[0].shape[0]),
        "prefill_full_s": round(float(full_s[0]), 3), "prefill_pruned_s": round(float(pruned_s[0]), 3),
        "select_ms": round(1e3 * float(chosen[args.policy]["select_s"][0]), 2),
        "prefill_ratio": round(float(ratio[0]), 4),
        "prefill_full_cpu_s": round(float(full_s[1]), 3), "prefill_pruned_cpu_s": round(float(pruned_s[1]), 3),
        "prefill_ratio_cpu_time": round(float(ratio[1]), 4),
        "kl_mean": chosen[args.policy]["kl"], "kl_random": chosen["random"]["kl"],
        "kl_uniform": chosen["uniform"]["kl"],
        "kl_ratio_vs_random": round(chosen[args.policy]["kl"] / chosen["random"]["kl"], 3),
        "mean_shift": {p: round(chosen[p]["mean_shift"], 4) for p in policies}, "ref_entropy_nats": round(entropy, 4),
        "max_entropy_nats": round(float(np.log(b.ref_logits.shape[-1])), 4), "questions": len(QUESTIONS),
        "repeats": args.repeats,
    }
    if args.plot:
        data = sweep(b, chosen, full_s)
        plot(args.plot, data, f"{Path(args.video).name}, {args.frames} frames, random-weight {args.family} "
                              f"({result['llm_shape']} LLM), {args.device}")
        result["sweep"] = data
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["machine"] = machine_info(args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
