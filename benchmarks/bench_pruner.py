#!/usr/bin/env python
"""LLM prefill with token pruning vs without, on real video frames, plus a fidelity proxy.

    python benchmarks/bench_pruner.py --video ../shared/media/vtest.avi [--budget 49] [--policy stc]
        [--frames 16] [--fps 1] [--device cpu|cuda] [--plot out.png]

Model: the real LLaVA-OneVision architecture with RANDOM weights (no checkpoint can be downloaded here): a small
SigLIP tower (hidden 64, 2 layers, real 384 px / 27x27-patch geometry -> 196 tokens per frame) and a Qwen2-0.5B
shaped LLM on CPU (Qwen2-7B shaped, bfloat16, on cuda). Frames are decoded from the real video with decord.

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

from pruner import PrunerConfig, StreamPruner, attention_received, available_policies, scores_to_tokens  # noqa: E402
from stream.models.base import PreprocessSpec, VisualTokens  # noqa: E402
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
SHAPES = {"qwen2-0.5b": QWEN2_05B, "qwen2-7b": QWEN2_7B, "tiny": {}}
SWEEP_POLICIES = ["stc_context", "stc", "stc_adaptive", "uniform", "random", "temporal_diff", "attention"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", default="../shared/media/vtest.avi", help="video file (decoded with decord)")
    ap.add_argument("--budget", type=int, default=49, help="tokens kept per frame (of 196); adaptive: on average")
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
                    help="LLM shape (default: qwen2-0.5b on cpu, qwen2-7b on cuda; tiny = smoke test only)")
    ap.add_argument("--plot", default=None, help="write budget vs prefill ratio vs KL for every policy here")
    ap.add_argument("--sweep", default="25,49,98", help="budgets swept for --plot (tokens per frame)")
    return ap.parse_args()




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


def build_adapter(device: str, shape_name: str, dtype_name: str | None = None) -> LlavaOneVisionAdapter:
    """Real LLaVA-OneVision classes, random weights: small vision tower, LLM of the named shape."""
    shape = SHAPES[shape_name]
    dtype = getattr(torch, dtype_name) if dtype_name else (torch.float32 if device == "cpu" else torch.bfloat16)
    tokenizer = train_tokenizer("llava_onevision")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_tiny_model("llava_onevision", tokenizer, text_overrides=shape, seed=0)
    finally:
        torch.set_default_dtype(old)
    spec = PreprocessSpec(size=384, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return LlavaOneVisionAdapter(model.eval(), tokenizer, spec, LLAVA_OV_CHAT_TEMPLATE)


def encode(adapter: LlavaOneVisionAdapter, rgb: np.ndarray) -> tuple[VisualTokens, torch.Tensor]:
    """Frames -> visual tokens ``[N, 196, d]`` and per-token attention ``[N, 196]`` from the last used ViT layer."""
    captured: list[torch.Tensor] = []

    def runner(hidden: torch.Tensor, layers: torch.nn.ModuleList) -> torch.Tensor:
        for i, layer in enumerate(layers):
            if i == len(layers) - 1:
                captured.append(attention_received(layer, hidden))  # [N, P]
            out = layer(hidden, attention_mask=None)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    with torch.inference_mode():
        tokens = adapter.project(adapter.encode_vision(adapter.preprocess(rgb), runner))
    return tokens, scores_to_tokens(captured[0], tokens.grid)


def prune(cfg: PrunerConfig, tokens: VisualTokens, attn: torch.Tensor, pts: list[float], chunk: int
          ) -> tuple[list[torch.Tensor], int, float]:
    """Run one stream's pruner chunk by chunk -> per-frame kept tokens, tokens kept, selection seconds."""
    pruner, kept, t0 = StreamPruner(cfg), [], clock()
    for s in range(0, tokens.embeds.shape[0], chunk):
        e = tokens.embeds[s:s + chunk]
        result = pruner.select(e, tokens.positions, pts=pts[s:s + chunk], attention=attn[s:s + chunk])
        kept += result.kept(e)
    return kept, pruner.stats()["tokens_kept"], clock() - t0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock() -> np.ndarray:
    """``[wall, cpu]`` seconds now. CPU time (this process, all threads) is reported beside wall time because
    the dev machine is shared: waiting for a core inflates wall time but not CPU time."""
    return np.array([time.perf_counter(), time.process_time()])


