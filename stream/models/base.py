"""The family-agnostic VLM adapter: the seams the rest of stc-serve hooks into.

A video-LLM turns frames into LLM input in fixed steps; each is a method here so later stages can replace one:

1. ``preprocess``      frames ``[N,H,W,3]`` uint8        -> ``pixel_values [N,3,S,S]``
2. ``vision_embed``    pixel values                      -> patch embeddings ``[N,P,D]``
3. ``vision_layers``   the encoder layers, run by a ``layer_runner`` (the STC cacher replaces the plain loop)
4. ``vision_finish``   post-norm if the family has one   -> ViT features ``[N,P,D]``
5. ``project``         projector + pooling/pixel-shuffle -> :class:`VisualTokens` ``[N,T,d]`` with grid positions
   (the pruner selects tokens here, before the LLM)
6. LLM side: ``stream_prefix_ids`` (chat template up to the video), ``chunk_embeds`` (a chunk's kept visual tokens with
   the family's per-frame text), ``question_embeds`` (end of video + question + assistant turn), and ``llm``
   (:class:`~stream.models.llm.TextLM`) to prefill into a transformers ``Cache`` and decode.

Family specifics live in one subclass each (``llava_onevision.py``, ``smolvlm.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stream.models.llm import TextLM
from stream.models.preprocess import frames_to_pixel_values

LayerRunner = Callable[[torch.Tensor, nn.ModuleList], torch.Tensor]
QUESTION_SENTINEL = "\x00QUESTION\x00"


@dataclass
class VisualTokens:
    """Projected visual tokens of a batch of frames, ready for the LLM.

    Attributes:
        embeds: ``[N, T, d]`` LLM-space embeddings, ``T`` tokens per frame.
        positions: ``[T, 2]`` int64 (row, col) of each token on the ``grid`` (same for every frame).
        grid: ``(rows, cols)`` of the token grid.
        extras: the family's per-token extras, each ``[N, T, ...]`` (frame, token, then the family's own axes), e.g.
            Qwen3-VL's DeepStack features ``[N, T, levels, d]``. Opaque outside the adapter: the pruner's keep mask
            selects their tokens like the embeddings', and :meth:`VLMAdapter.chunk_embeds` turns them into decoder
            inputs. Empty for most families.
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, x in self.extras.items():
            if tuple(x.shape[:2]) != tuple(self.embeds.shape[:2]):
                raise ValueError(f"extra {name!r} must be [N, T, ...] = {list(self.embeds.shape[:2])} + [...], "
                                 f"got {list(x.shape)}")

    def __repr__(self) -> str:
        return f"VisualTokens(embeds={list(self.embeds.shape)}, grid={self.grid})"


