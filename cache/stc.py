"""Selective recompute of SigLIP-style encoder layers against a reference frame (the STC-Cacher, arXiv 2512.00891).

A *reference* frame is encoded fully and, per encoder layer, keeps its keys, values and its residual update
``attn_out + mlp_out`` (STC keeps attention and MLP output apart; only their sum is ever reused, so one tensor
is stored, a quarter less memory and one less pass). A later frame encoded against it, in every layer:

1. computes ``layer_norm1`` and keys for **all** tokens;
2. picks the tokens whose key is least similar (cosine) to the reference key at the same position: the
   ``ceil(ratio * P)`` least similar, plus every token whose cosine is below ``threshold`` (when given); in a
   window-local layer (Qwen2.5-VL) whole windows are taken first, most changed first (see :func:`select_tokens`);
3. computes queries and values for the picked tokens only; the value matrix is the reference's with the picked
   rows replaced, so a picked token's query attends to **all** tokens' fresh keys and to the mixed values (as
   STC's ``custom_siglip.py`` does; keys must be computed for every token anyway to pick tokens);
4. computes ``out_proj`` and the MLP of the picked tokens only; every other token adds the reference's residual
   update to its *own* residual stream (``x + attn_out_ref + mlp_out_ref``).

With ``ratio == 1`` every token is picked and the result equals the plain encoder up to float rounding.

With key sketches (the reference has ``sketch``; ``CacherConfig.key_sketch``, :mod:`cache.sketch`), step 1 computes
``r``-wide sketches of the keys instead of the keys and step 2 compares those; step 3 computes keys of the picked
tokens only, and every other token attends with its reference key, as it does with its reference value.

Layers are reached only through the family-neutral per-layer API of :mod:`stream.models.vision_ops`
(``norm1 / keys / queries / values / attend / mlp_residual / finish``): SigLIP-style layers (LLaVA-OneVision,
SmolVLM) and the Qwen adapters' grid-bound blocks (rotary q/k, window-local attention where the block is windowed,
fused qkv). They run in eval mode; every patch of a frame is real.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cache.sketch import key_sketch
from stream.models.vision_ops import layer_ops

_STATES = 3  # tensors kept per layer: keys, values, residual update


@dataclass(frozen=True)
class LayerStates:
    """One encoder layer's tensors for a batch of frames, each ``[N, P, D]`` (``N`` may be 1 to broadcast).

    ``update`` is the layer's residual update ``attn_out + mlp_out`` (``layer(x) - x``); ``sketch`` ``[N, P, r]``
    the keys' sketches (:mod:`cache.sketch`) when tokens are picked by sketch.
    """

    keys: torch.Tensor
    values: torch.Tensor
    update: torch.Tensor
    sketch: torch.Tensor | None = None


@dataclass(frozen=True)
class ReferenceStates:
    """Everything a reference frame keeps, stacked over layers: three ``[L, P, D]`` tensors, and ``sketch``
    ``[L, P, r]`` when its tokens are compared by key sketch (:mod:`cache.sketch`)."""

    keys: torch.Tensor
    values: torch.Tensor
    update: torch.Tensor
    sketch: torch.Tensor | None = None

    @classmethod
    def allocate(
        cls, num_layers: int, tokens: int, dim: int, dtype: torch.dtype, device: torch.device | str,
        sketch_dim: int | None = None,
    ) -> "ReferenceStates":
        """Uninitialised storage for one frame: three ``[L, P, D]`` tensors (+ ``[L, P, r]`` sketches)."""

        def new(width: int) -> torch.Tensor:
            return torch.empty(num_layers, tokens, width, dtype=dtype, device=device)

        return cls(new(dim), new(dim), new(dim), new(sketch_dim) if sketch_dim else None)

    def _pairs(self, other: LayerStates) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = [(self.keys, other.keys), (self.values, other.values), (self.update, other.update)]
        if self.sketch is not None:
            if other.sketch is None:
                raise ValueError("this reference keeps key sketches but the layer states have none")
            pairs.append((self.sketch, other.sketch))
        return pairs

    def write_layer(self, index: int, states: LayerStates, frame: int) -> None:
        """Copy frame ``frame`` of one layer's batch ``states`` (each ``[N, P, D]``) into layer ``index``."""
        for dst, src in self._pairs(states):
            dst[index].copy_(src[frame])

    def write_rows(self, index: int, idx: torch.Tensor, rows: LayerStates) -> None:
        """Rolling reference: overwrite tokens ``idx [k]`` of layer ``index`` with ``rows`` (each ``[k, D]``), the
        keys, values and residual update (and sketches) a reused frame just recomputed there."""
        for dst, src in self._pairs(rows):
            dst[index].index_copy_(0, idx, src.to(dst.dtype))

    def layer(self, index: int, dtype: torch.dtype) -> LayerStates:
        """Layer ``index`` as broadcastable ``[1, P, D]`` tensors in the compute ``dtype``."""
        return LayerStates(
            keys=self.keys[index].unsqueeze(0).to(dtype),
            values=self.values[index].unsqueeze(0).to(dtype),
            update=self.update[index].unsqueeze(0).to(dtype),
            sketch=None if self.sketch is None else self.sketch[index].unsqueeze(0).to(dtype),
        )

    @property
    def num_layers(self) -> int:
        return int(self.keys.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held: keys, values, update (and sketches)."""
        return [self.keys, self.values, self.update] + ([self.sketch] if self.sketch is not None else [])

    def to(self, device: torch.device | str, pin: bool = False) -> "ReferenceStates":
        """A copy on ``device`` (always a copy, also on the same device); ``pin``: page-locked host memory, so the
        copy back to a CUDA device is a fast DMA."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = t.to(device, copy=True)
            return out.pin_memory() if pin else out

        return ReferenceStates(move(self.keys), move(self.values), move(self.update), move(self.sketch))

    def copy_from(self, other: "ReferenceStates") -> None:
        """Overwrite these tensors with ``other``'s (same shapes; any devices): a rolling reference's write-back."""
        for dst, src in zip(self.tensors(), other.tensors()):
            dst.copy_(src)

    @property
    def nbytes(self) -> int:
        """Bytes held: ``(3 * D + r) * L * P * element size``."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def reference_nbytes(num_layers: int, tokens: int, dim: int, dtype: torch.dtype, sketch_dim: int | None = None) -> int:
    """Bytes of one :class:`ReferenceStates`: keys, values and residual update (and key sketches) for every layer."""
    width = _STATES * dim + (sketch_dim or 0)
    return width * num_layers * tokens * torch.empty((), dtype=dtype).element_size()


def check_layers(layers: Sequence[nn.Module]) -> None:
    """Raise ``TypeError`` naming the first layer without per-layer ops (:func:`stream.models.vision_ops.layer_ops`)."""
    if len(layers) == 0:
        raise TypeError("the vision encoder has no layers; pass the adapter's vision_layers (an nn.ModuleList)")
    for i, layer in enumerate(layers):
        layer_ops(layer, i)


def full_layer(layer: nn.Module, x: torch.Tensor, sketch_dim: int | None = None) -> tuple[torch.Tensor, LayerStates]:
    """The plain layer forward on ``x [N, P, D]`` through its ops, also returning what a reference keeps (with
    ``sketch_dim``: the keys' sketches too)."""
    ops = layer_ops(layer)
    n, p, _ = x.shape
    idx = torch.arange(p, device=x.device).expand(n, -1)  # [N, P]: every token is a query
    h = ops.norm1(x)  # [N, P, D]
    k = ops.keys(h)
    v = ops.values(h)
    out = ops.mlp_residual(x + ops.attend(ops.queries(h, idx), k, v, idx))  # [N, P, D]
    sketch = key_sketch(ops, h, sketch_dim) if sketch_dim else None  # [N, P, r]
    return ops.finish(out), LayerStates(k, v, out - x, sketch)


def token_similarity(keys: torch.Tensor, ref_keys: torch.Tensor) -> torch.Tensor:
    """Cosine of each token's key with the reference key at the same position: ``[N, P, D] x [1|N, P, D] -> [N, P]``."""
    dots = (keys * ref_keys).sum(dim=-1) if ref_keys.shape[0] != 1 else torch.einsum("npd,pd->np", keys, ref_keys[0])
    norms = keys.norm(dim=-1) * ref_keys.norm(dim=-1)  # [N, P]
    return dots / norms.clamp_min(1e-6)


def count_to_recompute(sim: torch.Tensor, ratio: float, threshold: float | None) -> int:
    """Tokens per frame to recompute for ``sim [N, P]``: ``max(ceil(ratio * P), most frames' count below threshold)``.

    One count for the whole batch keeps the batch rectangular; a frame with fewer tokens below the threshold
    recomputes its next least similar ones instead (more exact, never less).
    """
    p = sim.shape[-1]
    k = math.ceil(ratio * p - 1e-9)
    if threshold is not None and sim.numel():
        k = max(k, int((sim < threshold).sum(dim=-1).max()))
    return min(max(k, 0), p)


def select_tokens(sim: torch.Tensor, ratio: float, threshold: float | None,
                  groups: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[N, k]`` of the least similar tokens per frame (see :func:`count_to_recompute`).

    ``groups`` ``[P]`` (the attention windows of a window-local layer): a kept token's reused update is stale
    wherever its window changed, since it attends only there; so whole windows are taken first, most changed (mean
    ``1 - sim``) first, while they fit in ``k``, and the rest of ``k`` goes to the least similar other tokens.
    """
    k = count_to_recompute(sim, ratio, threshold)
    if groups is not None and 0 < k < sim.shape[-1]:
        groups = groups.to(sim.device)
        size = torch.bincount(groups).to(sim.dtype)  # [G]
        change = torch.zeros(sim.shape[0], size.shape[0], dtype=sim.dtype, device=sim.device)
        change = change.index_add_(1, groups, 1 - sim) / size  # [N, G] mean dissimilarity per window
        order = change.argsort(dim=-1, descending=True)  # [N, G]
        below = sim < threshold if threshold is not None else torch.zeros_like(sim, dtype=torch.bool)  # [N, P]
        room = k - below.sum(dim=-1, keepdim=True)  # [N, 1] left after the tokens below the threshold
        fits = size[order].cumsum(dim=-1) <= room  # [N, G] whole windows within the budget, most changed first
        whole = torch.zeros_like(fits).scatter_(1, order, fits)  # [N, G]
        # rank: tokens below the threshold, then whole windows, then the least similar (cosines lie in [-1, 1])
        sim = sim - 3.0 * whole[:, groups] - 6.0 * below
    return torch.topk(sim, k, dim=-1, largest=False, sorted=False).indices  # [N, k]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [N, k]`` of ``x [N, P, D]`` -> ``[N, k, D]``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _put_rows(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write ``rows [N, k, D]`` into ``x [N, P, D]`` at ``idx [N, k]`` in place; returns ``x``."""
    return x.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rows)


def selective_layer(
    layer: nn.Module, x: torch.Tensor, ref: LayerStates, ratio: float, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer of ``x [N, P, D]`` reusing ``ref`` (``[1|N, P, D]`` tensors) for the most similar tokens.

    Returns the layer output ``[N, P, D]`` and the recomputed token indices ``[N, k]``.
    """
    out, idx, _ = selective_layer_rows(layer, x, ref, ratio, threshold)
    return out, idx


def selective_layer_rows(
    layer: nn.Module, x: torch.Tensor, ref: LayerStates, ratio: float, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor, LayerStates]:
    """:func:`selective_layer`, also returning the recomputed rows (keys, values, residual update, each
    ``[N, k, D]``) that a rolling reference writes back."""
    ops = layer_ops(layer)
    h = ops.norm1(x)  # [N, P, D]
    groups = ops.token_groups(x.shape[1])
    if ref.sketch is not None:  # pick by key sketch; unpicked tokens attend with their reference key
        sketch = key_sketch(ops, h, ref.sketch.shape[-1])  # [N, P, r]
        idx = select_tokens(token_similarity(sketch, ref.sketch), ratio, threshold, groups)  # [N, k]
    else:  # STC: every token's fresh key, to pick and to attend
        keys = ops.keys(h)  # [N, P, D]
        idx = select_tokens(token_similarity(keys, ref.keys), ratio, threshold, groups)  # [N, k]
    if idx.shape[1] == 0:
        empty = x[:, :0]
        none = None if ref.sketch is None else x.new_empty(x.shape[0], 0, ref.sketch.shape[-1])  # [N, 0, r]
        return ops.finish(x + ref.update), idx, LayerStates(empty, empty, empty, none)
    h_sel = _gather_rows(h, idx)  # [N, k, D]
    if ref.sketch is not None:
        k_sel = ops.keys_at(h_sel, idx)  # [N, k, D]
        keys = _put_rows(ref.keys.expand_as(x).clone(), idx, k_sel)  # [N, P, D]
        s_sel = _gather_rows(sketch, idx)  # [N, k, r]
    else:
        k_sel, s_sel = _gather_rows(keys, idx), None
    v_sel = ops.values(h_sel)  # [N, k, D]
    values = _put_rows(ref.values.expand_as(x).clone(), idx, v_sel)  # [N, P, D]
    x_in = _gather_rows(x, idx)  # [N, k, D]
    x_sel = ops.mlp_residual(x_in + ops.attend(ops.queries(h_sel, idx), keys, values, idx))  # [N, k, D]
    rows = LayerStates(k_sel, v_sel, x_sel - x_in, s_sel)  # [N, k, D] each (sketch [N, k, r])
    return ops.finish(_put_rows(x + ref.update, idx, x_sel)), idx, rows  # the reference's update elsewhere


@torch.inference_mode()
def encode_full(
    hidden: torch.Tensor,
    layers: Sequence[nn.Module],
    keep: Sequence[int] = (),
    store_dtype: torch.dtype | None = None,
    sketch_dim: int | None = None,
) -> tuple[torch.Tensor, list[ReferenceStates]]:
    """Run all ``layers`` on ``hidden [N, P, D]``; keep the reference states of frames ``keep``.

    Only the kept frames' states outlive a layer, so peak extra memory is one layer's batch plus the kept
    references. Returns the output ``[N, P, D]`` and one :class:`ReferenceStates` per kept frame (``store_dtype``,
    default the compute dtype; with ``sketch_dim`` they keep key sketches, and reused frames pick by sketch).
    """
    _, p, d = hidden.shape
    dtype = store_dtype or hidden.dtype
    refs = [ReferenceStates.allocate(len(layers), p, d, dtype, hidden.device, sketch_dim) for _ in keep]
    for i, layer in enumerate(layers):
        hidden, states = full_layer(layer, hidden, sketch_dim if keep else None)
        for ref, frame in zip(refs, keep):
            ref.write_layer(i, states, frame)
    return hidden, refs


@torch.inference_mode()
def encode_selective(
    hidden: torch.Tensor,
    layers: Sequence[nn.Module],
    ref: ReferenceStates,
    ratio: float,
    threshold: float | None = None,
    rolling: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Run ``layers`` on ``hidden [N, P, D]`` against one reference frame.

    ``rolling``: frames run one after another and each writes the tokens it recomputed (keys, values, residual
    update, per layer) into ``ref`` in place, so the next frame compares against the freshest state of every
    position and reuses the newest features there (drift cannot build up against a stale key frame; a token is
    served from the last frame that recomputed it). Without it the frames are batched and ``ref`` is untouched.

    Returns the output ``[N, P, D]`` and, per layer, the number of tokens recomputed over the ``N`` frames.
    """
    if ref.num_layers != len(layers) or ref.keys.shape[1:] != hidden.shape[1:]:
        raise ValueError(
            f"reference shape [L={ref.num_layers}, P, D={list(ref.keys.shape[1:])}] does not match this encoder "
            f"({len(layers)} layers, frames {list(hidden.shape[1:])}); references cannot move between models. "
            "Fix: reset the cacher when the model or image size changes."
        )
    if not rolling:
        counts = []
        for i, layer in enumerate(layers):
            hidden, idx = selective_layer(layer, hidden, ref.layer(i, hidden.dtype), ratio, threshold)
            counts.append(int(idx.numel()))
        return hidden, counts
    outs, counts = [], [0] * len(layers)
    for frame in hidden.split(1):  # [1, P, D] each, in stream order
        for i, layer in enumerate(layers):
            frame, idx, rows = selective_layer_rows(layer, frame, ref.layer(i, hidden.dtype), ratio, threshold)
            ref.write_rows(i, idx[0], LayerStates(rows.keys[0], rows.values[0], rows.update[0],
                                                  None if rows.sketch is None else rows.sketch[0]))
            counts[i] += int(idx.numel())
        outs.append(frame)
    return torch.cat(outs), counts


def frame_signature(hidden: torch.Tensor, grid: int = 4) -> torch.Tensor:
    """A cheap unit-norm signature per frame from the patch embeddings ``hidden [N, P, D]`` -> ``[N, g*g*D]`` float32.

    Each frame's mean token is subtracted (it carries the bias and overall brightness), then tokens are
    average-pooled onto a ``g x g`` grid of cells (``g = min(grid, sqrt(P))``; token order is used when ``P`` is
    not square) and flattened. Two frames of one view score close to 1, different views near 0.
    """
    n, p, d = hidden.shape
    x = (hidden - hidden.mean(dim=1, keepdim=True)).float()  # [N, P, D]
    side = math.isqrt(p)
    if side * side == p:
        g = min(grid, side)
        cells = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(n, d, side, side), g)  # [N, D, g, g]
    else:
        cells = F.adaptive_avg_pool1d(x.transpose(1, 2), min(grid * grid, p))  # [N, D, cells]
    return F.normalize(cells.flatten(1), dim=-1)  # [N, cells * D]


def signature_dim(tokens: int, dim: int, grid: int = 4) -> int:
    """Length of :func:`frame_signature` for frames of ``tokens`` x ``dim``."""
    side = math.isqrt(tokens)
    cells = min(grid, side) ** 2 if side * side == tokens else min(grid * grid, tokens)
    return cells * dim