def prefill_time(adapter: LlavaOneVisionAdapter, seq: torch.Tensor) -> np.ndarray:
    """``[wall, cpu]`` seconds for one prefill of ``seq`` ``[L, d]`` (fresh cache, logits of the last position)."""
    from transformers import DynamicCache

    device = adapter.device.type
    sync(device)
    t0 = clock()
    adapter.llm.forward(seq[None], cache=DynamicCache())
    sync(device)
    return clock() - t0


def question_logits(adapter: LlavaOneVisionAdapter, video: torch.Tensor, questions: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, np.ndarray]:
    """Prefill ``video`` ``[L, d]`` + the first question in one timed forward, then each other question on top of
    the cached video (cropped away after) -> ``([Q, vocab]`` next-token logits, ``[wall, cpu]`` s of the first prefill)."""
    from transformers import DynamicCache

    device = adapter.device.type
    cache = DynamicCache()
    sync(device)
    t0 = clock()
    first = adapter.llm.forward(torch.cat([video, questions[0]])[None], cache=cache)[0, -1]
    sync(device)
    seconds = clock() - t0
    out = [first.double().cpu()]
    cache.crop(-questions[0].shape[0])  # negative = remove that many tokens: back to the cached video
    for q in questions[1:]:
        out.append(adapter.llm.forward(q[None], cache=cache)[0, -1].double().cpu())
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
        self.adapter = build_adapter(args.device, args.llm_shape, args.dtype)
        rgb, self.pts = load_frames(args.video, args.frames, args.fps)
        self.tokens, self.attn = encode(self.adapter, rgb)
        a = self.adapter
        with torch.inference_mode():
            self.prefix = a.llm.embed(a.stream_prefix_ids())
            self.questions = [a.question_embeds(q) for q in QUESTIONS]
            self.full_video = self.video(list(self.tokens.embeds))
        self.ref_logits: torch.Tensor | None = None
        self.full_s: list[np.ndarray] = []  # [wall, cpu] samples

    def reference(self) -> None:
        """Unpruned next-token logits after every question; its timed prefill is the first unpruned sample."""
        self.ref_logits, seconds = question_logits(self.adapter, self.full_video, self.questions)
        self.full_s.append(seconds)

    def config(self, policy: str, budget: int) -> PrunerConfig:
        return PrunerConfig(policy=policy, tokens_per_frame=budget, min_tokens_per_frame=min(4, budget))

    def video(self, frames: list[torch.Tensor]) -> torch.Tensor:
        """Prompt prefix + the LLM input ``[L, d]`` of the first ``len(frames)`` frames."""
        with torch.inference_mode():
            return torch.cat([self.prefix, self.adapter.chunk_embeds(frames, self.pts[:len(frames)])])

    def run(self, policy: str, budget: int) -> dict:
        """Prune with ``policy`` at ``budget`` -> tokens kept, selection time, KL vs unpruned, the pruned video and
        one timed prefill sample (selection included)."""
        kept, n_kept, select_s = prune(self.config(policy, budget), self.tokens, self.attn, self.pts, self.args.chunk)
        video = self.video(kept)
        shift = mean_shift(self.tokens.embeds, kept)
        logits, seconds = question_logits(self.adapter, video, self.questions)
        kl = kl_mean(self.ref_logits, logits)
        return {"kept": n_kept, "select_s": select_s, "kl": kl, "video": video, "pruned_s": [seconds + select_s],
                "mean_shift": shift}


def check_correctness(b: Bench) -> None:
    """Keep-all is the identity on the LLM input; cached questions equal one-shot prefill; budgets are exact."""
    with torch.inference_mode():
        kept, _, _ = prune(b.config("keep_all", 196), b.tokens, b.attn, b.pts, b.args.chunk)
        if not torch.equal(b.video(kept), b.full_video):
            raise SystemExit("correctness: keep_all pruning changed the LLM input")
        short = b.video(list(b.tokens.embeds[:2]))
        one_shot = b.adapter.llm.forward(torch.cat([short, b.questions[1]])[None])[0, -1].double().cpu()
        cached = question_logits(b.adapter, short, b.questions[:2])[0][1]
        tol = 1e-3 if b.adapter.llm.dtype == torch.float32 else 5e-2
        if not torch.allclose(one_shot, cached, atol=tol, rtol=0):
            raise SystemExit(f"correctness: cached question logits differ by {float((one_shot - cached).abs().max())}")
    n = b.tokens.embeds.shape[0]
    for policy in progress(SWEEP_POLICIES, "policies"):
        _, n_kept, _ = prune(b.config(policy, b.args.budget), b.tokens, b.attn, b.pts, b.args.chunk)
        if n_kept != n * min(b.args.budget, 196):
            raise SystemExit(f"correctness: {policy} kept {n_kept} tokens, budget {n * b.args.budget}")


