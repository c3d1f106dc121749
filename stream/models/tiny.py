"""Tiny models: the real LLaVA-OneVision / SmolVLM architectures from small configs with RANDOM weights.

No weights can be downloaded on our dev/CI machines, so tests, the demo and CI use these. They keep the real
token geometry (196 tokens per frame at 384 px for LLaVA-OV, 64 at 512 px for SmolVLM) and a real tokenizer
(byte-level BPE trained offline here, with the family's special tokens and chat template). Answers are
meaningless: every output that uses one says so.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stream.models.llava_onevision import LLAVA_OV_CHAT_TEMPLATE
from stream.models.qwen2_5_vl import QWEN2_5_VL_CHAT_TEMPLATE
from stream.models.qwen3_vl import QWEN3_VL_CHAT_TEMPLATE
from stream.models.smolvlm import SMOLVLM_CHAT_TEMPLATE

FAMILIES = ("llava_onevision", "smolvlm", "qwen2_5_vl", "qwen3_vl")
TINY_MARKER = "stc_tiny.json"
TINY_VERSION = 1

_SPECIALS = {
    "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
    "smolvlm": ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                "<global-img>", "<image>"],
    "qwen2_5_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|video_pad|>", "<|image_pad|>"],
}
_SPECIALS["qwen3_vl"] = _SPECIALS["qwen2_5_vl"]
_EOS = {"llava_onevision": "<|im_end|>", "smolvlm": "<end_of_utterance>", "qwen2_5_vl": "<|im_end|>",
        "qwen3_vl": "<|im_end|>"}
_TEMPLATES = {"llava_onevision": LLAVA_OV_CHAT_TEMPLATE, "smolvlm": SMOLVLM_CHAT_TEMPLATE,
              "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}
# Qwen2.5-VL tiny: 4 vision blocks (1 and 3 full attention, 0 and 2 windowed), 112 px windows as in the real model
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 4 * 28 * 28, 64 * 28 * 28
_WORDS = (
    "a the person people man woman child car bus bike dog cat box hand table street road camera video frame scene "
    "walks runs moves stands sits holds picks puts opens closes turns left right up down near far into out of on in "
    "red blue green white black small large fast slow what is happening where who how many when why does do there "
    "are was were it they he she this that here now then before after second minute time first last next again "
    "answer question yes no one two three four five six seven eight nine ten describe show see look watch count"
).split()


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]) + f" {rng.randint(0, 59):02d}")
    return lines


def train_tokenizer(family: str, vocab_size: int = 1024, seed: int = 0,
                    extra_corpus: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline on a generated corpus (plus ``extra_corpus``: a domain's own texts, so its
    words become single tokens), with the family's special tokens and chat template."""
    specials = _SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(4000, seed) + list(extra_corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=_EOS[family], pad_token="<|endoftext|>", unk_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = _TEMPLATES[family]
    return fast


def _text_config(vocab: int, overrides: dict[str, Any] | None) -> dict[str, Any]:
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=32768, tie_word_embeddings=False)
    cfg.update(overrides or {})
    cfg["vocab_size"] = max(cfg["vocab_size"], vocab)
    return cfg


def _vision_config(family: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    size, patch = (384, 14) if family == "llava_onevision" else (512, 16)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               image_size=size, patch_size=patch)
    cfg.update(overrides or {})
    return cfg


