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
from torch import nn

from stream.models.base import LayerRunner, VisualTokens, VLMAdapter, grid_positions, run_layers
from stream.models.inputs import LLMInput
from stream.models.llm import TextLM
from stream.models.qwen_parts import GridBlock, MRopeTextLM, frames_to_patches, smart_resize

VIDEO_MARKER = "<|vision_start|><|video_pad|><|vision_end|>"


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
        """The vision blocks bound to a ``rows x cols`` token grid (see :class:`GridBlock`)."""
        from transformers.vision_utils import get_vision_position_ids

        grid = torch.tensor([[1, rows * self.merge, cols * self.merge]])
        order, bounds = self._window_index(rows, cols)
        pos = get_vision_position_ids(grid, self.merge).to(self.device)  # [P, 2]
        unit = self.merge**2
        cos, sin = self.visual.rotary_pos_emb(pos, pos)
        cos, sin = (x.view(rows * cols, unit, -1)[order].reshape(rows * cols * unit, -1) for x in (cos, sin))
        full = set(self.model.config.vision_config.fullatt_block_indexes)
        return nn.ModuleList(
            GridBlock(b, cos, sin, None if i in full else bounds, (rows, cols))
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
                     extras: dict[str, Sequence[torch.Tensor]] | None = None) -> LLMInput:
        """Temporal patches' kept tokens ``frames[i]`` ``[t_i, d]`` -> one :class:`LLMInput` with 3-row positions.

        Args:
            pts: one time per temporal patch (:meth:`patch_pts`).
            positions: per temporal patch ``[t_i, 2]`` (row, col) of the kept tokens on the grid (pruned chunks keep
                their original positions); ``None`` = every token, row-major.
            grid: the token grid ``(rows, cols)``; needed unless the tokens fill a square grid.
            extras: per temporal patch ``[t_i, ...]`` family extras of the same kept tokens (Qwen3-VL's DeepStack);
                turned into the decoder's inputs by :meth:`decoder_extras`.
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
        extra = self.decoder_extras(extras or {}, torch.tensor(mask, device=self.device))
        return LLMInput(torch.cat(embeds), torch.cat(rel, dim=1), extra, meta={"pts": [float(x) for x in pts]})

    def decoder_extras(self, extras: dict[str, Sequence[torch.Tensor]], visual_mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """Per-patch extras -> the decoder's extra inputs for the chunk (``visual_mask`` ``[L]``: True at visual
        tokens). Qwen2.5-VL has none and refuses any."""
        if extras:
            raise ValueError(f"{self.family} takes no per-token extras; got {sorted(extras)} for its chunk")
        return {}

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