def timed_ratio(b: Bench, chosen: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """More interleaved prefill timings of the whole sequence (video + first question), up to ``--repeats``
    samples each with the ones taken during the KL passes -> ``[wall, cpu]`` medians: full s, pruned s, ratio."""
    q = b.questions[0]
    full_seq, pruned_seq = torch.cat([b.full_video, q]), torch.cat([chosen["video"], q])
    full, pruned = b.full_s, chosen["pruned_s"]
    for _ in range(b.args.repeats - 1):
        full.append(prefill_time(b.adapter, full_seq))
        pruned.append(prefill_time(b.adapter, pruned_seq) + chosen["select_s"])
    f, p = np.median(full, axis=0), np.median(pruned, axis=0)
    return f, p, p / f


def sweep(b: Bench, chosen: dict, full_s: np.ndarray) -> dict:
    """KL of every policy at every swept budget, and a prefill ratio per budget (it depends on length only: the
    stc samples, against the median unpruned time ``full_s``)."""
    out: dict = {"budgets": [], "prefill_ratio": [], "prefill_ratio_cpu_time": [],
                 "kl": {p: [] for p in SWEEP_POLICIES}}
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
    ax1.plot(data["budgets"], [b / 196 for b in data["budgets"]], ":", color="C0", label="tokens kept / all")
    ax1.legend(fontsize=8)
    ax1.set(xlabel="tokens kept per frame (of 196)", ylabel="prefill time, pruned / unpruned",
            title="prefill ratio (stc runs; same length for every policy)")
    for p, kls in data["kl"].items():
        ax2.plot(data["budgets"], kls, "o-", label=p)
    ax2.set(xlabel="tokens kept per frame (of 196)", ylabel="KL(unpruned || pruned), nats", yscale="log",
            title="next-token KL, random weights")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    args.llm_shape = args.llm_shape or ("qwen2-0.5b" if args.device == "cpu" else "qwen2-7b")
    if args.repeats < 1 or args.frames < 2 or args.chunk < 1:
        raise SystemExit("--repeats and --chunk must be >= 1 and --frames >= 2")
    t_start = time.perf_counter()
    b = Bench(args)
    check_correctness(b)  # also warms the LLM up before anything is timed
    b.reference()
    policies = list(dict.fromkeys([args.policy, "random", "uniform"]))
    chosen = {p: b.run(p, args.budget) for p in policies}
    full_s, pruned_s, ratio = timed_ratio(b, chosen[args.policy])
    entropy = float(-(torch.softmax(b.ref_logits, -1) * torch.log_softmax(b.ref_logits, -1)).sum(-1).mean())
    result = {
        "bench": "pruner", "policy": args.policy, "budget_per_frame": args.budget, "frames": args.frames,
        "video": Path(args.video).name, "llm_shape": args.llm_shape, "dtype": str(b.adapter.llm.dtype),
        "random_weights": True, "tokens_full": int(b.tokens.embeds[:, :, 0].numel()),
        "tokens_kept": chosen[args.policy]["kept"],
        "tokens_kept_ratio": round(chosen[args.policy]["kept"] / b.tokens.embeds[:, :, 0].numel(), 4),
        "seq_len_full": int(b.full_video.shape[0] + b.questions[0].shape[0]),
        "seq_len_pruned": int(chosen[args.policy]["video"].shape[0] + b.questions[0].shape[0]),
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
        plot(args.plot, data, f"{Path(args.video).name}, {args.frames} frames, random-weight LLaVA-OV "
                              f"({result['llm_shape']} LLM), {args.device}")
        result["sweep"] = data
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["machine"] = machine_info(args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
