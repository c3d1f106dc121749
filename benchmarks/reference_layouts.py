"""The lookup stage of the reference model's training (``train_reference.py --init``): shortcut-proof layouts and a
pointer loss.

Trained on the benches alone, the model answers "is the <colour> <shape> on the left or the right?" with the side
most objects are on (right whenever the asked object is alone or all others share its side, near chance or below
when one sits on the other side; see docs/reference_model.md). Two things teach it to look the asked object up:

* :func:`layout_windows` -- short windows, each a fresh random layout over the training stretch of the footage, with
  exactly two objects on opposite sides of the screen at the last second, asked every real-time question the bench's
  rules allow at their last two seconds: the majority side is no answer there.
* :class:`PointerLoss` -- one attention head of one decoder layer, at the token that predicts the answer, is trained
  to put its mass on the asked object's token cells in the frame the question is asked at (``-log`` of that mass).
  Data alone does not build the readout; with the pointer it forms after ~2,000 steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from benchmarks.reference_data import GRID, LETTERS, Clip, state_labels, token_labels
from serve.eval.bench import mc_prompt
from serve.eval.synth_items import place_object, realtime_drills, screen_side
from serve.eval.synth_scene import CLIP_FPS, COLOURS, SHAPES, SIZES, Camera, PlantedObject, load_footage, render_frame
from stream.models.base import VLMAdapter

FRAMES = 4  # seconds (frames at 1 fps) per layout window


def asked_cells(labels: torch.Tensor, o: PlantedObject) -> list[int]:
    """Token cells (row-major ``GRID x GRID``) whose ground truth ``labels [GRID*GRID + 1, 3]`` is object ``o``."""
    ident = torch.tensor([1 + list(COLOURS).index(o.colour), 1 + SHAPES.index(o.shape), 1 + list(SIZES).index(o.size)])
    return [int(k) for k in torch.nonzero((labels[: GRID * GRID] == ident).all(-1)).flatten()]


def layout_windows(adapter: VLMAdapter, n: int, seed: int, videos: Sequence[str | Path], frames: int = FRAMES,
                   tries: int = 8) -> list[Clip]:
    """``n`` windows of ``frames`` seconds over the train stretch of ``videos`` (a fixed or hand-held camera), each a
    new layout of two planted objects on screen throughout and on opposite sides at the last second; as ``drills``
    every real-time question (colour / shape / side / count) the bench's rules allow at the last two seconds, and as
    ``pointers`` the asked object's cells at the question's frame (empty for the count)."""
    rng = np.random.default_rng(seed)
    footages = [load_footage(v, "train") for v in videos]
    eos = adapter.tokenizer.convert_tokens_to_ids(adapter.end_of_turn_tokens[0])
    idents = [(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]
    last, out = frames - 1, []
    while len(out) < n:
        objs: list[PlantedObject] = []
        for _ in range(2):
            ident = idents[int(rng.integers(len(idents)))]
            o = place_object(rng, len(objs), ident, 0, frames + int(rng.integers(0, 8)), objs)
            if o is not None:
                objs.append(o)
        if len(objs) != 2 or {screen_side(o, last) for o in objs} != {0, 1}:
            continue
        footage = footages[int(rng.integers(len(footages)))]
        cam = Camera.random(("fixed", "handheld")[int(rng.integers(2))], frames * CLIP_FPS, len(footage.frames), rng)
        rgb = np.stack([render_frame(footage, cam, objs, s * CLIP_FPS) for s in range(frames)])  # [F, H, W, 3]
        timeline, pts = [dict(vars(o)) for o in objs], [float(s) for s in range(frames)]  # meta.json's form
        cells, present = zip(*(token_labels(timeline, s) for s in pts))
        labels = torch.tensor(cells)  # [F, GRID*GRID + 1, 3]
        drills, pointers = [], []
        for q in realtime_drills(objs, [last - 1, last], rng, tries=tries):
            answer = torch.tensor(adapter.tokenizer(LETTERS[q.gt], add_special_tokens=False)["input_ids"] + [eos])
            drills.append((None, q.realtime + 1, adapter.question_ids(mc_prompt(q.question, q.options)), answer))
            asked = q.meta["objects"] if q.meta["kind"] != "count_now" else []
            pointers.append(asked_cells(labels[q.realtime], objs[asked[0]]) if asked else [])
        out.append(Clip(f"layout-{len(out)}", adapter.preprocess(rgb).float(), pts, [], labels,
                        torch.tensor(present), state_labels(timeline, pts), drills, pointers=pointers))
    return out


class PointerLoss:
    """``-log`` of the attention mass head ``head`` of decoder layer ``layer`` puts, at the token that predicts each
    answer, on the asked object's cells (``clip.pointers``) in the frame the question is asked at; the mean over
    the step's questions that have cells. It reads the query input and the key cache of the last decoder call (the
    batched question blocks of ``train_reference.question_hidden``) through a forward pre-hook."""

    def __init__(self, adapter: VLMAdapter, layer: int, head: int):
        if adapter.tokens_per_frame != GRID * GRID:
            raise ValueError(f"PointerLoss: {adapter.tokens_per_frame} tokens per frame; the cell labels need "
                             f"{GRID * GRID} (the reference model's shape)")
        layers, heads = len(adapter.llm.decoder.layers), adapter.llm.decoder.config.num_attention_heads
        if not (0 <= layer < layers and 0 <= head < heads):
            raise ValueError(f"PointerLoss: layer {layer} head {head}; the LLM has layers 0-{layers - 1} and heads "
                             f"0-{heads - 1}. Fix: e.g. --pointer 1 3 0.5")
        self.adapter, self.layer, self.head = adapter, layer, head
        self.attn = adapter.llm.decoder.layers[layer].self_attn
        self._seen: dict[str, Any] = {}
        self._hook = self.attn.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._seen = {"hidden": kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                      "rope": kwargs["position_embeddings"],
                      "cache": kwargs.get("cache", kwargs.get("past_key_values"))}  # renamed in transformers 5

    def remove(self) -> None:
        self._hook.remove()

    def attention(self, clip: Clip, rows: list[int]) -> list[tuple[int, torch.Tensor]]:
        """Per row of ``rows`` whose question has cells: its index in ``rows`` and the head's attention ``[K]`` at the
        token that predicts its answer (over the prefilled stream + its own block, as the forward pass masked it)."""
        want = [i for i, r in enumerate(rows) if r < len(clip.pointers) and clip.pointers[r]]
        if not want:
            return []
        qs = [clip.questions[r] for r in rows]
        prefix, t_n = len(self.adapter.stream_prefix_ids()), self.adapter.tokens_per_frame
        stream = prefix + max(seen for _, seen, _, _ in qs) * t_n  # prefilled tokens
        hidden, (cos, sin) = self._seen["hidden"], self._seen["rope"]  # [Q, Lq, d], [Q, Lq, hd]
        q_n, lq = hidden.shape[:2]
        query = self.attn.q_proj(hidden).view(q_n, lq, -1, self.attn.head_dim).transpose(1, 2)  # [Q, H, Lq, hd]
        query, _ = apply_rotary_pos_emb(query, query, cos, sin)
        keys = self._seen["cache"].layers[self.layer].keys  # [Q, KV, stream + Lq, hd]
        kv = self.head * keys.shape[1] // query.shape[1]
        out = []
        for i in want:
            _, seen, q_ids, _ = qs[i]
            at = len(q_ids)  # block = [end] + question + answer[:-1]: the question's last token predicts the answer
            allowed = torch.zeros(keys.shape[2], dtype=torch.bool)
            allowed[: prefix + seen * t_n] = True
            allowed[stream: stream + at + 1] = True
            scores = (query[i, self.head, at] @ keys[i, kv].T) * self.attn.scaling  # [stream + Lq]
            out.append((i, torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)))
        return out

    def __call__(self, clip: Clip, rows: list[int]) -> torch.Tensor | None:
        """The loss of ``clip.questions[rows]`` right after their forward pass; ``None`` when none has cells."""
        prefix, t_n = len(self.adapter.stream_prefix_ids()), self.adapter.tokens_per_frame
        out = []
        for i, p in self.attention(clip, rows):
            _, seen, _, _ = clip.questions[rows[i]]
            idx = torch.tensor([prefix + (seen - 1) * t_n + c for c in clip.pointers[rows[i]]])
            out.append(-torch.log(p[idx].sum() + 1e-6))
        return torch.stack(out).mean() if out else None
