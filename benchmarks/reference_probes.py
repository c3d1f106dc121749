"""Auxiliary losses of the reference model's training (``train_reference.py``); none of them is part of the model.

* :class:`Probes` -- linear probes on the visual tokens: what each token's cell shows and what the frame holds.
* :class:`StateProbes` -- linear probes on the LLM's hidden state at the last token of each frame (a middle layer):
  what a question about the stream *so far* needs, per frame: how many times each colour x shape has appeared
  (``REC``), the colour of the latest object of each shape x size (``EPM``), when each object first appeared
  (``ASI``), what is on screen and on which side (``ATR`` / ``STU`` / ``OJR``). Dense targets on every frame where the
  answers give one or two tokens per question.
* :func:`mirror` -- the left-right mirror image of frames and their ground truth.
"""
from __future__ import annotations

import torch

from benchmarks.reference_data import GRID, MAX_COUNT
from serve.eval.synth_scene import COLOURS, SHAPES, SIZES


class Probes(torch.nn.Module):
    """Linear probes on the visual tokens ``[B, T, d]`` the LLM reads: per token the colour, shape and size of the
    object covering its cell (0 = none) and which cell it is; from the mean token the frame's object count and its
    multi-hot summary (see ``benchmarks.reference_data.token_labels``). Cells an object covers weigh
    ``occupied_weight`` x an empty cell's (most cells are empty), the shape term ``shape_weight`` x (shape needs the
    neighbouring patches and is learnt last), the summary ``present_weight``."""

    def __init__(self, d: int, n_present: int, occupied_weight: float, shape_weight: float, present_weight: float):
        super().__init__()
        self.cells = GRID * GRID
        self.splits = (len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1, self.cells)
        self.token = torch.nn.Linear(d, sum(self.splits))
        self.frame = torch.nn.Linear(d, 4 + n_present)
        self.weights = (occupied_weight, (1.0, shape_weight, 1.0), present_weight)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T, d]``, ``labels [B, T + 1, 3]``, ``present [B, P]`` -> the weighted probe loss."""
        occupied_w, part_w, present_w = self.weights
        ce = torch.nn.functional.cross_entropy
        parts = self.token(tokens).split(self.splits, dim=-1)
        w = 1 + (occupied_w - 1) * (labels[:, :-1, 0] > 0).float().flatten()  # [B*T]
        loss = sum(part_w[j] * (ce(p.flatten(0, 1), labels[:, :-1, j].flatten(), reduction="none") * w).sum() / w.sum()
                   for j, p in enumerate(parts[:3]))
        loss = loss + ce(parts[3].flatten(0, 1), torch.arange(self.cells).repeat(tokens.shape[0]))  # where it sits
        frame = self.frame(tokens.mean(1))  # [B, 4 + P]
        loss = loss + ce(frame[:, :4], labels[:, -1, 0])
        return loss + present_w * torch.nn.functional.binary_cross_entropy_with_logits(frame[:, 4:], present)


def mirror(pixels: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Left-right mirror images of a batch of frames and their ground truth: ``pixels [B, 3, S, S]``, ``labels
    [B, T + 1, 3]`` (token cells row-major; the last row, the count, stays), ``present [B, P]`` (its left and right
    blocks swap)."""
    cells = torch.arange(GRID * GRID).view(GRID, GRID).flip(1).flatten()  # cell (r, c) shows (r, GRID-1-c)
    labels = torch.cat([labels[:, cells], labels[:, -1:]], 1)
    half = len(COLOURS) * len(SHAPES)
    base = present.shape[1] - 2 * half
    present = torch.cat([present[:, :base], present[:, base + half:], present[:, base:base + half]], 1)
    return pixels.flip(-1), labels, present


class StateProbes(torch.nn.Module):
    """Linear probes on ``[F, d]`` LLM hidden states (the last token of each frame) for
    :func:`~benchmarks.reference_data.state_labels` and the frame's on-screen summary ``present [F, P]``, read
    through a parameter-free layer norm. Entries about objects the clip has (a count or latest colour above 0) weigh
    ``5 x`` the rest, as most are 0."""

    def __init__(self, d: int, n_present: int):
        super().__init__()
        n_cs, n_sz, n_id = len(COLOURS) * len(SHAPES), len(SHAPES) * len(SIZES), len(COLOURS) * len(SHAPES) * len(SIZES)
        self.splits = (n_cs * (MAX_COUNT + 1), n_sz * (len(COLOURS) + 1), n_id, n_id, n_present)
        self.head = torch.nn.Linear(d, sum(self.splits))

    def loss(self, states: torch.Tensor, labels: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """``states [F, d]``, ``state_labels`` of those frames, ``present [F, P]`` -> the probe loss."""
        normed = torch.nn.functional.layer_norm(states, states.shape[-1:])  # the residual stream's scale grows
        count, last, onset, seen, now = self.head(normed).split(self.splits, dim=-1)
        f = states.shape[0]

        def weighted_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # [F, K * C], [F, K]
            w = 1 + 4 * (target > 0).float().flatten()
            ce = torch.nn.functional.cross_entropy(logits.reshape(f * target.shape[1], -1), target.flatten(),
                                                   reduction="none")
            return (ce * w).sum() / w.sum()

        bce = torch.nn.functional.binary_cross_entropy_with_logits
        mask = labels["seen"]
        mse = ((onset - labels["onset"]) ** 2 * mask).sum() / mask.sum().clamp(min=1)
        return (weighted_ce(count, labels["count"]) + weighted_ce(last, labels["last"]) + 10 * mse
                + bce(seen, mask) * 5 + bce(now, present) * 5)
