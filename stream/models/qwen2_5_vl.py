"""Qwen2.5-VL: our smart-resize + temporal patches -> windowed ViT (2-D rotary) -> patch merger -> Qwen2 (M-RoPE).

**Preprocessing** (ours; no torchvision): every frame of a stream is resized (PIL bicubic) to the same
``smart_resize(H, W)`` size -- both sides multiples of ``patch_size * merge_size`` (28), area within
``[min_pixels, max_pixels]`` -- so the grid is a function of the stream's frame size (a frame of another size gives
another grid; nothing is carried between grids). Frames are rescaled, normalized and cut into **temporal patches of
2 frames** (``temporal_patch_size``), each ``[gh * gw, 3 * 2 * 14 * 14]`` in HF's merge-block order. Rule for odd
counts: a chunk with an odd number of frames repeats its last frame to fill its last temporal patch (what the HF
processor does for a video of odd length); so does the stream's last frame. The pts of a temporal patch is the pts
of its first frame.

**Layout in the LLM** (what HF's ``get_rope_index`` computes for this token sequence): each temporal patch is one
``<|vision_start|><|video_pad|>*T<|vision_end|>`` group of grid ``(1, gh, gw)``; its visual tokens sit at
``(t, h, w) = (p + 1, p + 1 + row, p + 1 + col)`` after the ``<|vision_start|>`` at ``p``, and text resumes at
``p + 1 + max(gh, gw) / 2``. A live stream has no known length, so every temporal patch is its own group (HF's
layout for a list of 2-frame videos); a whole video given to HF at once would instead be one group of ``T`` patches
whose temporal positions are spaced by ``tokens_per_second * seconds_per_patch``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stream.models.base import LayerRunner, VisualTokens, VLMAdapter, grid_positions, run_layers
from stream.models.inputs import LLMInput
from stream.models.llm import TextLM
from stream.models.vision_ops import LayerOps, merge_heads, split_heads

VIDEO_MARKER = "<|vision_start|><|video_pad|><|vision_end|>"


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

    def __init__(self, block: "_GridBlock") -> None:
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


class _GridBlock(nn.Module):
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


class Qwen2_5_VLAdapter(VLMAdapter):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` checkpoints (Qwen2.5-VL-3B/7B/72B-Instruct).

    One adapter "frame" is a temporal patch (2 video frames); ``preprocess`` returns
    ``[N_patches, gh/2, gw/2, 4, patch_dim]`` so the grid travels with the tensor.
    """

    family = "qwen2_5_vl"
    cell_refresh = None  # rotary only: region signatures are pure content and swing with any motion (README)
    video_marker = VIDEO_MARKER
    end_of_turn_tokens = ("<|im_end|>",)
    min_pixels = 128 * 28 * 28
    max_pixels = 768 * 28 * 28
    text_lm_class: type[MRopeTextLM] = MRopeTextLM

    def _text_lm(self) -> TextLM:
        vc = self.model.config.vision_config
        self.patch, self.merge, self.temporal = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        return self.text_lm_class(self.model.model.language_model, self.model.lm_head)

    def configure_preprocessing(self, cfg: dict) -> None:
        """Read ``min_pixels`` / ``max_pixels`` (or ``size.shortest_edge/longest_edge``) from preprocessor_config."""
        size = cfg.get("size") or {}
        self.min_pixels = int(cfg.get("min_pixels") or size.get("shortest_edge") or self.min_pixels)
        self.max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge") or self.max_pixels)

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    @property
    def placeholder_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def vision_layers(self) -> nn.ModuleList:
        return self.visual.blocks

    @property
    def image_size(self) -> int:
        return int(math.isqrt(self.max_pixels))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The LLM token grid ``(rows, cols)`` of frames ``height x width`` (fixed per frame size)."""
        h, w = smart_resize(height, width, self.patch * self.merge, self.min_pixels, self.max_pixels)
        return h // (self.patch * self.merge), w // (self.patch * self.merge)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        s = self.preprocess_spec
        pv = frames_to_patches(rgb, self.patch, self.merge, self.temporal, s.mean, s.std, self.min_pixels,
                               self.max_pixels)
        return pv.to(self.device, self.vision_dtype)

    def _window_index(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge-unit order of one temporal patch in window-attention order, and its window bounds (in patches)."""
        from transformers.vision_utils import get_vision_window_index

        vc = self.model.config.vision_config
        grid = torch.tensor([[1, rows * self.merge, cols * self.merge]])
        return get_vision_window_index(grid, self.merge, vc.window_size, self.patch)

    def vision_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, rows, cols, m*m, E]`` -> ``[N, P, D]`` patch embeddings in window order."""
        n, rows, cols, unit, e = pixel_values.shape
        hidden = self.visual.patch_embed(pixel_values.reshape(-1, e))  # [N*P, D]
        order, _ = self._window_index(rows, cols)
        return hidden.view(n, rows * cols, unit, -1)[:, order].reshape(n, rows * cols * unit, -1)

    def check_cacher(self) -> None:
        """The grid-bound blocks the runner gets always have per-layer ops (:class:`QwenBlockOps`)."""

    def check_attention(self) -> None:
        """The last grid-bound block scores attention through its ops (rotary, window mask where windowed)."""

    def attention_tokens(self, scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch scores ``[N, P]`` in window order -> ``[N, rows * cols]``: the mean over the ``m*m`` patches the
        merger fuses into each token, row-major on the token grid."""
        rows, cols = grid
        order, _ = self._window_index(rows, cols)
        n = scores.shape[0]
        return scores.float().view(n, rows * cols, -1)[:, torch.argsort(order)].mean(dim=-1)  # [N, T]

    def grid_layers(self, rows: int, cols: int) -> nn.ModuleList:
        """The vision blocks bound to a ``rows x cols`` token grid (see :class:`_GridBlock`)."""
        from transformers.vision_utils import get_vision_position_ids

        grid = torch.tensor([[1, rows * self.merge, cols * self.merge]])
        order, bounds = self._window_index(rows, cols)
        pos = get_vision_position_ids(grid, self.merge).to(self.device)  # [P, 2]
        unit = self.merge**2
        cos, sin = self.visual.rotary_pos_emb(pos, pos)
        cos, sin = (x.view(rows * cols, unit, -1)[order].reshape(rows * cols * unit, -1) for x in (cos, sin))
        full = set(self.model.config.vision_config.fullatt_block_indexes)
        return nn.ModuleList(
            _GridBlock(b, cos, sin, None if i in full else bounds, (rows, cols))
            for i, b in enumerate(self.visual.blocks)
        )

    @torch.inference_mode()
    def encode_vision(self, pixel_values: torch.Tensor, layer_runner: LayerRunner | None = None) -> torch.Tensor:
        """``[N, rows, cols, m*m, E]`` -> features ``[N, rows, cols, m*m, D]`` (token-grid order, before the merger)."""
        n, rows, cols, unit, _ = pixel_values.shape
        hidden = self.vision_embed(pixel_values)  # [N, P, D] window order
        hidden = (layer_runner or run_layers)(hidden, self.grid_layers(rows, cols))
        order, _ = self._window_index(rows, cols)
        inverse = torch.argsort(order)
        return hidden.view(n, rows * cols, unit, -1)[:, inverse].view(n, rows, cols, unit, -1)

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> VisualTokens:
        """``[N, rows, cols, m*m, D]`` -> ``[N, rows*cols, d]`` merged tokens, row-major on the token grid."""
        n, rows, cols, unit, d = features.shape
        tokens = self.visual.merger(features.reshape(-1, d)).view(n, rows * cols, -1)  # [N, T, d]
        return VisualTokens(tokens, grid_positions(rows, cols), (rows, cols))

    # ---- LLM side ----------------------------------------------------------------------------------------------
    def frame_text(self, pts: float) -> tuple[str, str]:
        """Text around one temporal patch's visual tokens."""
        return "<|vision_start|>", "<|vision_end|>"

    def chunk_embeds(self, frames: Sequence[torch.Tensor], pts: Sequence[float],
                     positions: Sequence[torch.Tensor] | None = None, grid: tuple[int, int] | None = None,
                     deepstack: Sequence[torch.Tensor] | None = None) -> LLMInput:
        """Temporal patches' kept tokens ``frames[i]`` ``[t_i, d]`` -> one :class:`LLMInput` with 3-row positions.

        Args:
            pts: one time per temporal patch (:meth:`patch_pts`).
            positions: per temporal patch ``[t_i, 2]`` (row, col) of the kept tokens on the grid (pruned chunks keep
                their original positions); ``None`` = every token, row-major.
            grid: the token grid ``(rows, cols)``; needed unless the tokens fill a square grid.
            deepstack: per temporal patch ``[levels, t_i, d]`` DeepStack features of the same kept tokens.
        """
        if len(frames) != len(pts):
            raise ValueError(f"chunk_embeds needs one pts per temporal patch: {len(frames)} patches, {len(pts)} pts")
        embeds, rel, mask, p = [], [], [], 0
        for i, tokens in enumerate(frames):
            rc = positions[i].to(torch.long).cpu() if positions is not None else None
            g = grid
            if g is None:
                side = math.isqrt(tokens.shape[0])
                if rc is not None or side * side != tokens.shape[0]:
                    raise ValueError("chunk_embeds needs grid=(rows, cols) for pruned or non-square token grids")
                g = (side, side)
            if rc is None:
                if tokens.shape[0] != g[0] * g[1]:
                    raise ValueError(f"{tokens.shape[0]} tokens do not fill grid {g}; pass their positions")
                rc = grid_positions(*g)
            before, after = (self._ids(x) for x in self.frame_text(float(pts[i])))
            t = rc.shape[0]
            rel.append(torch.arange(p, p + len(before)).expand(3, -1))
            p += len(before)
            rel.append(torch.stack([torch.full((t,), p), p + rc[:, 0], p + rc[:, 1]]))  # [3, t]
            p += max(g)
            rel.append(torch.arange(p, p + len(after)).expand(3, -1))
            p += len(after)
            embeds += [self.llm.embed(before), tokens.to(self.device, self.llm.dtype), self.llm.embed(after)]
            mask += [False] * len(before) + [True] * t + [False] * len(after)
        if not embeds:
            return LLMInput(torch.zeros(0, self.llm.hidden_size, device=self.device, dtype=self.llm.dtype))
        extra = {}
        if deepstack is not None:
            extra = {"deepstack": torch.cat([d.to(self.device, self.llm.dtype) for d in deepstack], dim=1),
                     "visual_mask": torch.tensor(mask, device=self.device)}
        return LLMInput(torch.cat(embeds), torch.cat(rel, dim=1), meta={"pts": [float(x) for x in pts]}, **extra)

    def chunk_placeholder_ids(self, n_frames: int, pts: Sequence[float], tokens: int = 0) -> torch.Tensor:
        """HF's ids for ``n_frames`` temporal patches of ``tokens`` visual tokens each."""
        groups = []
        for t in list(pts)[:n_frames]:
            before, after = self.frame_text(float(t))
            groups += [self._ids(before), torch.full((tokens,), self.placeholder_id), self._ids(after)]
        return torch.cat(groups)

    def patch_pts(self, pts: Sequence[float]) -> list[float]:
        """Frame pts -> the pts of each temporal patch (its first frame's)."""
        return [float(x) for x in list(pts)[:: self.temporal]]

    def frame_pts(self, pts: Sequence[float]) -> list[float]:
        return self.patch_pts(pts)


QWEN_VL_TURN = (
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""One chat turn of the Qwen-VL templates (closes the messages loop), video and image parts as Qwen renders them."""

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    + QWEN_VL_TURN
)
"""The Qwen2.5-VL chat template (video and image parts as the Qwen processors render them)."""
