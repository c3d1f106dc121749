"""Frames -> ``pixel_values``, our own implementation (numpy + PIL + torch; no torchvision).

Matches the HF image processors' steps for a fixed-size square vision tower: resize to ``size x size`` with the
processor's resample filter, rescale by 1/255, normalize with the processor's mean/std, channels first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# PIL's integer codes, as stored in HF preprocessor_config.json ("resample": 3)
RESAMPLE_BY_CODE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def frames_to_pixel_values(
    rgb: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resample: str = "bicubic",
) -> torch.Tensor:
    """Resize, rescale and normalize a batch of RGB frames.

    Args:
        rgb: ``[N, H, W, 3]`` uint8 frames (a single ``[H, W, 3]`` frame is accepted too).
        size: side of the square the vision tower expects (e.g. 384 for SigLIP-so400m/14).
        mean, std: per-channel normalization (3 values each).
        resample: one of ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``.

    Returns:
        ``[N, 3, size, size]`` float32 pixel values.
    """
    if rgb.ndim == 3:
        rgb = rgb[None]
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got dtype {rgb.dtype} shape {list(rgb.shape)}")
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r} is not supported; use one of {sorted(RESAMPLE)}")
    out = np.empty((rgb.shape[0], size, size, 3), dtype=np.float32)  # [N, S, S, 3]
    for i, frame in enumerate(rgb):
        img = Image.fromarray(frame)
        if img.size != (size, size):
            img = img.resize((size, size), RESAMPLE[resample])
        out[i] = np.asarray(img, dtype=np.float32)
    mean_a = np.asarray(mean, dtype=np.float32) * 255.0
    std_a = np.asarray(std, dtype=np.float32) * 255.0
    out = (out - mean_a) / std_a  # == (x / 255 - mean) / std
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S]
