"""Load a VLM adapter from a tiny-model folder, a local checkpoint, or a hub id -- one code path for all three."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from stream.errors import ConfigError
from stream.models.base import PreprocessSpec, VLMAdapter
from stream.models.llava_onevision import LLAVA_OV_CHAT_TEMPLATE, LlavaOneVisionAdapter
from stream.models.preprocess import RESAMPLE, RESAMPLE_BY_CODE
from stream.models.qwen2_5_vl import QWEN2_5_VL_CHAT_TEMPLATE, Qwen2_5_VLAdapter
from stream.models.qwen3_vl import QWEN3_VL_CHAT_TEMPLATE, Qwen3VLAdapter
from stream.models.smolvlm import SMOLVLM_CHAT_TEMPLATE, SmolVLMAdapter
from stream.models.tiny import ensure_tiny_model, is_tiny

# model_type in config.json -> (adapter, HF model class name, default chat template)
FAMILY_BY_MODEL_TYPE: dict[str, tuple[type[VLMAdapter], str, str]] = {
    "llava_onevision": (LlavaOneVisionAdapter, "LlavaOnevisionForConditionalGeneration", LLAVA_OV_CHAT_TEMPLATE),
    "smolvlm": (SmolVLMAdapter, "SmolVLMForConditionalGeneration", SMOLVLM_CHAT_TEMPLATE),
    "idefics3": (SmolVLMAdapter, "Idefics3ForConditionalGeneration", SMOLVLM_CHAT_TEMPLATE),
    "qwen2_5_vl": (Qwen2_5_VLAdapter, "Qwen2_5_VLForConditionalGeneration", QWEN2_5_VL_CHAT_TEMPLATE),
    "qwen3_vl": (Qwen3VLAdapter, "Qwen3VLForConditionalGeneration", QWEN3_VL_CHAT_TEMPLATE),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# model types next to a supported family, and what differs
RELATED_MODEL_TYPES = {
    "qwen2_vl": "Qwen2-VL (qwen2_vl) is the predecessor of Qwen2.5-VL: no window attention, other vision blocks",
    "qwen3_vl_moe": "Qwen3-VL-MoE (qwen3_vl_moe) has a mixture-of-experts decoder; the dense qwen3_vl is supported",
    "qwen2_5_omni": "Qwen2.5-Omni (qwen2_5_omni) adds audio towers and a talker; Qwen2.5-VL (qwen2_5_vl) is supported",
    "llava": "LLaVA-1.5 (llava) has a CLIP tower with a CLS token; LLaVA-OneVision (llava_onevision) is supported",
    "llava_next_video": "LLaVA-NeXT-Video differs from LLaVA-OneVision (pooling, projector); not supported",
    "idefics2": "Idefics2 uses a perceiver resampler; Idefics3 / SmolVLM are supported",
}
HUB_PROBE_TIMEOUT_S = 3.0


def _hub_reachable() -> bool:
    """True when the HF endpoint accepts a TCP connection within ``HUB_PROBE_TIMEOUT_S``."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _check_hub_id(model: str) -> bool:
    """A hub id: ``True`` when its config.json is in the local HF cache (load from the cache only), ``False`` when
    the hub is reachable; otherwise raise a ConfigError saying what happened and the fix, without retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not a valid repo id either
        cached = None
    if isinstance(cached, str):
        return True
    offline = bool(constants.HF_HUB_OFFLINE)
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) is unreachable"
        raise ConfigError(
            f"model={model!r} is not a local folder, is not in the local HF cache ({constants.HF_HUB_CACHE}), and "
            f"{why}. Fix: pass a local checkpoint folder (save_pretrained output), or fill the cache where the hub "
            f"is reachable (`huggingface-cli download {model}`) and run with HF_HUB_OFFLINE=1; "
            "'tiny-<family>' gives a built-in random-weight model."
        )
    return False


def _read_json(model: str, name: str, local: bool, cache_only: bool = False) -> dict[str, Any] | None:
    """Read ``name`` from a local folder or the hub cache (``None`` when absent)."""
    if local:
        path = Path(model) / name
        return json.loads(path.read_text()) if path.is_file() else None
    from transformers.utils import cached_file

    path = cached_file(model, name, _raise_exceptions_for_missing_entries=False, local_files_only=cache_only)
    return json.loads(Path(path).read_text()) if path else None


def _chat_template(model: str, local: bool, tokenizer: Any, default: str, cache_only: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    data = _read_json(model, "chat_template.json", local, cache_only)  # processors of llava-hf / SmolVLM checkpoints
    return data["chat_template"] if data and "chat_template" in data else default


def _preprocess_spec(model: str, local: bool, image_size: int, cache_only: bool = False) -> PreprocessSpec:
    cfg = _read_json(model, "preprocessor_config.json", local, cache_only) or {}
    resample = cfg.get("resample", 3)
    name = RESAMPLE_BY_CODE.get(resample, resample) if isinstance(resample, int) else str(resample)
    if name not in RESAMPLE:
        name = "bicubic"
    mean = tuple(cfg.get("image_mean", (0.5, 0.5, 0.5)))
    std = tuple(cfg.get("image_std", (0.5, 0.5, 0.5)))
    return PreprocessSpec(size=image_size, mean=mean, std=std, resample=name)  # type: ignore[arg-type]


REFERENCE_MODEL = Path(__file__).with_name("reference")
"""The reference model trained here on planted shapes (``--model reference``): a test instrument, not a general VLM."""


def resolve_model(model: str | Path | None, family: str = "llava_onevision") -> tuple[str, bool]:
    """``None`` -> the cached tiny model of ``family`` (built on first use); ``reference`` -> the committed reference
    model; a folder -> itself; else a hub id."""
    if str(model) == "reference":
        if not (REFERENCE_MODEL / "config.json").is_file():
            raise ConfigError(f"model='reference': the reference model's folder {REFERENCE_MODEL} holds no "
                              "config.json. Fix: reinstall the package (pip install -e .), or retrain it with "
                              "python benchmarks/train_reference.py.")
        return str(REFERENCE_MODEL), True
    if model is None or str(model) in ("", "tiny", f"tiny-{family}"):
        return str(ensure_tiny_model(family)), True
    if str(model).startswith("tiny-"):
        return str(ensure_tiny_model(str(model)[5:])), True
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model={str(model)!r} is a path without config.json; give a checkpoint folder "
                              "(save_pretrained output), 'tiny-llava_onevision', 'tiny-smolvlm' or a hub id.")
        return str(path), True
    return str(model), False


def load_adapter(model: str | Path | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 family: str = "llava_onevision") -> VLMAdapter:
    """Load the model and wrap it in its family's adapter.

    Args:
        model: a folder made by ``stc-serve make-tiny-model`` or ``save_pretrained``, a hub id (needs network
            access or a filled HF cache), ``tiny-llava_onevision`` / ``tiny-smolvlm``, or ``None`` for the built-in
            tiny LLaVA-OneVision (random weights).
        device: torch device string.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (or a ``torch.dtype``).
    """
    import transformers

    name, local = resolve_model(model, family)
    torch_dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of {list(DTYPES)}")
    cache_only = False if local else _check_hub_id(name)
    cfg = _read_json(name, "config.json", local, cache_only) or {}
    model_type = cfg.get("model_type")
    if model_type not in FAMILY_BY_MODEL_TYPE:
        related = RELATED_MODEL_TYPES.get(str(model_type))
        raise ConfigError(f"model {name!r} has model_type={model_type!r}"
                          + (f": {related}" if related else "") + f"; supported: {sorted(FAMILY_BY_MODEL_TYPE)}")
    adapter_cls, class_name, default_template = FAMILY_BY_MODEL_TYPE[model_type]
    hf_cls = getattr(transformers, class_name)
    files_only = local or cache_only
    hf_model = hf_cls.from_pretrained(name, local_files_only=files_only, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=files_only)
    spec = _preprocess_spec(name, local, getattr(hf_model.config.vision_config, "image_size", 0), cache_only)
    template = _chat_template(name, local, tokenizer, default_template, cache_only)
    adapter = adapter_cls(hf_model, tokenizer, spec, template)
    if hasattr(adapter, "configure_preprocessing"):  # families whose resize reads more of preprocessor_config
        adapter.configure_preprocessing(_read_json(name, "preprocessor_config.json", local, cache_only) or {})
    adapter.random_weights = local and is_tiny(name)
    adapter.reference = local and Path(name).resolve() == REFERENCE_MODEL.resolve()
    adapter.source = "reference" if adapter.reference else name
    return adapter


# model_type -> (vision-only submodules, language-only submodules) of the HF model, by attribute path. A family not
# listed here loads whole on both replicas (``load_adapter_part`` says so in ``adapter.split``).
SPLIT_PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llava_onevision": (("model.vision_tower", "model.multi_modal_projector"), ("model.language_model", "lm_head")),
    "smolvlm": (("model.vision_model", "model.connector"), ("model.text_model", "lm_head")),
    "idefics3": (("model.vision_model", "model.connector"), ("model.text_model", "lm_head")),
}


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the materialised (non-meta) parameters and buffers of ``module``; tied tensors count once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_meta or t.numel() == 0:
            continue
        key = (t.device, t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _drop(root: torch.nn.Module, path: str) -> None:
    """Move the submodule at ``path`` to the meta device (its storage is freed; shapes stay for the adapter)."""
    root.get_submodule(path).to("meta")


def _materialise(root: torch.nn.Module, device: str) -> None:
    """Move every non-meta parameter and buffer to ``device`` (meta ones stay: they were dropped on purpose)."""
    for p in root.parameters():
        if not p.is_meta:
            p.data = p.data.to(device)
    for name, buf in list(root.named_buffers()):
        if not buf.is_meta:
            owner, _, attr = name.rpartition(".")
            sub = root.get_submodule(owner) if owner else root
            setattr(sub, attr, buf.to(device))


def load_adapter_part(model: str | Path | None = None, device: str = "cpu", dtype: str | torch.dtype = "float32",
                      part: str = "full", family: str = "llava_onevision") -> VLMAdapter:
    """:func:`load_adapter` keeping only what one replica kind uses on ``device``.

    The weights load on the CPU; ``part="vision"`` drops the language model and LM head (the vision tower and
    projector go to ``device``), ``part="llm"`` drops the vision tower and projector. Dropped modules live on the
    meta device, so neither the whole model nor a transient full copy ever reaches ``device``. ``adapter.split``
    records what was kept (``"full"`` for a family without a known split).

    Raises:
        ConfigError: ``part`` is not ``full``, ``vision`` or ``llm``.
    """
    if part not in ("full", "vision", "llm"):
        raise ConfigError(f"part={part!r} is not supported; use 'full', 'vision' or 'llm'")
    adapter = load_adapter(model, "cpu", dtype, family)
    parts = SPLIT_PARTS.get(getattr(adapter.model.config, "model_type", ""))
    hf = adapter.model
    if part != "full" and parts is not None:
        vision_parts, language_parts = parts
        for path in language_parts if part == "vision" else vision_parts:
            _drop(hf, path)
        if part == "vision":  # adapter.device reads the LM head's device: keep an empty weight there
            head = hf.get_submodule(language_parts[-1])
            head.weight = torch.nn.Parameter(torch.empty(0, dtype=head.weight.dtype), requires_grad=False)
        adapter.split = part
    else:
        adapter.split = "full"
    _materialise(hf, device)
    return adapter
