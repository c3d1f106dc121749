"""SmolVLM / Idefics3: SigLIP-style tower (+ post-norm) -> pixel-shuffle connector -> Llama (SmolLM2).

Video frames: 512 px / patch 16 = 32x32 = 1024 patches -> pixel shuffle by 4 -> 8x8 = 64 tokens per frame. Each
frame is written as ``\\nFrame from MM:SS:<fake_token_around_image><global-img><image>*64<fake_token_around_image>``
after a video intro, and the video ends with ``\\n\\n`` (HF's SmolVLM video processor). A live stream has no known
frame count or duration, so our intro is a live-stream sentence instead of HF's "series of N frames from a H:MM:SS
video".
"""
from __future__ import annotations

import torch
from torch import nn

from stream.models.base import VisualTokens, VLMAdapter
from stream.models.llm import TextLM


def _vision(model: nn.Module) -> nn.Module:
    return model.model.vision_model


class SmolVLMAdapter(VLMAdapter):
    """Adapter for ``SmolVLMForConditionalGeneration`` and ``Idefics3ForConditionalGeneration`` checkpoints."""

    family = "smolvlm"
    video_marker = "<video>"
    end_of_turn_tokens = ("<end_of_utterance>",)
    video_intro_text = "You are watching a live video stream; frames arrive with their [MM:SS] time.\n"

    def _text_lm(self) -> TextLM:
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # 32
        self._scale = int(cfg.scale_factor)  # 4
        self._side = side // self._scale  # 8
        self.tokens_per_frame = self._side**2  # 64
        self._positions = self._shuffle_positions(side)
        return TextLM(self.model.model.text_model, self.model.lm_head)

    def _shuffle_positions(self, side: int) -> torch.Tensor:
        """Where each output token of the pixel shuffle sits on the (side/scale)^2 grid: shuffle a coordinate map."""
        r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        coords = torch.stack([r.flatten(), c.flatten()], dim=-1)[None].float()  # [1, P, 2]
        shuffled = self.model.model.connector.pixel_shuffle(coords, self._scale)  # [1, T, 2*scale^2]
        groups = shuffled[0].view(self.tokens_per_frame, -1, 2)  # [T, scale^2, 2]
        return (groups.min(dim=1).values // self._scale).long()  # [T, 2]

    @property
    def placeholder_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def vision_layers(self) -> nn.ModuleList:
        return _vision(self.model).encoder.layers

    def vision_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 512, 512]`` -> ``[N, 1024, D]`` (full frames: every patch valid)."""
        n, _, h, w = pixel_values.shape
        p = self.model.config.vision_config.patch_size
        mask = torch.ones(n, h // p, w // p, dtype=torch.bool, device=pixel_values.device)
        return _vision(self.model).embeddings(pixel_values=pixel_values, patch_attention_mask=mask)

    def vision_finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return _vision(self.model).post_layernorm(hidden)

    def project(self, features: torch.Tensor) -> VisualTokens:
        """``[N, 1024, D]`` -> ``[N, 64, d]`` via pixel shuffle + linear."""
        tokens = self.model.model.connector(features)  # [N, 64, d]
        return VisualTokens(tokens, self._positions, (self._side, self._side))

    def video_intro(self) -> str:
        return self.video_intro_text

    def frame_text(self, pts: float) -> tuple[str, str]:
        minutes, seconds = divmod(int(pts), 60)
        return f"\nFrame from {minutes:02d}:{seconds:02d}:<fake_token_around_image><global-img>", (
            "<fake_token_around_image>"
        )

    def video_outro(self) -> str:
        return "\n\n"


SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] in ['image', 'video'] %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""The SmolVLM2 chat template (``<video>`` is expanded into per-frame text + image tokens)."""
