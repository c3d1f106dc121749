"""LLaVA-OneVision: SigLIP tower -> 2-layer MLP projector -> 2x2 bilinear pooling -> Qwen2.

Video frames: 384 px / patch 14 = 27x27 = 729 patches -> projector -> pooled to 14x14 = 196 tokens per frame;
after the last frame HF appends one learned ``image_newline`` embedding. Prompt (Qwen2 chat template):
``<|im_start|>user <video>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`` with ``<video>`` standing for every
visual token of every frame.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from stream.models.base import VisualTokens, VLMAdapter, grid_positions
from stream.models.llm import TextLM


def _tower(model: nn.Module) -> nn.Module:
    """The SigLIP vision transformer (``.vision_model`` on transformers 4.x, the model itself on 5.x)."""
    vt = model.model.vision_tower
    return getattr(vt, "vision_model", vt)


class LlavaOneVisionAdapter(VLMAdapter):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` checkpoints (e.g. llava-onevision-qwen2-0.5b-ov-hf)."""

    family = "llava_onevision"
    video_marker = "<video>"
    end_of_turn_tokens = ("<|im_end|>",)

    def _text_lm(self) -> TextLM:
        cfg = self.model.config
        if cfg.vision_feature_select_strategy != "full":
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} is not supported for video "
                "(SigLIP has no CLS token); LLaVA-OneVision checkpoints use 'full'."
            )
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single layer index is supported")
        n_layers = len(_tower(self.model).encoder.layers)
        # hidden_states has n_layers + 1 entries (embeddings first): index `layer` is the output of this many layers
        self._n_used = layer if layer >= 0 else n_layers + 1 + layer
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size  # 27
        self._patch_grid = side
        self._pooled = math.ceil(side / 2)  # 14
        self.tokens_per_frame = self._pooled**2  # 196
        return TextLM(self.model.model.language_model, self.model.lm_head)

    @property
    def placeholder_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def vision_layers(self) -> nn.ModuleList:
        return _tower(self.model).encoder.layers[: self._n_used]

    def vision_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 384, 384]`` -> ``[N, 729, D]`` patch + position embeddings."""
        return _tower(self.model).embeddings(pixel_values)

    def project(self, features: torch.Tensor) -> VisualTokens:
        """``[N, 729, D]`` (last used layer, no post-norm) -> ``[N, 196, d]`` pooled LLM tokens."""
        mm = self.model.model
        tokens = mm.multi_modal_projector(features)  # [N, 729, d]
        tokens = mm.apply_pooling(tokens)  # [N, 196, d]
        return VisualTokens(tokens, grid_positions(self._pooled, self._pooled), (self._pooled, self._pooled))

    def video_end_embeds(self) -> torch.Tensor:
        """``[1, d]``: the learned ``image_newline`` HF appends after a video's last frame."""
        return self.model.model.image_newline[None].to(self.llm.dtype)


LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'user' %}{{ '\\n' + content['text'] }}{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The LLaVA-OneVision (Qwen2) chat template, as shipped with the llava-hf checkpoints' processors."""