def build_tiny_model(family: str, tokenizer: PreTrainedTokenizerFast, text_overrides: dict[str, Any] | None = None,
                     vision_overrides: dict[str, Any] | None = None, seed: int = 0) -> torch.nn.Module:
    """Instantiate the family's real HF model class from a small config, weights seeded with ``seed``."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SmolVLMConfig
    from transformers import SmolVLMForConditionalGeneration

    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS[family]}
    text = _text_config(vocab, text_overrides)
    vision = _vision_config(family, vision_overrides)
    torch.manual_seed(seed)
    if family == "qwen2_5_vl":
        return _build_qwen2_5_vl(tokenizer, text, ids, vision_overrides)
    if family == "qwen3_vl":
        return _build_qwen3_vl(tokenizer, text, ids, vision_overrides)
    if family == "llava_onevision":
        text["model_type"] = "qwen2"
        config = LlavaOnevisionConfig(
            text_config=text, vision_config={**vision, "model_type": "siglip_vision_model"},
            image_token_id=ids["<image>"], video_token_id=ids["<video>"], vision_feature_layer=-1,
            vision_feature_select_strategy="full", image_grid_pinpoints=[[vision["image_size"]] * 2],
            tie_word_embeddings=False,
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    else:
        text["model_type"] = "llama"
        config = SmolVLMConfig(
            text_config=text, vision_config=vision, scale_factor=4, image_token_id=ids["<image>"],
            tie_word_embeddings=False,
        )
        model = SmolVLMForConditionalGeneration(config)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _build_qwen2_5_vl(tokenizer: PreTrainedTokenizerFast, text: dict[str, Any], ids: dict[str, int],
                      vision_overrides: dict[str, Any] | None) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}, **text,
            "model_type": "qwen2_5_vl_text", "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id}
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1, 3], tokens_per_second=2)
    vision.update(vision_overrides or {})
    return _qwen_model(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, tokenizer, text, vision, ids)


def _qwen_model(config_cls: Any, model_cls: Any, tokenizer: PreTrainedTokenizerFast, text: dict[str, Any],
                vision: dict[str, Any], ids: dict[str, int]) -> torch.nn.Module:
    """A Qwen-VL model (2.5 or 3) from its text/vision sub-configs, with our tokenizer's vision markers and ids."""
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    model = model_cls(config)
    for cfg in (model.config, model.config.text_config):
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tokenizer.pad_token_id, None, tokenizer.eos_token_id
    return model.eval()


def _build_qwen3_vl(tokenizer: PreTrainedTokenizerFast, text: dict[str, Any], ids: dict[str, int],
                    vision_overrides: dict[str, Any] | None) -> torch.nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                                "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            **text, "model_type": "qwen3_vl_text", "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id}
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    vision.update(vision_overrides or {})
    return _qwen_model(Qwen3VLConfig, Qwen3VLForConditionalGeneration, tokenizer, text, vision, ids)


def _preprocessor_config(family: str, size: int) -> dict[str, Any]:
    """The fields of HF's ``preprocessor_config.json`` that our preprocessing reads."""
    if family == "qwen2_5_vl":
        return {"image_processor_type": "Qwen2VLImageProcessor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "patch_size": 14,
                "merge_size": 2, "temporal_patch_size": 2, "min_pixels": QWEN_MIN_PIXELS,
                "max_pixels": QWEN_MAX_PIXELS}
    if family == "qwen3_vl":
        return {"video_processor_type": "Qwen3VLVideoProcessor", "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "resample": 3, "patch_size": 16, "merge_size": 2,
                "temporal_patch_size": 2, "size": {"shortest_edge": 8 * 32 * 32, "longest_edge": 128 * 32 * 32}}
    if family == "llava_onevision":
        return {"image_processor_type": "LlavaOnevisionImageProcessor", "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "resample": 3, "size": {"height": size, "width": size}}
    return {"image_processor_type": "SmolVLMImageProcessor", "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "resample": 1, "size": {"longest_edge": size},
            "max_image_size": {"longest_edge": size}}


def make_tiny_model(out_dir: str | Path, family: str = "llava_onevision", seed: int = 0,
                    text_overrides: dict[str, Any] | None = None,
                    vision_overrides: dict[str, Any] | None = None) -> Path:
    """Build and save a tiny random-weight model + tokenizer to ``out_dir`` (written atomically); return the path.

    It loads back with ``from_pretrained(out_dir, local_files_only=True)`` or :func:`stream.models.load_adapter`.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; use one of {list(FAMILIES)}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = train_tokenizer(family, seed=seed)
        model = build_tiny_model(family, tokenizer, text_overrides, vision_overrides, seed)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        size = getattr(model.config.vision_config, "image_size", 0)
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(family, size), indent=2))
        marker = {"family": family, "random_weights": True, "seed": seed, "version": TINY_VERSION,
                  "text_overrides": text_overrides or {}, "vision_overrides": vision_overrides or {}}
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_tiny(path: str | Path) -> bool:
    """True when ``path`` is a tiny random-weight model made by :func:`make_tiny_model`."""
    return (Path(path) / TINY_MARKER).is_file()


def default_tiny_dir(family: str = "llava_onevision") -> Path:
    """Where the built-in tiny model is cached (``$XDG_CACHE_HOME/stc-serve`` or ``~/.cache/stc-serve``)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stc-serve"
    return root / f"tiny-{family}-v{TINY_VERSION}"


def ensure_tiny_model(family: str = "llava_onevision") -> Path:
    """Return the cached tiny model folder, building it on first use."""
    path = default_tiny_dir(family)
    if not is_tiny(path):
        make_tiny_model(path, family)
    return path