def run_layers(hidden: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
    """The plain layer loop: ``[N, P, D] -> [N, P, D]`` through every layer (no attention mask: full frames)."""
    for layer in layers:
        out = layer(hidden, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def grid_positions(rows: int, cols: int) -> torch.Tensor:
    """Row-major ``[rows*cols, 2]`` int64 (row, col) positions."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r.flatten(), c.flatten()], dim=-1)


@dataclass
class PreprocessSpec:
    """What :func:`frames_to_pixel_values` needs, read from the checkpoint's ``preprocessor_config.json``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"


class VLMAdapter:
    """Base adapter; a family subclass fills in the vision/projection/prompt specifics.

    Args:
        model: the HF ``*ForConditionalGeneration`` model, in eval mode.
        tokenizer: its tokenizer.
        preprocess_spec: resize/normalize settings.
        chat_template: Jinja chat template used to build the streaming prompt.
        system_prompt: optional system turn (``None`` = the template's default).
    """

    family: str = "base"
    #: ``cacher.refresh_cell_below='auto'`` for this family: 0.8 where the patch embeddings the cacher sees carry an
    #: absolute position embedding (it keeps each region's signature stable); ``None`` (off) where they do not.
    cell_refresh: float | None = 0.8
    tokens_per_frame: int = 0
    video_marker: str = "<video>"
    end_of_turn_tokens: tuple[str, ...] = ()

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        preprocess_spec: PreprocessSpec,
        chat_template: str,
        system_prompt: str | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess_spec = preprocess_spec
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.llm = self._text_lm()

    def _text_lm(self) -> TextLM:
        raise TypeError(f"{type(self).__name__} must define _text_lm")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(family={self.family}, image_size={self.image_size}, "
            f"tokens_per_frame={self.tokens_per_frame}, llm_hidden={self.llm.hidden_size})"
        )

    # ---- vision side -------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.preprocess_spec.size

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision_layers.parameters()).dtype

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """``[N, H, W, 3]`` uint8 -> ``[N, 3, S, S]`` pixel values on the model's device and vision dtype."""
        s = self.preprocess_spec
        pv = frames_to_pixel_values(rgb, s.size, s.mean, s.std, s.resample)
        return pv.to(self.device, self.vision_dtype)

    @torch.inference_mode()
    def encode_vision(self, pixel_values: torch.Tensor, layer_runner: LayerRunner | None = None) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ViT features ``[N, P, D]``; ``layer_runner`` replaces the plain loop over layers."""
        hidden = self.vision_embed(pixel_values)  # [N, P, D]
        hidden = (layer_runner or run_layers)(hidden, self.vision_layers)
        return self.vision_finish(hidden)

    @torch.inference_mode()
    def encode_frames(self, rgb: np.ndarray, layer_runner: LayerRunner | None = None) -> VisualTokens:
        """Frames straight to projected visual tokens (steps 1-5)."""
        return self.project(self.encode_vision(self.preprocess(rgb), layer_runner))

    def check_cacher(self) -> None:
        """Raise ``TypeError`` naming the first vision layer the STC cacher cannot run (no per-layer ops)."""
        from stream.models.vision_ops import layer_ops

        for i, layer in enumerate(self.vision_layers):
            layer_ops(layer, i)

    def check_attention(self) -> None:
        """Raise ``TypeError`` when :meth:`encode_vision_attention` cannot score this tower's last layer (the
        ``attention`` pruning policy); the message names the layer and what it lacks."""
        from stream.models.vision_ops import layer_ops

        layers = self.vision_layers
        try:
            layer_ops(layers[-1], len(layers) - 1)
        except TypeError:
            raise TypeError(
                f"the last vision layer ({type(layers[-1]).__name__}) has no per-layer ops to score the attention "
                "each patch receives; supported: SigLIP-style layers (LLaVA-OneVision, SmolVLM) and the Qwen "
                "adapters' blocks") from None

    @torch.inference_mode()
    def encode_vision_attention(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_vision` (plain layer loop) plus the attention each patch receives in the last layer,
        ``[N, P]`` in the order the layers see the patches (VisionZip's dominant-token score). Costs one extra
        ``q @ k`` of that layer. Map it onto the token grid with :meth:`attention_tokens`."""
        from stream.models.vision_ops import layer_ops

        seen: list[torch.Tensor] = []

        def capture(hidden: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
            x = run_layers(hidden, layers[:-1])  # [N, P, D] input of the last layer
            seen.append(layer_ops(layers[-1], len(layers) - 1).attention_received(x))  # [N, P]
            return run_layers(x, layers[-1:])

        features = self.encode_vision(pixel_values, layer_runner=capture)
        return features, torch.cat(seen, dim=0)

    def attention_tokens(self, scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch scores ``[N, P]`` (:meth:`encode_vision_attention`) -> ``[N, rows * cols]`` per LLM token, row-major
        like ``VisualTokens.positions`` (area averaging onto the token grid, as the projector pools)."""
        from stream.models.vision_ops import scores_to_tokens

        return scores_to_tokens(scores, grid)

    # ---- LLM side: prompt pieces ---------------------------------------------------------------------------------
    def _ids(self, text: str) -> torch.Tensor:
        """Tokenize ``text`` without special-token insertion -> ``[L]`` int64."""
        if not text:
            return torch.zeros(0, dtype=torch.long)
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def _render_template(self, question: str) -> tuple[str, str]:
        """Render the chat template around one video and one question -> (text before video, text after video)."""
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        messages.append(
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
        )
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        marker = self.video_marker
        if text.count(marker) != 1:
            raise ValueError(
                f"the chat template must render exactly one {marker!r} for a video; got {text.count(marker)}. "
                "Fix: pass a chat template with video support (see stream/models/tiny.py for an example)."
            )
        before, after = text.split(marker)
        return before, after

    def stream_prefix_ids(self) -> torch.Tensor:
        """``[L]`` ids of the prompt before the first frame (system turn, user turn start, video intro)."""
        before, _ = self._render_template(QUESTION_SENTINEL)
        return self._ids(before + self.video_intro())

    def question_ids(self, question: str) -> torch.Tensor:
        """``[L]`` ids after the last frame: end of video, the question, the assistant turn start."""
        if not question or not question.strip():
            raise ValueError("the question is empty; ask something, e.g. 'What is happening?'")
        _, after = self._render_template(QUESTION_SENTINEL)
        return self._ids(self.video_outro() + after.replace(QUESTION_SENTINEL, question))

    def question_embeds(self, question: str) -> torch.Tensor:
        """``[L, d]`` LLM input after the last frame (family end-of-video embedding + question + assistant start)."""
        return torch.cat([self.video_end_embeds(), self.llm.embed(self.question_ids(question))], dim=0)

    def frame_pts(self, pts: Sequence[float]) -> list[float]:
        """Frame times -> one time per adapter frame (Qwen: per temporal patch of 2 frames)."""
        return [float(x) for x in pts]

    def chunk_embeds(self, frames: Sequence[torch.Tensor], pts: Sequence[float],
                     positions: Sequence[torch.Tensor] | None = None, grid: tuple[int, int] | None = None,
                     extras: dict[str, Sequence[torch.Tensor]] | None = None) -> torch.Tensor:
        """A chunk's visual tokens as LLM input: ``frames[i]`` ``[t_i, d]`` kept tokens of frame i -> ``[L, d]``.

        1-D RoPE families place tokens at consecutive positions, so ``positions`` / ``grid`` (used by M-RoPE
        families) are not needed here. ``extras`` (per frame ``[t_i, ...]``, see :attr:`VisualTokens.extras`) are
        refused: no such family makes any.
        """
        if extras:
            raise ValueError(f"{self.family} takes no per-token extras; got {sorted(extras)} for its chunk")
        if len(frames) != len(pts):
            raise ValueError(f"chunk_embeds needs one pts per frame: {len(frames)} frames, {len(pts)} pts")
        pieces: list[torch.Tensor] = []
        for tokens, t in zip(frames, pts):
            before, after = self.frame_text(float(t))
            if before:
                pieces.append(self.llm.embed(self._ids(before)))
            pieces.append(tokens.to(self.device, self.llm.dtype))
            if after:
                pieces.append(self.llm.embed(self._ids(after)))
        if not pieces:
            return torch.zeros(0, self.llm.hidden_size, device=self.device, dtype=self.llm.dtype)
        return torch.cat(pieces, dim=0)

    def chunk_placeholder_ids(self, n_frames: int, pts: Sequence[float]) -> torch.Tensor:
        """The ids ``chunk_embeds`` stands for, with the family placeholder token in place of each visual token
        (what the HF processor would feed ``model.forward``); used by the equivalence tests."""
        pieces = []
        for t in list(pts)[:n_frames]:
            before, after = self.frame_text(float(t))
            pieces += [self._ids(before), torch.full((self.tokens_per_frame,), self.placeholder_id), self._ids(after)]
        return torch.cat(pieces)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for tok in self.end_of_turn_tokens:
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return ids

    # ---- family hooks (subclasses override) ----------------------------------------------------------------------
    @property
    def placeholder_id(self) -> int:
        raise TypeError(f"{type(self).__name__} must define placeholder_id")

    @property
    def vision_layers(self) -> nn.ModuleList:
        raise TypeError(f"{type(self).__name__} must define vision_layers")

    def vision_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define vision_embed")

    def vision_finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def project(self, features: torch.Tensor) -> VisualTokens:
        raise TypeError(f"{type(self).__name__} must define project")

    def video_intro(self) -> str:
        return ""

    def video_outro(self) -> str:
        return ""

    def frame_text(self, pts: float) -> tuple[str, str]:
        """Text placed right before and right after one frame's visual tokens."""
        return "", ""

    def video_end_embeds(self) -> torch.Tensor:
        """``[k, d]`` embeddings placed once after the last frame (e.g. LLaVA-OV's ``image_newline``)."""
        return torch.zeros(0, self.llm.hidden_size, device=self.device, dtype=self.llm.dtype)
