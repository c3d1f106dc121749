"""Train the reference model (``stream/models/reference``) from scratch on the synthetic benchmark's train split.

A test instrument, not a general VLM: LLaVA-OneVision's real architecture (SigLIP tower -> MLP projector -> 2x2
pooling -> Qwen2) at a small size, trained on planted shapes over real footage (:mod:`serve.eval.synth`). It sees
exactly the LLM input the service builds: the adapter's stream prefix, each frame's projected tokens as
``chunk_embeds`` lays them out (frames sampled at the service's default ``SamplerConfig().fps``), then
``question_embeds`` of the prompt ``serve.eval.bench.load_bench`` builds from the generated ``ovo.json``; the loss is
on the answer tokens (+ end of turn) only. The input equivalence is checked against the adapter's own inference path
before training starts. Held-out accuracy comes from greedy generation over that inference path on a test-split
bench, with Wilson 95 % intervals.

    python benchmarks/train_reference.py --seed 1 --out out/reference-seed --plot docs/reference_loss.png
    python benchmarks/train_reference.py --init out/reference-seed --out stream/models/reference --steps 500 \
        --lr 5e-5 --threads 1

The second command is the lookup stage (``--init``, ``benchmarks/reference_layouts.py``): the seed run fine-tuned on
shortcut-proof layouts with a pointer loss, so that it looks the asked object up (docs/reference_model.md).

Runs on two torch threads (``--threads``; the CPU machine has 2 cores). Prints one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.reference_cli import CURRICULUM, parse_args  # noqa: E402
from benchmarks.reference_data import (  # noqa: E402
    CHUNK, FAMILY, FPS, IMAGE, TEST_SEED, Clip, build_adapter, early, load_clips)
from benchmarks.reference_layouts import PointerLoss, layout_windows  # noqa: E402
from benchmarks.reference_probes import Probes, StateProbes, mirror  # noqa: E402
from benchmarks.reference_report import evaluate, model_card, plot, report  # noqa: E402
from serve.eval.bench import load_bench  # noqa: E402
from serve.eval.synth import default_videos, make_bench  # noqa: E402
from stream.models.base import VLMAdapter, run_layers  # noqa: E402
from stream.models.tiny import _preprocessor_config  # noqa: E402


def visual_tokens(adapter: VLMAdapter, pixels: torch.Tensor) -> torch.Tensor:
    """Differentiable steps 2-5 of the adapter: ``[F, 3, S, S]`` -> ``[F, T, d]``."""
    hidden = run_layers(adapter.vision_embed(pixels), adapter.vision_layers)
    return adapter.project(adapter.vision_finish(hidden)).embeds


def question_hidden(adapter: VLMAdapter, clip: Clip, rows: list[int], state_layer: int | None = None
                    ) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor | None]:
    """Last hidden states of the question+answer blocks of ``clip.questions[rows]`` (the bench's items first, then
    the counting drills), each on its own stream context.

    The stream (prefix + every frame up to the latest question) is prefilled once; the ``Q`` question blocks then
    run as one batch on copies of that cache, each masked to the frames seen at its time and placed at the rotary
    positions the service gives it (prefix + seen frames' tokens). Returns ``[Q, Lq, d]``, each block's length
    (``Lq`` = the longest; shorter blocks are padded and masked), the visual tokens ``[F, T, d]`` and, with
    ``state_layer``, that decoder layer's output at the last token of each frame ``[F, d]``.
    """
    decoder, emb = adapter.llm.decoder, adapter.llm.decoder.get_input_embeddings()
    items = [clip.questions[r] for r in rows]
    n_max = max(seen for _, seen, _, _ in items)
    vis = visual_tokens(adapter, clip.pixels[:n_max])  # [F, T, d]
    prefix = emb(adapter.stream_prefix_ids())  # [P, d]
    stream = torch.cat([prefix, vis.flatten(0, 1)])[None]  # [1, P + F*T, d]
    cache = DynamicCache(config=decoder.config)
    prefill = decoder(inputs_embeds=stream, use_cache=True, output_hidden_states=state_layer is not None,
                      **{adapter.llm.cache_argument: cache})
    states = None
    if state_layer is not None:  # hidden_states[0] is the embeddings, [k] layer k's output
        states = prefill.hidden_states[state_layer][0, prefix.shape[0] - 1 + vis.shape[1] * torch.arange(1, n_max + 1)]
    end = adapter.video_end_embeds()  # [1, d] image_newline
    blocks = [torch.cat([end, emb(torch.cat([q, a[:-1]]))]) for _, _, q, a in items]  # teacher forcing
    lens = [b.shape[0] for b in blocks]
    lq, ls, q_n = max(lens), stream.shape[1], len(items)
    x = torch.zeros(q_n, lq, stream.shape[-1])
    mask = torch.zeros(q_n, 1, lq, ls + lq, dtype=torch.bool)
    pos = torch.zeros(q_n, lq, dtype=torch.long)
    causal = torch.tril(torch.ones(lq, lq, dtype=torch.bool))
    for i, ((_, seen, _, _), block) in enumerate(zip(items, blocks)):
        start = prefix.shape[0] + seen * vis.shape[1]
        x[i, : lens[i]] = block
        mask[i, 0, :, :start] = True
        mask[i, 0, :, ls:] = causal
        mask[i, 0, :, ls + lens[i]:] = False
        pos[i] = start + torch.arange(lq)
    cache.batch_repeat_interleave(q_n)
    out = decoder(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True,
                  **{adapter.llm.cache_argument: cache})
    return out.last_hidden_state, lens, vis, states


def answer_logits(adapter: VLMAdapter, clip: Clip, rows: list[int], state_layer: int | None = None
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Per row of ``rows``: the logits predicting its answer tokens (answer + end of turn), ``[len(answer), vocab]``;
    the visual tokens ``[F, T, d]`` of the frames they read and the frame states (see :func:`question_hidden`)."""
    hidden, lens, vis, states = question_hidden(adapter, clip, rows, state_layer)
    qs = clip.questions
    logits = [adapter.llm.lm_head(hidden[i, lens[i] - len(qs[r][3]): lens[i]]) for i, r in enumerate(rows)]
    return logits, vis, states


def clip_loss(adapter: VLMAdapter, clip: Clip, rows: list[int], state_layer: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy over the answer tokens (answer + end of turn) of ``rows``, the visual tokens ``[F, T, d]``
    they read and the frame states (see :func:`question_hidden`)."""
    logits, vis, states = answer_logits(adapter, clip, rows, state_layer)
    targets = torch.cat([clip.questions[r][3] for r in rows])
    return torch.nn.functional.cross_entropy(torch.cat(logits).float(), targets), vis, states


@torch.inference_mode()
def check_inference_path(adapter: VLMAdapter, clip: Clip, row: int) -> float:
    """Max |logit difference| between :func:`answer_logits` and the adapter's inference path (prefix ids, one
    ``chunk_embeds`` per ``CHUNK`` frames, ``question_embeds``) for item ``row``; raises above 1e-3."""
    it, seen, _, answer = clip.items[row]
    tokens = adapter.project(adapter.encode_vision(clip.pixels[:seen])).embeds
    pieces = [adapter.llm.embed(adapter.stream_prefix_ids())]
    for s in range(0, seen, CHUNK):
        e = min(seen, s + CHUNK)
        pieces.append(adapter.chunk_embeds(list(tokens[s:e]), clip.pts[s:e]))
    pieces.append(adapter.question_embeds(it.prompt))
    pieces.append(adapter.llm.embed(answer[:-1]))
    ref = adapter.llm.forward(torch.cat(pieces)[None], logits_to_keep=len(answer))[0]
    diff = float((ref - answer_logits(adapter, clip, [row])[0][0]).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"training input differs from the service's inference path (max |dlogit| {diff:.2e})")
    return diff


def warm_vision(adapter: VLMAdapter, clips: list[Clip], probes: Probes, steps: int, lr: float, seed: int, log: Any,
                batch: int = 64, flip: bool = False) -> list[float]:
    """Curriculum stage 0, single frames: the vision tower + projector learn what each visual token shows through
    the :class:`Probes` on the ``[F, T, d]`` tokens the LLM will read (the probes are not part of the model). With
    ``flip``, half of each batch is mirrored left-right (twice the backgrounds' views)."""
    mods = [adapter.model.model.vision_tower, adapter.model.model.multi_modal_projector, probes]
    opt = torch.optim.AdamW([p for m in mods for p in m.parameters()], lr=lr, weight_decay=0.05)
    frames = [(i, f) for i, c in enumerate(clips) for f in range(len(c.pts))]
    rng, losses = random.Random(seed), []
    for step in range(steps):
        pick = rng.sample(frames, batch)
        pixels = torch.stack([clips[i].pixels[f] for i, f in pick])
        labels = torch.stack([clips[i].labels[f] for i, f in pick])  # [B, T + 1, 3]
        present = torch.stack([clips[i].present[f] for i, f in pick])  # [B, 72]
        if flip:
            m = mirror(pixels[::2], labels[::2], present[::2])
            pixels[::2], labels[::2], present[::2] = m
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
        loss = probes.loss(visual_tokens(adapter, pixels), labels, present)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == steps - 1:
            log(f"vision warm-up {step}/{steps} loss {np.mean(losses[-100:]):.4f}")
    return losses


@torch.inference_mode()
def probe_accuracy(adapter: VLMAdapter, probes: Probes, clips: list[Clip], frames: int = 1024,
                   seed: int = 5) -> dict[str, float]:
    """Held-out probe accuracy on ``frames`` random frames of ``clips``: colour / shape / size of the object on the
    token cells an object covers, and the frame's object count."""
    pool = [(i, f) for i, c in enumerate(clips) for f in range(len(c.pts))]
    pick = random.Random(seed).sample(pool, min(frames, len(pool)))
    labels = torch.stack([clips[i].labels[f] for i, f in pick])
    tokens = torch.cat([visual_tokens(adapter, torch.stack([clips[i].pixels[f] for i, f in pick[k:k + 128]]))
                        for k in range(0, len(pick), 128)])
    parts, occ = probes.token(tokens).split(probes.splits, dim=-1), labels[:, :-1, 0] > 0
    acc = {n: float((parts[j].argmax(-1) == labels[:, :-1, j])[occ].float().mean())
           for j, n in enumerate(("colour", "shape", "size"))}
    acc["count"] = float((probes.frame(tokens.mean(1))[:, :4].argmax(-1) == labels[:, -1, 0]).float().mean())
    return {k: round(v, 4) for k, v in acc.items()}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train(adapter: VLMAdapter, stages: list[tuple[int, list[Clip], int]], seed: int, lr: float, log: Any,
          vision_scale: float = 1.0, probes: Probes | None = None, aux_weight: float = 0.0,
          state: tuple[StateProbes, int, float] | None = None, ema: tuple[float, ...] = (),
          pointer: tuple[PointerLoss, float] | None = None) -> tuple[list[float], dict[float, torch.nn.Module]]:
    """The curriculum's answer-token stages: ``(steps, clips, questions)`` each, one warm-up + cosine schedule over
    all of them; the (warmed-up) vision tower and projector learn at ``vision_scale * lr``, with the warm-up's
    ``probes`` kept on as an auxiliary loss (``aux_weight``); with ``state = (probes, layer, weight)``,
    :class:`StateProbes` on that decoder layer's frame states too; with ``pointer = (loss, weight)``, the
    :class:`PointerLoss` on the questions whose clip names the asked object's cells. Each step: one clip of the
    stage and ``questions`` random items of it (bench items and counting drills alike). Returns the answer loss per
    step and, per decay in ``ema``, an exponential moving average of the model's weights over these stages."""
    rng, model = random.Random(seed), adapter.model.train()
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    ids = {id(p) for p in vision}
    extra = list(state[0].parameters()) if state is not None else []
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids] + extra, "scale": 1.0},
              {"params": vision + (list(probes.parameters()) if probes is not None else []), "scale": vision_scale}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    averages = {d: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in ema}
    steps = sum(n for n, _, _ in stages)
    plan = [(clips, questions) for n, clips, questions in stages for _ in range(n)]
    losses: list[float] = []
    state_losses: list[float] = []
    t0 = time.perf_counter()
    for step, (clips, questions) in enumerate(plan):
        clip = clips[rng.randrange(len(clips))]
        n_q = len(clip.questions)
        rows = sorted(rng.sample(range(n_q), min(questions, n_q)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, max(1, steps // 20)) * g["scale"]
        answer, vis, states = clip_loss(adapter, clip, rows, state[1] if state is not None else None)
        loss = answer
        if state is not None:  # what the stream so far holds, readable from every frame's last token
            f = len(states)
            aux = state[0].loss(states, {k: v[:f] for k, v in clip.state.items()}, clip.present[:f])
            state_losses.append(float(aux.detach()))
            loss = loss + state[2] * aux
        if pointer is not None and (look := pointer[0](clip, rows)) is not None:  # attend to the asked object
            loss = loss + pointer[1] * look
        if probes is not None and aux_weight > 0:  # what each token shows stays decodable while the LLM learns
            loss = loss + aux_weight * probes.loss(vis, clip.labels[: len(vis)], clip.present[: len(vis)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for avg in averages.values():
            avg.update_parameters(model)
        losses.append(float(answer.detach()))
        if step % 100 == 0 or step == steps - 1:
            extra = f", stream-state probes {np.mean(state_losses[-100:]):.3f}" if state_losses else ""
            minutes = (time.perf_counter() - t0) / 60
            log(f"step {step}/{steps} loss {np.mean(losses[-100:]):.4f}{extra} ({minutes:.1f} min)")
    model.eval()
    return losses, {d: avg.module.eval() for d, avg in averages.items()}


def save(adapter: VLMAdapter, out: Path, model: torch.nn.Module | None = None) -> None:
    """``save_pretrained`` model (float32 safetensors; ``model`` instead of the adapter's, e.g. a moving average of
    its weights) + tokenizer + ``preprocessor_config.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (model if model is not None else adapter.model).save_pretrained(out)
    adapter.tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(FAMILY, IMAGE), indent=2) + "\n")


class Run(NamedTuple):
    """What a training run hands to saving and evaluation."""

    adapter: VLMAdapter
    inference_path_dlogit: float  # see check_inference_path
    warm: list[float]  # vision warm-up loss per step (none with --init)
    losses: list[float]  # answer loss per step, all stages
    averages: dict[float, torch.nn.Module]  # moving averages of the weights, per decay
    stages: dict[str, int]  # steps per stage, in order
    probe_accuracy: dict[str, dict[str, float]]
    t_train: float  # perf_counter when training started


def from_scratch(args: argparse.Namespace, questions: list[int], log: Any) -> Run:
    """Steps 1-3 of a run from a seed: the model built, the vision warm-up, the answer-token curriculum."""
    t_start = time.perf_counter()
    prompts = [it.prompt for name in ("short", "long") for it in load_bench(args.data / name / "ovo.json", "ovo")]
    adapter = build_adapter(args.seed, prompts)
    data = {name: load_clips(args.data / name, adapter, args.count_drills, args.seed, args.early_drills)
            for name in ("short", "long")}
    data["early"] = early(data["short"] + (data["long"] if args.early_clips == "all" else []), CHUNK)
    log(f"{adapter}; {sum(p.numel() for p in adapter.model.parameters())} parameters; clips "
        f"{ {k: len(v) for k, v in data.items()} } ({(time.perf_counter() - t_start) / 60:.1f} min)")
    diff = check_inference_path(adapter, data["long"][0], len(data["long"][0].items) - 1)  # 2. the service's input
    t_train = time.perf_counter()
    probes = Probes(adapter.llm.hidden_size, data["short"][0].present.shape[1], args.occupied_weight,
                    args.shape_weight, args.present_weight)
    warm = warm_vision(adapter, data["short"] + data["long"], probes, args.warmup_steps, args.warmup_lr, args.seed,
                       log, flip=args.flip)  # 3.
    test = load_clips(args.data / "test", adapter)
    probe_acc = {"after_warmup": probe_accuracy(adapter, probes, test)}
    log(f"held-out probe accuracy after the warm-up: {probe_acc['after_warmup']}")
    stages = [(round(args.steps * share), data[name], q)
              for (name, _), share, q in zip(CURRICULUM, args.curriculum, questions)]
    state = None
    if args.state_weight > 0:
        heads = StateProbes(adapter.llm.hidden_size, probes.frame.out_features - 4)
        state = (heads, args.state_layer, args.state_weight)
    losses, averages = train(adapter, stages, args.seed, args.lr, log, args.vision_scale, probes, args.aux_weight,
                             state, tuple(args.ema))
    probe_acc["after_training"] = probe_accuracy(adapter, probes, test)
    return Run(adapter, diff, warm, losses, averages, {n: k for (n, _), (k, _, _) in zip(CURRICULUM, stages)},
               probe_acc, t_train)


def lookup_stage(args: argparse.Namespace, log: Any) -> Run:
    """A run with ``--init``: the trained model fine-tuned by the lookup stage (``--layout-steps`` steps on fresh
    shortcut-proof layouts with the :class:`PointerLoss`, a ``--layout-long-share`` of them on long clips), then
    ``--steps`` steps on the first ``--init-clips`` long clips alone (bench items only)."""
    from stream.models.loading import load_adapter

    adapter = load_adapter(args.init)
    long_ = load_clips(args.data / "long", adapter)[: args.init_clips]
    diff = check_inference_path(adapter, long_[0], len(long_[0].items) - 1)
    t0 = time.perf_counter()
    windows = layout_windows(adapter, args.layouts, args.layout_seed, default_videos())
    log(f"{len(windows)} layout windows, {sum(len(w.drills) for w in windows)} questions "
        f"({(time.perf_counter() - t0) / 60:.1f} min)")
    reps = max(1, round(args.layout_long_share * len(windows) / (1 - args.layout_long_share) / len(long_)))
    t_train = time.perf_counter()
    layer, head, weight = args.pointer
    pointer = PointerLoss(adapter, int(layer), int(head))
    look, _ = train(adapter, [(args.layout_steps, windows + long_ * reps, 32)], args.layout_seed, args.layout_lr, log,
                    pointer=(pointer, weight))
    pointer.remove()
    losses, averages = train(adapter, [(args.steps, long_, 32)], args.layout_seed, args.lr, log, ema=tuple(args.ema))
    return Run(adapter, diff, [], look + losses, averages, {"lookup": args.layout_steps, "long": args.steps}, {},
               t_train)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0])
    questions = args.questions * 3 if len(args.questions) == 1 else args.questions
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    # 1. data: two train-split benches (short clips, long clips) and a test-split bench, all seeded
    short, long_ = args.train_clips
    specs = {"short": dict(seed=args.seed, split="train", items=short * 40, clip_seconds=(24, 32), items_per_clip=40),
             "long": dict(seed=args.seed + 1000, split="train", items=long_ * 60, clip_seconds=(40, 96),
                          items_per_clip=60),
             "test": dict(seed=TEST_SEED, split="test", items=args.test_items)}
    for name, spec in specs.items():
        if not (args.data / name / "meta.json").is_file():
            log(f"generating {name}: {make_bench(args.data / name, **spec)}")
    run = lookup_stage(args, log) if args.init is not None else from_scratch(args, questions, log)
    adapter, losses = run.adapter, run.losses
    train_min = (time.perf_counter() - run.t_train) / 60
    for d, module in run.averages.items():  # the weights' moving averages, each beside the model
        save(adapter, args.out.with_name(f"{args.out.name}-ema{d}"), module)
    save(adapter, args.out)  # 4. save, reload with the project's loader, evaluate held-out
    from stream.models.loading import load_adapter

    loaded = load_adapter(args.out)
    results = evaluate(loaded, load_clips(args.data / "test", loaded))
    acc = report(results, json.loads((args.data / "test" / "meta.json").read_text()), window_s=15)
    timing = {"threads": args.threads, "train_minutes": round(train_min, 2),
              "total_minutes": round((time.perf_counter() - t_start) / 60, 2)}
    if args.init is None:
        figures = {"seed": args.seed, "warmup_steps": args.warmup_steps, "steps": args.steps, "stages": run.stages,
                   "questions_per_step": dict(zip((n for n, _ in CURRICULUM), questions)),
                   "train_clips": list(args.train_clips),
                   "count_drills": args.count_drills, "early_drills": args.early_drills,
                   "early_clips": args.early_clips, "vision_scale": args.vision_scale,
                   "flip": args.flip, "state_probes": {"weight": args.state_weight, "layer": args.state_layer},
                   "probe_weights": {"occupied": args.occupied_weight, "shape": args.shape_weight,
                                     "present": args.present_weight, "aux": args.aux_weight},
                   "probe_accuracy_test": run.probe_accuracy, "lr": args.lr, "warmup_lr": args.warmup_lr, **timing}
    else:  # the base run's figures (its card's), then this stage's
        base = json.loads((args.init / "training.json").read_text())
        figures = {k: v for k, v in base.items() if k not in ("accuracy", "test_bench", "lookup")}
        figures["lookup"] = {"init": str(args.init), "stages": run.stages, "layouts": args.layouts,
                             "layout_seed": args.layout_seed, "layout_lr": args.layout_lr,
                             "layout_long_share": args.layout_long_share, "init_clips": args.init_clips,
                             "pointer": {"layer": int(args.pointer[0]), "head": int(args.pointer[1]),
                                         "weight": args.pointer[2]}, "lr": args.lr,
                             "final_loss": round(float(np.mean(losses[-100:])), 4), **timing}
    figures.setdefault("final_loss", round(float(np.mean(losses[-100:])), 4))  # a fine-tune keeps the base run's
    figures.update({"inference_path_max_dlogit": run.inference_path_dlogit,
                    "fps": FPS, "frames_per_chunk": CHUNK, "tokens_per_frame": loaded.tokens_per_frame,
                    "test_bench": {"seed": TEST_SEED, "items": args.test_items, "questions": len(results)},
                    "accuracy": acc, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()})
    (args.out / "training.json").write_text(json.dumps(figures, indent=1) + "\n")
    (args.out / "README.md").write_text(model_card(figures))
    if args.plot:
        bounds = np.cumsum(list(run.stages.values()))[:-1].tolist()
        plot(run.warm, losses, bounds, args.plot, f"reference model, seed {args.seed}, {args.threads} thread(s), "
             f"{train_min:.0f} min")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
