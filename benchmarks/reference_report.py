"""Reports of the reference model's training (``train_reference.py``): accuracy with Wilson intervals per task and
kind, the loss curves PNG, and the model folder's README; the held-out evaluation they report. Run as a script, the
same report of any reference-shaped checkpoint on any generated bench (one JSON line last):

    stc-serve make-bench out/test --seed 0 --items 480 --split test    # the trainer's test bench
    python benchmarks/reference_report.py --model reference --bench out/test
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.reference_data import CHUNK, IMAGE, PATCH, TEXT, VISION, Clip, load_clips, planted  # noqa: E402
from serve.eval.bench import EvalItem, score, wilson  # noqa: E402
from serve.eval.synth_items import TASK_KINDS  # noqa: E402
from stream.models.base import VLMAdapter  # noqa: E402


@torch.inference_mode()
def evaluate(adapter: VLMAdapter, clips: list[Clip], max_new_tokens: int = 8) -> list[tuple[EvalItem, str, bool]]:
    """Greedy answers over the inference path, as ``stc-serve eval`` feeds it with compression off: per clip the
    prefix, then chunks of up to ``CHUNK`` frames (the partial chunk flushed at each question), then the question
    on that context, rolled back after the answer. Returns ``(item, response, correct)`` in clip order."""
    out = []
    for clip in clips:
        tokens = adapter.project(adapter.encode_vision(clip.pixels)).embeds  # [F, T, d]
        cache = DynamicCache(config=adapter.llm.decoder.config)
        adapter.llm.forward(adapter.llm.embed(adapter.stream_prefix_ids())[None], cache)
        fed = 0
        for it, seen, _, _ in clip.items:
            while fed < seen:
                end = min(seen, fed + CHUNK)
                adapter.llm.forward(adapter.chunk_embeds(list(tokens[fed:end]), clip.pts[fed:end])[None], cache)
                fed = end
            context = cache.get_seq_length()
            logits, ids = adapter.llm.forward(adapter.question_embeds(it.prompt)[None], cache), []
            for _ in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                if nxt in adapter.eos_token_ids:
                    break
                ids.append(nxt)
                logits = adapter.llm.forward(adapter.llm.embed(torch.tensor([[nxt]])), cache)
            cache.crop(context - cache.get_seq_length())  # roll the question and answer back
            response = adapter.tokenizer.decode(ids, skip_special_tokens=True)
            out.append((it, response, score(it, response)))
    return out


def side_group(item: dict[str, Any], objects: list[dict[str, Any]]) -> str:
    """Where the other objects on screen are when a left/right (STU) item of ``meta.json`` is asked: ``STU_alone``,
    ``STU_others_same_side`` (all on the asked object's side of the centre) or ``STU_other_opposite`` (at least one
    on the other side; a model answering the side most objects are on fails these)."""
    t = item["times"][0]
    asked, *_ = [planted(o) for o in objects if o["oid"] == item["objects"][0]]
    others = [planted(o) for o in objects if o["oid"] != asked.oid and o["on"] <= t < o["off"]]
    if not others:
        return "STU_alone"
    left = asked.centre(t)[0] < 0.5
    return "STU_others_same_side" if all((o.centre(t)[0] < 0.5) == left for o in others) else "STU_other_opposite"


def report(results: list[tuple[EvalItem, str, bool]], meta: dict[str, Any], window_s: int) -> dict[str, Any]:
    """Accuracy with Wilson intervals per task, per task kind (real-time / backward / forward), EPM split at
    ``T_s <= window_s``, STU split by where the other objects on screen are (:func:`side_group`), and CRR alert
    latency (first "Yes" at or after the planted onset)."""
    by_id = {m["id"]: m for m in meta["items"]}
    timeline = {c["video"]: c["objects"] for c in meta["clips"]}
    groups: dict[str, list[bool]] = {}
    latency: dict[str, int] = {}
    for it, response, ok in results:
        m = by_id[it.item_id.split("#")[0]]
        keys = [it.task, TASK_KINDS[it.task]]
        if it.task in ("EPM", "ASI"):
            keys.append("backward_inside" if m["T_s"] <= window_s else "backward_beyond")
        if it.task == "STU":
            keys.append(side_group(m, timeline[m["video"]]))
        for key in keys:
            groups.setdefault(key, []).append(ok)
        if it.task == "CRR" and it.time_s >= m["onset_s"] and response.strip().startswith("Y"):
            latency.setdefault(m["id"], int(it.time_s - m["onset_s"]))
    acc = {k: {"n": len(v), "correct": sum(v), "accuracy": round(sum(v) / len(v), 4),
               "ci95": [round(x, 4) for x in wilson(sum(v), len(v))]}
           for k, v in sorted(groups.items())}
    n_watch = len({m["id"] for m in meta["items"] if m["task"] == "CRR"})
    lat = sorted(latency.values())
    acc["alert_latency_s"] = {"watches": n_watch, "alerted": len(lat), "median": lat[len(lat) // 2] if lat else None}
    return acc


def plot(warm: list[float], losses: list[float], bounds: list[int], path: Path, title: str) -> None:
    """Vision warm-up probe loss (left) and answer-token loss per step (right, curriculum stages dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if warm:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    else:  # a fine-tuning run (--init): no warm-up
        fig, ax = plt.subplots(figsize=(7, 3.6))
        axes = [None, ax]
    panels = ((axes[0], warm, "probe loss (4 heads)"), (axes[1], losses, "answer-token cross-entropy"))
    for ax, ys, name in panels[0 if warm else 1:]:
        ax.plot(ys, lw=0.5, alpha=0.35, label="per step")
        k = 50
        if len(ys) > k:
            ax.plot(range(k - 1, len(ys)), np.convolve(ys, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
        ax.set(yscale="log", ylabel=name)
        ax.legend(fontsize=8)
    for b in bounds:
        axes[1].axvline(b, color="gray", ls="--", lw=0.8)
    if warm:
        axes[0].set(xlabel="vision warm-up step (64 frames)", title="stage 0: single frames")
        axes[1].set(xlabel="step (one clip, its sampled questions)",
                    title="stages 1-3: streams <= 8 s, 24-32 s, 40-96 s")
    else:
        axes[1].set(xlabel="step (one clip, its sampled questions)",
                    title="the lookup stage (layouts + pointer loss), then 40-96 s streams")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_card(f: dict[str, Any]) -> str:
    """The model folder's README.md from the run's figures."""
    acc = f["accuracy"]
    rows = "\n".join(f"| {k} | {v['n']} | {v['accuracy']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] |"
                     for k, v in acc.items() if "accuracy" in v)
    lat = acc["alert_latency_s"]
    sp = f.get("state_probes", {"weight": 0})
    state = (f"\n  stream-state probes on decoder layer {sp['layer']}'s frame states at weight {sp['weight']:g}"
             if sp["weight"] else " no stream-state probes")
    clips = "every training clip's" if f.get("early_clips") == "all" else "the 24-32 s clips'"
    early = f"\n  first stage on {clips} first 8 frames{', with real-time drills' if f.get('early_drills') else ''}"
    lookup, out = "", "stream/models/reference"
    if "lookup" in f:  # fine-tuned from the seed run by the lookup stage
        lk, out = f["lookup"], "out/reference-seed"
        pt = lk["pointer"]
        lookup = f"""
- Then the lookup stage ({lk['threads']} torch thread(s), {lk['train_minutes']:.1f} min of training):
  {lk['stages']['lookup']} steps on {lk['layouts']} fresh shortcut-proof layouts (peak lr {lk['layout_lr']:g},
  {lk['layout_long_share']:.0%} of steps on long clips) with attention head {pt['head']} of decoder layer
  {pt['layer']} trained to look at the asked object (weight {pt['weight']:g}), then {lk['stages']['long']} steps on
  long clips alone (peak lr {lk['lr']:g}; final answer loss {lk.get('final_loss', '?')}):
  `python benchmarks/train_reference.py --init {out} --out stream/models/reference --layouts {lk['layouts']}
  --layout-steps {lk['stages']['lookup']} --layout-lr {lk['layout_lr']:g} --layout-long-share
  {lk['layout_long_share']:g} --layout-seed {lk['layout_seed']} --init-clips {lk['init_clips']} --pointer
  {pt['layer']} {pt['head']} {pt['weight']:g} --steps {lk['stages']['long']} --lr {lk['lr']:g} --threads
  {lk['threads']}`."""
    return f"""# stc-serve reference model (a test instrument, not a general VLM)

LLaVA-OneVision architecture (SigLIP tower -> MLP projector -> 2x2 pooling -> Qwen2) at a small size, trained
**from scratch** on this CPU on the train split of the synthetic streaming benchmark (`serve.eval.synth`: planted
squares / circles / triangles in 6 colours and 2 sizes over real footage). It answers questions about planted shapes
in streams; on anything else its answers mean nothing. It exists so compression settings get accuracy figures.

- Input it expects: frames sampled at **{f['fps']:g} fps**, chunks of **{f['frames_per_chunk']}** frames (the service
  defaults), {IMAGE} px frames -> {(IMAGE // PATCH) ** 2} patches -> **{f['tokens_per_frame']} tokens per frame**;
  the prompts of `serve.eval.bench` (`MC_PROMPT`, `REC_PROMPT`, `CRR_PROMPT`); answers are a letter, a number or
  Yes/No.
- Size: vision {VISION['num_hidden_layers']} layers x {VISION['hidden_size']}, LLM {TEXT['num_hidden_layers']} layers
  x {TEXT['hidden_size']} ({TEXT['num_attention_heads']} heads, {TEXT['num_key_value_heads']} KV heads), byte-level
  BPE of `stream.models.tiny` (vocab 1024), float32 safetensors.
- Trained: seed {f['seed']}, {f['threads']} torch thread(s), {f['train_minutes']:.1f} min of training
  ({f['total_minutes']:.1f} min with data loading and evaluation), {f['warmup_steps']} single-frame vision
  warm-up steps then {f['steps']} answer-token steps ({f['stages']}),
  final answer loss {f['final_loss']};{state};{early}.
- Reproduce: `python benchmarks/train_reference.py --seed {f['seed']} --out {out} --plot
  docs/reference_loss.png` (see `docs/reference_model.md`).{lookup}

Held-out accuracy (test split: seed {f['test_bench']['seed']}, last 40 % of each background's frames,
{f['test_bench']['questions']} timed questions, compression off, greedy; 95 % Wilson intervals):

| task | n | accuracy | 95 % CI |
|---|---|---|---|
{rows}

CRR watches: {lat['alerted']} of {lat['watches']} alerted at or after the planted onset, median latency
{lat['median']} s. `backward_inside` / `backward_beyond`: EPM/ASI items with `T_s` <= / > 15 s. `STU_*`: the
left/right items by where the other objects on screen are (none, all on the asked object's side, one on the other).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Held-out report of a reference-shaped checkpoint on a generated bench: "
                                "greedy answers, compression off, the trainer's report (one JSON line last).")
    p.add_argument("--model", default="reference", help="'reference' or a checkpoint folder")
    p.add_argument("--bench", type=Path, required=True, help="a make-bench folder (ovo.json + meta.json + videos)")
    p.add_argument("--window-s", type=int, default=15, help="EPM/ASI split: T_s <= this is 'backward_inside'")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not (args.bench / "meta.json").is_file():
        p.error(f"--bench {args.bench}: no meta.json there. Fix: stc-serve make-bench {args.bench} --seed 0 "
                "--items 480 --split test")
    from stream.models.loading import load_adapter

    torch.set_num_threads(args.threads)
    adapter = load_adapter(args.model)
    results = evaluate(adapter, load_clips(args.bench, adapter))
    acc = report(results, json.loads((args.bench / "meta.json").read_text()), args.window_s)
    print(json.dumps({"model": str(args.model), "bench": str(args.bench), "correct": sum(r[2] for r in results),
                      "questions": len(results), "accuracy": acc}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
