"""Qwen3-VL: Qwen2.5-VL's streaming layout with timestamps, a full-attention tower with learned (interpolated)
position embeddings, DeepStack, and interleaved M-RoPE.

**Preprocessing**: as Qwen2.5-VL (:mod:`stream.models.qwen2_5_vl`) with patch 16 (resize factor 32) and the video
area rule of HF's Qwen3-VL video processor evaluated for one temporal patch (``2 * h * w`` within
``[min_pixels, max_pixels]``): a live stream's length is unknown, so its per-frame size cannot depend on it (HF sizes
a whole clip by its frame count). Odd chunks / the last frame repeat the last frame; a temporal patch's time is the
mean of its two frames' times (HF's ``_calculate_timestamps``).

**Layout**: each temporal patch is ``<{t:.1f} seconds><|vision_start|><|video_pad|>*T<|vision_end|>`` -- exactly
HF's video prompt, which already splits a video into one group per temporal patch; positions as HF's
``get_rope_index``. **DeepStack**: the features after vision blocks ``deepstack_visual_indexes`` (each through its
own merger) are added to the hidden states after decoder layers ``0..levels-1`` at the visual tokens; the pruner's
kept tokens select the same rows of every level.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from stream.models.base import LayerRunner, VisualTokens, grid_positions, run_layers
from stream.models.qwen2_5_vl import QWEN_VL_TURN, Qwen2_5_VLAdapter
from stream.models.qwen_parts import GridBlock, MRopeTextLM, frames_to_patches


def smart_resize_video(height: int, width: int, factor: int = 32, min_pixels: int = 128 * 32 * 32,
                       max_pixels: int = 768 * 32 * 32, num_frames: int = 2, temporal: int = 2) -> tuple[int, int]:
    """HF Qwen3-VL's video resize rule (area counted over ``num_frames``), for a clip of ``num_frames`` frames."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is above Qwen's limit of 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class DeepStackTextLM(MRopeTextLM):
    """Qwen3-VL's decoder: interleaved M-RoPE; a piece's ``deepstack`` / ``visual_mask`` extras become the
    decoder's ``deepstack_visual_embeds`` / ``visual_pos_masks`` (batch of one, as the scheduler runs them)."""

    interleaved = True

    def forward(self, embeds: torch.Tensor, cache: Any = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 1,
                logits_at: torch.Tensor | None = None, deepstack: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None, **extra: Any) -> torch.Tensor:
        if deepstack is not None:
            if embeds.shape[0] != 1:
                raise ValueError(f"DeepStack pieces run one at a time; got a batch of {embeds.shape[0]}")
            mask = visual_mask.to(self.device).reshape(1, -1)
            if mask.shape[1] < embeds.shape[1]:  # a right-padded row: padding is not visual
                mask = torch.cat([mask, mask.new_zeros(1, embeds.shape[1] - mask.shape[1])], dim=1)
            extra = {**extra, "visual_pos_masks": mask, "deepstack_visual_embeds": list(deepstack.to(self.device))}
        return super().forward(embeds, cache, position_ids, attention_mask, logits_to_keep, logits_at, **extra)


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Adapter for ``Qwen3VLForConditionalGeneration`` checkpoints (Qwen3-VL-2B/4B/8B/32B-Instruct, dense)."""

    family = "qwen3_vl"
    cell_refresh = 0.8  # learned absolute position embeddings are added to the patches: stable region signatures
    min_pixels = 128 * 32 * 32
    max_pixels = 768 * 32 * 32
    text_lm_class = DeepStackTextLM

    def grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.patch * self.merge
        h, w = smart_resize_video(height, width, f, self.min_pixels, self.max_pixels, self.temporal, self.temporal)
        return h // f, w // f

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        s, f = self.preprocess_spec, self.patch * self.merge
        if rgb.ndim == 3:
            rgb = rgb[None]
        h, w = smart_resize_video(rgb.shape[1], rgb.shape[2], f, self.min_pixels, self.max_pixels, self.temporal,
                                  self.temporal)
        pv = frames_to_patches(rgb, self.patch, self.merge, self.temporal, s.mean, s.std, 1, 1 << 62, size=(h, w))
        return pv.to(self.device, self.vision_dtype)

    def vision_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, rows, cols, m*m, E]`` -> ``[N, P, D]`` patch + interpolated learned position embeddings."""
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        n, rows, cols, unit, e = pixel_values.shape
        v = self.visual
        hidden = v.patch_embed(pixel_values.reshape(-1, e)).view(n, rows * cols * unit, -1)  # [N, P, D]
        grid = torch.tensor([[1, rows * self.merge, cols * self.merge]], device=hidden.device)
        idx, wts = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=v.num_grid_per_side, mode=v.interpolation_mode,
            align_corners=v.interpolation_align_corners, spatial_merge_size=self.merge)
        pos = (v.pos_embed(idx) * wts[:, :, None]).sum(1)  # [P, D]
        return hidden + pos.to(hidden.dtype)[None]

    def attention_tokens(self, scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch scores ``[N, P]`` (merge-block order) -> ``[N, rows * cols]``: the mean over each token's patches."""
        return scores.float().view(scores.shape[0], grid[0] * grid[1], -1).mean(dim=-1)  # [N, T]

    def grid_layers(self, rows: int, cols: int) -> nn.ModuleList:
        from transformers.vision_utils import get_vision_position_ids

        grid = torch.tensor([[1, rows * self.merge, cols * self.merge]])
        pos = get_vision_position_ids(grid, self.merge).to(self.device)  # [P, 2]
        cos, sin = self.visual.rotary_pos_emb(pos, pos)
        return nn.ModuleList(GridBlock(b, cos, sin, None, (rows, cols)) for b in self.visual.blocks)

    @torch.inference_mode()
    def encode_vision(self, pixel_values: torch.Tensor, layer_runner: LayerRunner | None = None) -> torch.Tensor:
        """``[N, rows, cols, m*m, E]`` -> ``[1 + levels, N, rows, cols, m*m, D]``: the last block's output, then the
        outputs of the DeepStack blocks (recorded by each block's ``tap`` as the plain loop or the cacher's per-layer
        ops finish it). A custom runner (the STC cacher splits a batch by reference) gets one temporal patch per
        call, so every recorded level belongs to that patch."""
        if layer_runner is not None and pixel_values.shape[0] > 1:
            return torch.cat([self.encode_vision(pixel_values[i: i + 1], layer_runner)
                              for i in range(pixel_values.shape[0])], dim=1)
        n, rows, cols, unit, _ = pixel_values.shape
        layers = self.grid_layers(rows, cols)
        taps: dict[int, torch.Tensor] = {}
        for i in self.model.config.vision_config.deepstack_visual_indexes:
            layers[i].tap = lambda out, i=i: taps.__setitem__(i, out)
        hidden = (layer_runner or run_layers)(self.vision_embed(pixel_values), layers)
        levels = [hidden] + [taps[i] for i in self.model.config.vision_config.deepstack_visual_indexes]
        return torch.stack(levels).view(len(levels), n, rows, cols, unit, -1)

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> VisualTokens:
        """``[1 + levels, N, rows, cols, m*m, D]`` -> tokens ``[N, T, d]`` + extra ``deepstack`` ``[N, T, levels, d]``."""
        _, n, rows, cols, unit, d = features.shape
        v = self.visual
        tokens = v.merger(features[0].reshape(-1, d)).view(n, rows * cols, -1)
        deep = [m(f.reshape(-1, d)).view(n, rows * cols, -1) for m, f in zip(v.deepstack_merger_list, features[1:])]
        return VisualTokens(tokens, grid_positions(rows, cols), (rows, cols), {"deepstack": torch.stack(deep, dim=2)})

    def decoder_extras(self, extras: dict[str, Sequence[torch.Tensor]], visual_mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """Per-patch ``deepstack`` ``[t_i, levels, d]`` -> the decoder's ``deepstack`` ``[levels, V, d]`` (V visual
        tokens of the chunk, in order) and ``visual_mask`` ``[L]``."""
        unknown = sorted(set(extras) - {"deepstack"})
        if unknown:
            raise ValueError(f"{self.family} takes only the extra 'deepstack'; got {unknown}")
        if "deepstack" not in extras:
            return {}
        deep = torch.cat([x.to(self.device, self.llm.dtype) for x in extras["deepstack"]], dim=0)  # [V, levels, d]
        if deep.shape[0] != int(visual_mask.sum()):
            raise ValueError(f"deepstack has {deep.shape[0]} tokens for {int(visual_mask.sum())} visual tokens")
        return {"deepstack": deep.permute(1, 0, 2).contiguous(), "visual_mask": visual_mask}

    def frame_text(self, pts: float) -> tuple[str, str]:
        return f"<{pts:.1f} seconds><|vision_start|>", "<|vision_end|>"

    def patch_pts(self, pts: Sequence[float]) -> list[float]:
        """Frame pts -> each temporal patch's time: the mean of its first and last frame (HF's timestamps)."""
        p = [float(x) for x in pts]
        return [(p[i] + p[min(i + self.temporal, len(p)) - 1]) / 2 for i in range(0, len(p), self.temporal)]


QWEN3_VL_CHAT_TEMPLATE = "{% for message in messages %}" + QWEN_VL_TURN
"""The Qwen3-VL chat template (no default system turn); the video marker is expanded per temporal patch."""
