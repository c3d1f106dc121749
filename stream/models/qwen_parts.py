"""The pieces of the Qwen vision-language towers that Qwen2.5-VL and Qwen3-VL share: our smart-resize and temporal
patching (no torchvision), the M-RoPE decoder handle, and the grid-bound vision blocks with their per-layer ops (the
STC cacher's seam for these towers). The adapters themselves are ``qwen2_5_vl.py`` and ``qwen3_vl.py``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stream.models.llm import TextLM
from stream.models.vision_ops import LayerOps, merge_heads, split_heads


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen's resize target: sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``, aspect kept.

    Raises:
        ValueError: an aspect ratio above 200 (Qwen's limit).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is above Qwen's limit of 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frames_to_patches(rgb: np.ndarray, patch: int, merge: int, temporal: int, mean: Sequence[float],
                      std: Sequence[float], min_pixels: int, max_pixels: int,
                      size: tuple[int, int] | None = None) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[ceil(N / temporal), gh / merge, gw / merge, merge**2, 3 * temporal * patch**2]``.

    The last frame is repeated when ``N`` is not a multiple of ``temporal``. Flattening dims 1-3 gives HF's
    ``pixel_values_videos`` rows of one temporal patch, in order. ``size`` = ``(h, w)`` overrides the resize target.
    """
    if rgb.ndim == 3:
        rgb = rgb[None]
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8 or rgb.shape[0] == 0:
        raise ValueError(f"expected uint8 frames [N>0, H, W, 3], got dtype {rgb.dtype} shape {list(rgb.shape)}")
    h, w = size or smart_resize(rgb.shape[1], rgb.shape[2], patch * merge, min_pixels, max_pixels)
    out = np.empty((rgb.shape[0], h, w, 3), dtype=np.float32)  # [N, h, w, 3]
    for i, frame in enumerate(rgb):
        img = Image.fromarray(frame)
        out[i] = np.asarray(img if img.size == (w, h) else img.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    out = (out - np.asarray(mean, np.float32) * 255.0) / (np.asarray(std, np.float32) * 255.0)
    x = torch.from_numpy(out).permute(0, 3, 1, 2)  # [N, 3, h, w]
    if x.shape[0] % temporal:
        x = torch.cat([x, x[-1:].expand(temporal - x.shape[0] % temporal, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // temporal, h // patch, w // patch
    x = x.reshape(gt, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, 3, temporal, p, p]
    return x.reshape(gt, gh // merge, gw // merge, merge * merge, 3 * temporal * patch * patch).contiguous()


class MRopeTextLM(TextLM):
    """The Qwen2 decoder of Qwen2.5-VL: 3 rows of rotary positions (t, h, w), channel sections ``mrope_section``."""

    @property
    def position_rows(self) -> int:
        return 3

    interleaved = False  # Qwen3-VL: channels cycle t, h, w (HF's interleaved M-RoPE)

    def channel_rows(self) -> torch.Tensor:
        """``[head_dim / 2]`` int64: which position row rotates each channel pair (HF ``mrope_section``)."""
        section = list(self.decoder.rotary_emb.mrope_section)
        if sum(section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {section} does not cover head_dim {self.head_dim} / 2")
        if not self.interleaved:
            return torch.repeat_interleave(torch.arange(len(section)) % 3, torch.tensor(section))
        rows = torch.zeros(self.head_dim // 2, dtype=torch.long)
        for row, offset in ((1, 1), (2, 2)):  # as HF's recomposition: h at 1::3, w at 2::3, within 3 * section
            rows[offset: section[row] * 3: 3] = row
        return rows

    def rotate_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """M-RoPE rotation of keys ``[..., n, head_dim]`` at ``positions`` ``[3, n]`` (a ``[1|n]`` row broadcasts);
        negative positions rotate back. Float32 angles as HF computes them, returned in ``keys.dtype``."""
        if positions.ndim == 1:
            positions = positions[None]
        positions = positions.expand(3, -1).to(keys.device)
        rows = self.channel_rows().to(keys.device)  # [hd/2]
        angles = positions[rows].T.float() * self.inv_freq.to(keys.device)[None]  # [n, hd/2]
        emb = torch.cat((angles, angles), dim=-1)  # [n, hd]
        x = keys.float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * emb.cos() + rotated * emb.sin()).to(keys.dtype)


class QwenBlockOps(LayerOps):
    """Per-layer ops of a Qwen vision block bound to a grid (fused ``qkv``, 2-D rotary, window-local attention)."""

    def __init__(self, block: "GridBlock") -> None:
        super().__init__(block.block)
        self.grid_block = block
        attn = block.block.attn
        self.heads, self.scale = attn.num_heads, attn.scaling

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.norm1(x)

    def _third(self, part: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight ``[D, D_in]`` and bias of q (0), k (1) or v (2) in the fused ``qkv`` (rows ``[q; k; v]``)."""
        qkv = self.layer.attn.qkv
        d = qkv.weight.shape[0] // 3
        rows = slice(part * d, (part + 1) * d)
        return qkv.weight[rows], None if qkv.bias is None else qkv.bias[rows]

    def _qkv(self, h: torch.Tensor, part: int) -> torch.Tensor:
        """One of q (0), k (1), v (2) of ``h [N, T, D]``: only that third of the fused projection is computed."""
        return F.linear(h, *self._third(part))  # [N, T, D]

    def _rotate(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """2-D rotary of ``x [N, T, D]`` at token indices ``idx [N, T]``, in float32 as HF does."""
        n, t, d = x.shape
        cos, sin = self.grid_block.cos[idx].float(), self.grid_block.sin[idx].float()  # [N, T, hd]
        xh = x.view(n, t, self.heads, -1).float()
        half = xh.shape[-1] // 2
        rotated = torch.cat((-xh[..., half:], xh[..., :half]), dim=-1)
        return (xh * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype).view(n, t, d)

    def keys(self, h: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        return self.keys_at(h, idx)

    def key_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._third(1)

    def keys_at(self, h_sel: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._rotate(self._qkv(h_sel, 1), idx)

    def queries(self, h_sel: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._rotate(self._qkv(h_sel, 0), idx)

    def values(self, h_sel: torch.Tensor) -> torch.Tensor:
        return self._qkv(h_sel, 2)

    @property
    def num_heads(self) -> int:
        return int(self.heads)

    @property
    def attn_scale(self) -> float:
        return float(self.scale)

    def token_groups(self, p: int) -> torch.Tensor | None:
        """A windowed block: ``[P]`` window of each patch (window order, so windows are contiguous runs)."""
        windows = self.grid_block.windows
        if windows is None:
            return None
        return torch.bucketize(torch.arange(p), windows[1:].long(), right=True)  # [P]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask(idx, k.shape[1])
        o = F.scaled_dot_product_attention(split_heads(q, self.heads), split_heads(k, self.heads),
                                           split_heads(v, self.heads), attn_mask=mask, scale=self.scale)
        return self.layer.attn.proj(merge_heads(o))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer.mlp(self.layer.norm2(x))

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        if self.grid_block.tap is not None:
            self.grid_block.tap(out)
        return out


class GridBlock(nn.Module):
    """One vision block bound to a grid: ``[N, P, D]`` temporal patches (window order) -> ``[N, P, D]``.

    Each temporal patch attends within itself (full blocks) or within its windows (other blocks), as HF's
    ``cu_seqlens`` make it; 2-D rotary cos/sin of the grid are fixed. ``grid`` = ``(rows, cols)`` of the token grid
    (the STC cacher starts new references when it changes: a frame of another size mid-stream).
    """

    def __init__(self, block: nn.Module, cos: torch.Tensor, sin: torch.Tensor, windows: torch.Tensor | None,
                 grid: tuple[int, int] | None = None):
        super().__init__()
        self.block, self.cos, self.sin, self.windows, self.grid = block, cos, sin, windows, grid
        self.tap = None  # called with the block's output (Qwen3-VL DeepStack levels)

    def stc_ops(self) -> QwenBlockOps:
        """The family-neutral per-layer API the STC cacher uses (:mod:`stream.models.vision_ops`)."""
        return QwenBlockOps(self)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, p, d = hidden.shape
        bounds = self.windows if self.windows is not None else torch.tensor([0, p], dtype=torch.int32)
        offsets = (torch.arange(n, dtype=torch.int32) * p)[:, None] + bounds[None, 1:]  # [N, w]
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), offsets.flatten()]).to(hidden.device)
        emb = (self.cos.repeat(n, 1), self.sin.repeat(n, 1))  # [N*P, hd]
        out = self.block(hidden.reshape(n * p, d), cu_seqlens=cu, position_embeddings=emb).view(n, p, d)
        if self.tap is not None:
            self.tap(out)
        return out
