"""The reference model's shape and data, shared by its trainer (``train_reference.py``) and its reports: the model
size, the service defaults it is trained at, each frame's per-token ground truth, and the decoded clips of a
generated bench."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.eval.bench import LETTERS, REC_PROMPT, EvalItem, load_bench, mc_prompt, resolve_video
from serve.eval.synth_items import STABLE_S, realtime_drills
from serve.eval.synth_scene import COLOURS, SHAPES, SIZES, PlantedObject
from stream.config import SamplerConfig, SourceConfig
from stream.models.base import PreprocessSpec, VLMAdapter
from stream.models.llava_onevision import LLAVA_OV_CHAT_TEMPLATE, LlavaOneVisionAdapter
from stream.models.tiny import build_tiny_model, train_tokenizer
from stream.sampler import FpsSampler
from stream.sources import open_source


FAMILY = "llava_onevision"
IMAGE, PATCH = 64, 8  # 8x8 = 64 patches -> 2x2 pooling -> 4x4 = 16 tokens per frame
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE, patch_size=PATCH)
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=6, rope_theta=10000.0)
FPS = SamplerConfig().fps  # the service default (1 fps)
CHUNK = SamplerConfig().frames_per_chunk  # the service default (8 frames per chunk)
TEST_SEED = 0
GRID = 4  # token grid side (IMAGE / PATCH / 2)
MAX_COUNT = 4  # appearances counted up to this in the stream-state labels (REC asks 1-4)
ONSET_SCALE = 100.0  # onset seconds / this, regressed by the stream-state probes


def planted(o: dict[str, Any]) -> PlantedObject:
    """One object of ``meta.json``'s timeline as the generator's :class:`PlantedObject`."""
    cover = tuple(o["covered"]) if o.get("covered") is not None else None
    return PlantedObject(**{**o, "start": tuple(o["start"]), "end": tuple(o["end"]), "covered": cover})


def token_labels(objects: list[dict[str, Any]], t: float) -> tuple[list[list[int]], list[float]]:
    """Ground truth of one frame from the bench's timeline: per token cell (row-major, ``GRID x GRID`` over the
    frame) ``[colour, shape, size]`` of the object covering most of it (0 = none; else 1 + index in ``COLOURS`` /
    ``SHAPES`` / ``SIZES``), then ``[count on screen (max 3), 0, 0]``; and a multi-hot frame summary: which
    colour x shape x size objects are on screen (36), which colour x shape ones sit left / right of centre (2 x 18)."""
    cells = [[0, 0, 0] for _ in range(GRID * GRID)]
    best = [0.15] * (GRID * GRID)  # an object must cover at least 15 % of a cell
    visible = [planted(o) for o in objects if o["on"] <= t < o["off"]]
    n_c, n_s, n_z = len(COLOURS), len(SHAPES), len(SIZES)
    present = [0.0] * (n_c * n_s * (n_z + 2))
    for o in visible:
        (cx, cy), hw, hh = o.centre(t), o.half_width(), SIZES[o.size] / 2
        ci, si, zi = list(COLOURS).index(o.colour), SHAPES.index(o.shape), list(SIZES).index(o.size)
        present[(ci * n_s + si) * n_z + zi] = 1.0
        present[n_c * n_s * (n_z + (cx >= 0.5)) + ci * n_s + si] = 1.0
        for k in range(GRID * GRID):
            r, c = divmod(k, GRID)
            ox = max(0.0, min(cx + hw, (c + 1) / GRID) - max(cx - hw, c / GRID))
            oy = max(0.0, min(cy + hh, (r + 1) / GRID) - max(cy - hh, r / GRID))
            if ox * oy * GRID * GRID > best[k]:
                best[k] = ox * oy * GRID * GRID
                cells[k] = [1 + ci, 1 + si, 1 + zi]
    return cells + [[min(3, len(visible)), 0, 0]], present


def state_labels(objects: list[dict[str, Any]], pts: list[float]) -> dict[str, torch.Tensor]:
    """Per sampled frame (time ``pts[f]``) what the stream so far holds, from the bench's timeline: ``count [F, 18]``
    appearances of each colour x shape (capped at ``MAX_COUNT``), ``last [F, 6]`` 1 + colour index of the latest
    object of each shape x size to appear (0 = none yet), ``onset [F, 36]`` first onset (s / ``ONSET_SCALE``) of
    each colour x shape x size and ``seen [F, 36]`` whether it has appeared (the onset's mask)."""
    colours, n_s, n_z = list(COLOURS), len(SHAPES), len(SIZES)
    times = torch.tensor(pts, dtype=torch.float64)  # [F]
    count = torch.zeros(len(pts), len(colours) * n_s, dtype=torch.long)
    last = torch.zeros(len(pts), n_s * n_z, dtype=torch.long)
    onset, seen = torch.zeros(len(pts), len(colours) * n_s * n_z), torch.zeros(len(pts), len(colours) * n_s * n_z)
    for o in sorted(objects, key=lambda o: (o["on"], o["oid"])):  # by onset: the latest object is written last
        ci, si, zi = colours.index(o["colour"]), SHAPES.index(o["shape"]), list(SIZES).index(o["size"])
        ident, after = (ci * n_s + si) * n_z + zi, times >= o["on"]  # frames at or after its onset [F]
        count[after, ci * n_s + si] += 1
        last[after, si * n_z + zi] = 1 + ci
        first = after & (seen[:, ident] == 0)
        seen[first, ident], onset[first, ident] = 1.0, o["on"] / ONSET_SCALE
    count.clamp_(max=MAX_COUNT)
    return {"count": count, "last": last, "onset": onset, "seen": seen}


@dataclass
class Clip:
    """One decoded training/test clip: ``pixels [F, 3, S, S]`` float32 at ``FPS``, and its questions."""

    video: str
    pixels: torch.Tensor
    pts: list[float]
    items: list[tuple[EvalItem, int, torch.Tensor, torch.Tensor]]  # (item, frames seen, prompt ids, answer ids)
    labels: torch.Tensor  # [F, GRID * GRID + 1, 3] int64: per token cell colour/shape/size, last row: count
    present: torch.Tensor  # [F, 72] float multi-hot frame summary (see token_labels)
    state: dict[str, torch.Tensor]  # per frame what the stream so far holds (see state_labels)
    drills: list[tuple[None, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # see count_drills
    early_drills: list[tuple[None, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # see early
    pointers: list[list[int]] = field(default_factory=list)  # per question the asked object's cells (lookup stage)

    @property
    def questions(self) -> list[tuple[EvalItem | None, int, torch.Tensor, torch.Tensor]]:
        """What training samples from: the bench's items, then the counting drills (``item`` None)."""
        return self.items + self.drills


def count_drills(objects: list[dict[str, Any]], seconds: int, n: int, rng: random.Random,
                 absent: int = 2) -> list[tuple[str, str, int, int]]:
    """``n`` extra counting questions about one training clip, ``(colour, shape, t, count)``: "how many times has a
    <colour> <shape> appeared" asked at whole second ``t``, answered from the timeline by the generator's REC rule
    (onsets at or before ``t``; never within 1 s after an onset of that colour x shape). They ask about every
    colour x shape the clip shows and ``absent`` it never shows, with the answers 0..``MAX_COUNT`` drawn equally
    often (the bench's one REC item per clip asks about one object only, and a skewed answer mix is learnt as a
    prior)."""
    if n <= 0:
        return []
    onsets: dict[tuple[str, str], list[int]] = {}
    for o in objects:
        onsets.setdefault((o["colour"], o["shape"]), []).append(o["on"])
    unseen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in onsets]
    buckets: dict[int, list[tuple[str, str, int, int]]] = {}
    for colour, shape in list(onsets) + rng.sample(unseen, min(absent, len(unseen))):
        ons = onsets.get((colour, shape), [])
        for t in range(2, seconds):
            k = sum(on <= t for on in ons)
            if k <= MAX_COUNT and not any(on <= t <= on + 1 for on in ons):
                buckets.setdefault(k, []).append((colour, shape, t, k))
    keys = sorted(buckets)
    return [rng.choice(buckets[rng.choice(keys)]) for _ in range(n)] if keys else []


def early(clips: list[Clip], frames: int) -> list[Clip]:
    """The curriculum's first stage: each clip's questions asked within its first ``frames`` sampled frames, its
    real-time drills there (``load_clips(early_drills=True)``) included; clips with none are left out."""
    out = [Clip(c.video, c.pixels[:frames], c.pts[:frames], [r for r in c.items if r[1] <= frames],
                c.labels[:frames], c.present[:frames], {k: v[:frames] for k, v in c.state.items()},
                [r for r in c.drills + c.early_drills if r[1] <= frames]) for c in clips]
    return [c for c in out if c.questions]


def build_adapter(seed: int, prompts: list[str] = ()) -> VLMAdapter:
    """A fresh LLaVA-OneVision of the reference size (random init from ``seed``) with the tiny byte-level BPE, its
    merges also learnt from the benchmark's ``prompts`` so each word of the domain is one token."""
    tok = train_tokenizer(FAMILY, extra_corpus=sorted(set(prompts)) * 3)
    model = build_tiny_model(FAMILY, tok, TEXT, VISION, seed)
    spec = PreprocessSpec(IMAGE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    return LlavaOneVisionAdapter(model, tok, spec, LLAVA_OV_CHAT_TEMPLATE)


def decode(path: Path) -> tuple[np.ndarray, list[float]]:
    """The frames the service samples from ``path``: ``[F, H, W, 3]`` uint8 and their pts."""
    sampler, rgb, pts = FpsSampler(FPS), [], []
    with open_source(path, SourceConfig()) as src:
        for frame in src:
            if sampler.accept(frame):
                rgb.append(frame.rgb)
                pts.append(frame.pts)
    return np.stack(rgb), pts


def load_clips(bench_dir: Path, adapter: VLMAdapter, drills: int = 0, seed: int = 0,
               early_drills: bool = False) -> list[Clip]:
    """``bench_dir/ovo.json`` items grouped per video, frames decoded and preprocessed once; with ``drills``, that
    many :func:`count_drills` per clip; with ``early_drills``, every real-time question the bench's rules allow at
    each second of the first chunk (``serve.eval.synth_items.realtime_drills``; the first stage trains on them, see
    :func:`early`). Training only: the bench's items stay what is evaluated."""
    items = load_bench(bench_dir / "ovo.json", "ovo")
    eos = adapter.tokenizer.convert_tokens_to_ids(adapter.end_of_turn_tokens[0])
    meta = json.loads((bench_dir / "meta.json").read_text())
    objects = {c["video"]: c["objects"] for c in meta["clips"]}
    by_video: dict[str, list[EvalItem]] = {}
    for it in items:
        by_video.setdefault(it.video, []).append(it)
    clips, rng = [], random.Random(seed)
    for video, group in by_video.items():
        rgb, pts = decode(resolve_video(group[0], bench_dir))
        rows = []
        for it in sorted(group, key=lambda i: i.time_s):
            seen = sum(p <= it.time_s + 1e-9 for p in pts)
            answer = torch.tensor(adapter.tokenizer(it.answer, add_special_tokens=False)["input_ids"] + [eos])
            rows.append((it, seen, adapter.question_ids(it.prompt), answer))
        extra = []
        for colour, shape, t, k in count_drills(objects[video], int(pts[-1]) + 1, drills, rng):
            answer = torch.tensor(adapter.tokenizer(str(k), add_special_tokens=False)["input_ids"] + [eos])
            extra.append((None, sum(p <= t + 1e-9 for p in pts),
                          adapter.question_ids(REC_PROMPT.format(activity=f"show a {colour} {shape}")), answer))
        quick = []
        if early_drills:
            times, sub = [int(p) for p in pts[:CHUNK] if p >= STABLE_S + 1], np.random.default_rng(rng.randrange(2**32))
            asked = {(it.time_s, it.prompt) for it in group}  # a drill the bench already asks is left out
            for q in realtime_drills([planted(o) for o in objects[video]], times, sub):
                prompt = mc_prompt(q.question, q.options)
                if (q.realtime, prompt) in asked:
                    continue
                answer = torch.tensor(adapter.tokenizer(LETTERS[q.gt], add_special_tokens=False)["input_ids"] + [eos])
                quick.append((None, sum(p <= q.realtime + 1e-9 for p in pts), adapter.question_ids(prompt), answer))
        cells, present = zip(*(token_labels(objects[video], t) for t in pts))
        clips.append(Clip(video, adapter.preprocess(rgb).float(), pts, rows, torch.tensor(cells),
                          torch.tensor(present), state_labels(objects[video], pts), sorted(extra, key=lambda r: r[1]),
                          quick))
    return clips
